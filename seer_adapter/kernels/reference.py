"""Pure-PyTorch reference of block-sparse causal attention: the test oracle and the CPU path.

Conventions shared by every kernel of this package:

* ``q`` is ``[B, Hq, S, D]``; ``k`` and ``v`` are ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0``. Query head
  ``h`` reads KV head ``h // (Hq // Hkv)``; K/V are never expanded (no ``repeat_kv``).
* The queries are the *last* ``S`` of the ``Sk`` key positions, so query row ``i`` may see key column
  ``j`` iff ``j <= i + (Sk - S)`` (causal, bottom-right aligned, as with a KV cache).
* ``block_mask`` is boolean ``[B, Hm, nQ, nK]`` with ``nQ = ceil(S / block_size)`` query blocks over the
  query rows and ``nK = ceil(Sk / block_size)`` key blocks over the key columns; ``Hm`` is ``Hq`` (one mask
  per query head) or ``Hkv`` (one mask per KV head, shared by its query group). Blocks above the causal
  diagonal may be set; causality is applied element-wise anyway.
* ``key_padding_mask`` is boolean ``[B, Sk]``, True where the key is a real token.
* A query row that may see no key at all (padding rows, or a row whose blocks were all dropped) gets an
  all-zero output and ``lse = -inf``; it never produces NaN.
"""

from __future__ import annotations

import math

import torch

# Upper bound on fp32 score elements materialised at once: 2**27 * 4 B = 512 MiB per chunk.
_MAX_SCORE_ELEMENTS = 1 << 27


def expand_block_mask(block_mask: torch.Tensor, q_len: int, kv_len: int, block_size: int) -> torch.Tensor:
    """Token-level view of a block mask.

    Args:
        block_mask: bool ``[..., nQ, nK]``.
    Returns:
        bool ``[..., q_len, kv_len]`` (a copy).
    """
    expanded = block_mask.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    return expanded[..., :q_len, :kv_len]


def causal_token_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """bool ``[q_len, kv_len]``: query row i sees key j iff j <= i + (kv_len - q_len)."""
    rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return torch.arange(kv_len, device=device)[None, :] <= rows


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = 64,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse causal attention computed in fp32, one chunk of query blocks at a time.

    Args:
        q: ``[B, Hq, S, D]``.
        k, v: ``[B, Hkv, Sk, D]``, ``Sk >= S``.
        block_mask: bool ``[B, Hm, nQ, nK]``, ``Hm`` in ``{Hq, Hkv}`` (see module docstring).
        block_size: tokens per block (default 64).
        scale: softmax scale; default ``1 / sqrt(D)``.
        key_padding_mask: optional bool ``[B, Sk]``, True for real tokens.
        softcap: optional logit soft-capping ``cap * tanh(s / cap)`` (Gemma 2).
        return_lse: also return the natural-log sum-exp of the kept, scaled logits.

    Returns:
        ``out [B, Hq, S, D]`` in ``q.dtype``; with ``return_lse`` also ``lse [B, Hq, S]`` fp32.
    """
    batch, hq, q_len, head_dim = q.shape
    _, hkv, kv_len, _ = k.shape
    n_q_blocks = math.ceil(q_len / block_size)
    group = hq // hkv
    check_attention_inputs(q, k, v, block_mask, block_size, key_padding_mask)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    # Per-query-head masks are viewed as [B, Hkv, g, nQ, nK]; per-KV-head masks broadcast over g.
    mask_heads = block_mask.shape[1]
    block_mask = block_mask.view(batch, hkv, group if mask_heads == hq else 1, *block_mask.shape[2:])

    q_grouped = q.reshape(batch, hkv, group, q_len, head_dim).float()  # [B, Hkv, g, S, D]
    k32, v32 = k.float(), v.float()  # [B, Hkv, Sk, D]
    causal = causal_token_mask(q_len, kv_len, q.device)  # [S, Sk]
    out = torch.empty(batch, hkv, group, q_len, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, hkv, group, q_len, dtype=torch.float32, device=q.device)

    blocks_per_chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, batch * hq * block_size * kv_len))
    for first in range(0, n_q_blocks, blocks_per_chunk):
        last = min(n_q_blocks, first + blocks_per_chunk)
        rows = slice(first * block_size, min(q_len, last * block_size))
        n_rows = rows.stop - rows.start
        scores = torch.einsum("bhgqd,bhkd->bhgqk", q_grouped[:, :, :, rows], k32) * scale  # [B, Hkv, g, r, Sk]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        allowed = expand_block_mask(block_mask[..., first:last, :], n_rows, kv_len, block_size)
        allowed = allowed & causal[rows]
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask[:, None, None, None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        probs = torch.exp(scores - row_max)  # exp(-inf) = 0 for masked entries
        denom = probs.sum(dim=-1, keepdim=True)
        safe = torch.where(denom > 0, denom, torch.ones_like(denom))
        out[:, :, :, rows] = torch.einsum("bhgqk,bhkd->bhgqd", probs / safe, v32)
        lse[:, :, :, rows] = torch.where(denom > 0, row_max + torch.log(safe), float("-inf")).squeeze(-1)

    out = out.reshape(batch, hq, q_len, head_dim).to(q.dtype)
    if return_lse:
        return out, lse.reshape(batch, hq, q_len)
    return out


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    key_padding_mask: torch.Tensor | None,
) -> None:
    """Validate shapes of a block-sparse attention call; raise ValueError naming the bad argument."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            "expected q [B, Hq, S, D] and k, v [B, Hkv, Sk, D]; "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, hq, q_len, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    hkv, kv_len = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if kv_len < q_len:
        raise ValueError(f"key length {kv_len} is shorter than query length {q_len}")
    n_q, n_k = math.ceil(q_len / block_size), math.ceil(kv_len / block_size)
    if block_mask.dtype != torch.bool or block_mask.dim() != 4:
        raise ValueError(
            f"block_mask must be a bool [B, H, nQ, nK] tensor, got {block_mask.dtype} {tuple(block_mask.shape)}"
        )
    if block_mask.shape[0] != batch or block_mask.shape[1] not in (hq, hkv) or block_mask.shape[2:] != (n_q, n_k):
        raise ValueError(
            f"block_mask shape {tuple(block_mask.shape)} does not fit q {tuple(q.shape)} / k {tuple(k.shape)} at "
            f"block_size {block_size}: expected ({batch}, {hq} or {hkv}, {n_q}, {n_k})"
        )
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (batch, kv_len)
    ):
        raise ValueError(
            f"key_padding_mask must be bool [B, Sk] = ({batch}, {kv_len}), "
            f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )
