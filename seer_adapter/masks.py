"""Gate probabilities -> boolean block masks.

All functions work on gate probabilities ``probs [B, H, nQ, nK]`` (rows sum to 1 over the allowed key
blocks) together with ``allowed [B or 1, 1, nQ, nK]`` (block-causal and not fully padding); they return a
bool mask of the same shape as ``probs`` that is a subset of ``allowed`` and, when forced blocks are on,
never leaves a row with a real query empty.
"""

from __future__ import annotations

import math

import torch


def block_causal_mask(n_q_blocks: int, n_k_blocks: int, device: torch.device) -> torch.Tensor:
    """bool ``[nQ, nK]``: key block ``kb`` may be seen by query block ``qb`` (bottom-right aligned, diagonal kept)."""
    offset = n_k_blocks - n_q_blocks
    return torch.arange(n_k_blocks, device=device)[None, :] <= torch.arange(n_q_blocks, device=device)[:, None] + offset


def nz_ratio_to_topk(nz_ratio: float, n_blocks: int) -> int:
    """Blocks kept per row so that about ``nz_ratio`` of the causal block triangle is kept.

    Keeping ``k`` blocks per row of an ``n``-row triangle keeps ``1 - (1 - k/n)**2`` of it, hence
    ``k = ceil((1 - sqrt(1 - nz_ratio)) * n)``.
    """
    return max(1, math.ceil((1.0 - math.sqrt(max(0.0, 1.0 - nz_ratio))) * n_blocks - 1e-9))


def topk_block_mask(scores: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest-scoring allowed blocks of every row (fewer where a row has fewer allowed)."""
    n_k_blocks = scores.shape[-1]
    k = min(k, n_k_blocks)
    masked = scores.masked_fill(~allowed, float("-inf"))
    top = masked.topk(k, dim=-1).indices
    keep = torch.zeros_like(masked, dtype=torch.bool).scatter_(-1, top, True)
    return keep & allowed


def select_blocks(
    probs: torch.Tensor,
    allowed: torch.Tensor,
    *,
    method: str,
    block_size: int,
    threshold: float = 5e-4,
    nz_ratio: float = 0.5,
    token_budget: int = 2048,
    sink_block: torch.Tensor | None = None,
    force_local_block: bool = True,
    dense_last_query_blocks: int = 0,
    local_block: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn gate probabilities into a block mask.

    Args:
        probs: fp ``[B, H, nQ, nK]`` gate probabilities.
        allowed: bool broadcastable to ``probs``: blocks that may be kept at all.
        method: ``"threshold"`` | ``"nz_ratio"`` | ``"token_budget"`` | ``"dense"``.
        block_size: tokens per block (for ``token_budget``).
        threshold, nz_ratio, token_budget: parameters of the methods.
        sink_block: optional long ``[B]``: index of the key block holding each row's first real token;
            that block is always kept (``None`` = no forced sink).
        force_local_block: always keep the diagonal block of every query block.
        dense_last_query_blocks: keep every allowed block in this many final query-block rows.
        local_block: optional long ``[B or 1]`` (one query-block row): the block ``force_local_block`` keeps instead
            of the diagonal (shape-static decoding steps, whose current block is not the last column).

    Returns:
        bool ``[B, H, nQ, nK]``.
    """
    allowed = allowed.expand_as(probs)
    n_q_blocks, n_k_blocks = probs.shape[-2:]
    forced = torch.zeros(n_q_blocks, n_k_blocks, dtype=torch.bool, device=probs.device)
    if force_local_block and local_block is not None:
        local = torch.arange(n_k_blocks, device=probs.device)[None, :] == local_block[:, None]  # [B or 1, nK]
        forced = forced | local[:, None, None, :]
    elif force_local_block:
        diagonal = torch.arange(n_q_blocks, device=probs.device) + (n_k_blocks - n_q_blocks)
        forced[torch.arange(n_q_blocks, device=probs.device), diagonal] = True
    if sink_block is not None:
        sink = torch.arange(n_k_blocks, device=probs.device)[None, :] == sink_block[:, None]  # [B, nK]
        forced = forced | sink[:, None, None, :]
    forced = forced & allowed
    # Top-k methods count forced blocks among their k (they rank first), so every selector keeps the same number
    # of blocks per row and densities compare exactly.
    ranked = probs.masked_fill(forced, float("inf"))
    if method == "dense":
        keep = allowed.clone()
    elif method == "threshold":
        keep = (probs > threshold) & allowed
    elif method == "nz_ratio":
        keep = topk_block_mask(ranked, allowed, nz_ratio_to_topk(nz_ratio, n_k_blocks))
    elif method == "token_budget":
        keep = topk_block_mask(ranked, allowed, max(1, token_budget // block_size))
    else:
        raise ValueError(f"unknown sparsity method {method!r}")
    keep |= forced
    if dense_last_query_blocks > 0:
        keep[..., -dense_last_query_blocks:, :] = allowed[..., -dense_last_query_blocks:, :]
    return keep


def block_density(keep: torch.Tensor, allowed: torch.Tensor) -> float:
    """Kept fraction of the allowed (causal, non-padding) blocks."""
    total = allowed.expand_as(keep).sum().item()
    return keep.sum().item() / total if total else 1.0
