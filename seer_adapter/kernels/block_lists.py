"""Kept key blocks as sorted per-row index lists, and block selection producing them (pure PyTorch).

The Triton attention kernel walks, for every query-block row, a sorted list of the key blocks it keeps
(`BlockLists`). This module holds the representation, the conversion from a boolean block mask
(`block_mask_to_indices`), and `select_block_lists_reference`: the oracle of the fused selection kernel
(`block_select_triton.py`), which goes from gate scores straight to the lists without a boolean mask.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# Elements of the [B, H, rows, nK] mask processed at once by `block_mask_to_indices` (bounds its int64 temporaries).
_INDEX_CHUNK_ELEMENTS = 1 << 25


class BlockLists(NamedTuple):
    """Sorted lists of kept key blocks, one per query-block row.

    Attributes:
        indices: int32 ``[B, Hm, nQ, W]``: kept key-block indices in ascending order; entries past ``counts`` are
            unspecified. Lists are causally filtered (no block that no row of the query block may see).
        counts: int32 ``[B, Hm, nQ]``: real entries of each list.
        n_k_blocks: ``nK``, the number of key blocks of the mask the lists stand for.
    """

    indices: torch.Tensor
    counts: torch.Tensor
    n_k_blocks: int

    def to_mask(self) -> torch.Tensor:
        """bool ``[B, Hm, nQ, nK]`` block mask with exactly the listed blocks set."""
        width = self.indices.shape[-1]
        real = torch.arange(width, device=self.indices.device) < self.counts[..., None]  # [B, Hm, nQ, W]
        # Entries past the count go to a spare column that is cut off.
        target = torch.where(real, self.indices.long(), self.n_k_blocks)
        mask = torch.zeros(*self.counts.shape, self.n_k_blocks + 1, dtype=torch.bool, device=self.indices.device)
        return mask.scatter_(-1, target, True)[..., : self.n_k_blocks]


def key_block_has_tokens(key_padding_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """bool ``[B, nK]``: key block ``kb`` holds at least one real token.

    Args:
        key_padding_mask: bool ``[B, Sk]``, True for real tokens.
    """
    batch, kv_len = key_padding_mask.shape
    n_k_blocks = math.ceil(kv_len / block_size)
    padded = torch.nn.functional.pad(key_padding_mask, (0, n_k_blocks * block_size - kv_len), value=False)
    return padded.view(batch, n_k_blocks, block_size).any(dim=-1)


def block_mask_to_indices(
    block_mask: torch.Tensor,
    *,
    block_size: int = 64,
    q_len: int | None = None,
    kv_len: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    compact: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted lists of the kept key blocks of every query-block row, computed on the mask's device.

    Args:
        block_mask: bool ``[B, Hm, nQ, nK]``.
        block_size: tokens per block.
        q_len, kv_len: query and key lengths (``S``, ``Sk``). When both are given, key blocks that no row of the
            query block may see are dropped: with queries the last ``S`` of ``Sk`` positions, key block ``kb`` can
            matter for query block ``qb`` only if ``kb * block_size <= min((qb + 1) * block_size, S) - 1 + Sk - S``.
            Without them the mask is taken as it is.
        key_padding_mask: optional bool ``[B, Sk]`` (True = real token); key blocks made only of padding are dropped.
        compact: trim the lists to the longest row (one device-to-host sync). Otherwise they are ``nK`` wide,
            which needs no sync (CUDA-graph friendly).

    Returns:
        ``kv_block_indices`` int32 ``[B, Hm, nQ, maxK]``: kept key-block indices in ascending order, padded with 0
        (a view whose rows are ``maxK + 1`` apart; call ``.contiguous()`` where that matters);
        ``kv_block_counts`` int32 ``[B, Hm, nQ]``: how many entries of each row are real.
    """
    if block_mask.dtype != torch.bool or block_mask.dim() != 4:
        raise ValueError(
            f"block_mask must be a bool [B, H, nQ, nK] tensor, got {block_mask.dtype} {tuple(block_mask.shape)}"
        )
    if (q_len is None) != (kv_len is None):
        raise ValueError("pass both q_len and kv_len (to drop non-causal blocks) or neither")
    batch, mask_heads, n_q_blocks, n_k_blocks = block_mask.shape
    device = block_mask.device
    key_block_ids = torch.arange(n_k_blocks, device=device, dtype=torch.int32)  # [nK]

    keep = block_mask
    if q_len is not None and kv_len is not None:
        causal = causal_block_allowed(
            n_q_blocks, n_k_blocks, block_size=block_size, q_len=q_len, kv_len=kv_len, device=device
        )  # [1, 1, nQ, nK]
        keep = keep & causal  # [B, Hm, nQ, nK]
    if key_padding_mask is not None:
        keep = keep & key_block_has_tokens(key_padding_mask, block_size)[:, None, None, :]

    counts = keep.sum(dim=-1, dtype=torch.int32)  # [B, Hm, nQ]
    if compact:
        width = int(counts.max()) if counts.numel() else 0
    else:
        width = n_k_blocks
    # One spare column at the end receives the dropped blocks; the returned lists are a view without it.
    lists = torch.zeros(batch, mask_heads, n_q_blocks, width + 1, dtype=torch.int32, device=device)
    if n_k_blocks == 0:
        return lists[..., :width], counts

    # Row-wise compaction without a host sync: kept block kb goes to slot (number of kept blocks up to kb) - 1.
    rows_per_chunk = max(1, _INDEX_CHUNK_ELEMENTS // max(1, batch * mask_heads * n_k_blocks))
    for first in range(0, n_q_blocks, rows_per_chunk):
        rows = slice(first, min(n_q_blocks, first + rows_per_chunk))
        kept = keep[:, :, rows]  # [B, Hm, r, nK]
        slot = torch.where(kept, kept.cumsum(dim=-1, dtype=torch.int32) - 1, width).long()
        lists[:, :, rows].scatter_(-1, slot, key_block_ids.expand(kept.shape))
    return lists[..., :width], counts


SELECTION_METHODS = ("dense", "threshold", "nz_ratio", "token_budget")


def causal_block_allowed(
    n_q_blocks: int,
    n_k_blocks: int,
    *,
    block_size: int,
    q_len: int,
    kv_len: int,
    block_valid: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """bool ``[B or 1, 1, nQ, nK]``: key blocks some row of the query block may see (causal, not all padding).

    With queries the last ``q_len`` of ``kv_len`` positions, key block ``kb`` matters for query block ``qb`` iff
    ``kb * block_size <= min((qb + 1) * block_size, q_len) - 1 + kv_len - q_len``. ``block_valid``: optional bool
    ``[B, nK]`` (False = the key block is only padding).
    """
    device = device if block_valid is None else block_valid.device
    q_block_ids = torch.arange(n_q_blocks, device=device)
    last_row = torch.clamp((q_block_ids + 1) * block_size, max=q_len) - 1 + (kv_len - q_len)  # [nQ]
    allowed = torch.arange(n_k_blocks, device=device)[None, :] * block_size <= last_row[:, None]  # [nQ, nK]
    allowed = allowed[None, None]
    if block_valid is not None:
        allowed = allowed & block_valid[:, None, None, :]
    return allowed


def selection_top_k(method: str, n_k_blocks: int, *, block_size: int, nz_ratio: float, token_budget: int) -> int:
    """Blocks per row kept by a top-k method (forced blocks count among them)."""
    from ..masks import nz_ratio_to_topk

    if method == "nz_ratio":
        return min(n_k_blocks, nz_ratio_to_topk(nz_ratio, n_k_blocks))
    if method == "token_budget":
        return min(n_k_blocks, max(1, token_budget // block_size))
    return n_k_blocks


def check_selection_inputs(
    scores: torch.Tensor,
    method: str,
    block_size: int,
    q_len: int,
    kv_len: int,
    block_valid: torch.Tensor | None,
    local_block: torch.Tensor | None,
) -> None:
    """Validate a block-selection call; raise ValueError naming the bad argument."""
    if method not in SELECTION_METHODS:
        raise ValueError(f"unknown sparsity method {method!r}; expected one of {SELECTION_METHODS}")
    if scores.dim() != 4 or not scores.is_floating_point():
        raise ValueError(f"scores must be a float [B, H, nQ, nK] tensor, got {scores.dtype} {tuple(scores.shape)}")
    batch, _, n_q_blocks, n_k_blocks = scores.shape
    if n_q_blocks != math.ceil(q_len / block_size) or n_k_blocks != math.ceil(kv_len / block_size):
        raise ValueError(
            f"scores {tuple(scores.shape)} do not fit q_len={q_len}, kv_len={kv_len} at block_size={block_size}"
        )
    if block_valid is not None and (block_valid.dtype != torch.bool or block_valid.shape != (batch, n_k_blocks)):
        raise ValueError(f"block_valid must be bool [B, nK] = ({batch}, {n_k_blocks}), got {tuple(block_valid.shape)}")
    if local_block is not None and (
        n_q_blocks != 1
        or local_block.dim() != 1
        or local_block.shape[0] not in (1, batch)
        or local_block.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            f"local_block must be an int [B or 1] tensor for a single query-block row, got {local_block.dtype} "
            f"{tuple(local_block.shape)} with {n_q_blocks} query blocks"
        )


def select_block_lists_reference(
    scores: torch.Tensor,
    *,
    method: str,
    block_size: int,
    q_len: int,
    kv_len: int,
    block_valid: torch.Tensor | None = None,
    apply_softmax: bool = True,
    threshold: float = 5e-4,
    nz_ratio: float = 0.5,
    token_budget: int = 2048,
    sink_block: torch.Tensor | None = None,
    force_local_block: bool = True,
    dense_last_query_blocks: int = 0,
    local_block: torch.Tensor | None = None,
) -> tuple[BlockLists, torch.Tensor]:
    """Gate scores -> kept-block lists, through a boolean mask (`seer_adapter.masks.select_blocks`).

    Args:
        scores: float ``[B, H, nQ, nK]``: gate logits (``apply_softmax=True``: turned into probabilities over the
            allowed blocks of each row) or probabilities / scores used as they are.
        method: one of `SELECTION_METHODS`; threshold, nz_ratio, token_budget: their parameters.
        block_size, q_len, kv_len: geometry (queries are the last ``q_len`` of ``kv_len`` positions).
        block_valid: optional bool ``[B, nK]``: False for key blocks made only of padding.
        sink_block: optional long ``[B]``: key block always kept (the first real token's block).
        force_local_block: always keep the diagonal block.
        dense_last_query_blocks: keep every allowed block in this many final query-block rows.
        local_block: optional long ``[B or 1]`` on the device, for a single query-block row (shape-static decoding
            steps): the row's current block; only blocks up to it are allowed, and it is the local block.

    Returns:
        `BlockLists` (per head of ``scores``) and ``allowed_counts`` int32 ``[B, H, nQ]`` (allowed blocks per row).
    """
    from ..masks import select_blocks

    check_selection_inputs(scores, method, block_size, q_len, kv_len, block_valid, local_block)
    n_q_blocks, n_k_blocks = scores.shape[-2:]
    allowed = causal_block_allowed(
        n_q_blocks, n_k_blocks, block_size=block_size, q_len=q_len, kv_len=kv_len, block_valid=block_valid,
        device=scores.device,
    )  # fmt: skip
    if local_block is not None:
        up_to_local = torch.arange(n_k_blocks, device=scores.device)[None, :] <= local_block[:, None]  # [B or 1, nK]
        allowed = allowed & up_to_local[:, None, None, :]
    allowed = allowed.expand_as(scores)
    probs = scores.float()
    if apply_softmax:
        probs = torch.softmax(probs.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    keep = select_blocks(
        probs,
        allowed,
        method=method,
        block_size=block_size,
        threshold=threshold,
        nz_ratio=nz_ratio,
        token_budget=token_budget,
        sink_block=sink_block,
        force_local_block=force_local_block,
        dense_last_query_blocks=dense_last_query_blocks,
        local_block=local_block,
    )
    indices, counts = block_mask_to_indices(keep, block_size=block_size, q_len=q_len, kv_len=kv_len)
    return BlockLists(indices, counts, n_k_blocks), allowed.sum(dim=-1, dtype=torch.int32)
