"""Sparse decode attention: one new query token per sequence attends to listed key blocks only.

Conventions (shared by `sparse_decode_reference`, the test oracle and CPU path, and the Triton kernel of
`sparse_decode_triton.py`):

* ``q`` is ``[B, Hq, D]`` (the single new token of each sequence); ``k, v`` are the KV cache ``[B, Hkv, Sk, D]``
  with the new token already appended at slot ``Sk - 1``; query head ``h`` reads KV head ``h // (Hq // Hkv)``.
* ``block_indices`` int32 ``[B, Hkv, W]`` lists the key blocks (of ``block_size`` slots, the last one possibly
  partial) each KV head attends to, **one list per KV head** shared by its query group; only the first
  ``counts[b, h]`` entries are read. Entries must be distinct and ``< ceil(Sk / block_size)``; order is free.
* ``key_padding_mask`` bool ``[B, Sk]`` (True = real token) removes padding slots inside the listed blocks.
* Every slot ``< Sk`` is causally visible (the query is the last slot).
* A head that sees no key gets a zero output and ``lse = -inf`` (never NaN).
"""

from __future__ import annotations

import math

import torch


def check_decode_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    counts: torch.Tensor,
    block_size: int,
    key_padding_mask: torch.Tensor | None,
) -> None:
    """Validate a sparse decode call; raise ValueError naming the bad argument."""
    if q.dim() != 3 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"expected q [B, Hq, D] and k, v [B, Hkv, Sk, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, hq, head_dim = q.shape
    _, hkv, kv_len, _ = k.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if kv_len < 1:
        raise ValueError("the KV cache is empty: the new token must be appended before decoding")
    if block_indices.dim() != 3 or tuple(block_indices.shape[:2]) != (batch, hkv):
        raise ValueError(f"block_indices must be int [B={batch}, Hkv={hkv}, W], got {tuple(block_indices.shape)}")
    if block_indices.dtype not in (torch.int32, torch.int64) or counts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_indices and counts must be int32/int64, got {block_indices.dtype}, {counts.dtype}")
    if tuple(counts.shape) != (batch, hkv):
        raise ValueError(f"counts must be [B={batch}, Hkv={hkv}], got {tuple(counts.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, kv_len)
    ):
        raise ValueError(
            f"key_padding_mask must be bool [B, Sk] = [{batch}, {kv_len}], got "
            f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )


def decode_lists_to_token_mask(
    block_indices: torch.Tensor, counts: torch.Tensor, kv_len: int, block_size: int
) -> torch.Tensor:
    """bool ``[B, Hkv, Sk]``: slots inside a listed block (entries past ``counts`` ignored)."""
    n_blocks = math.ceil(kv_len / block_size)
    width = block_indices.shape[-1]
    real = torch.arange(width, device=block_indices.device) < counts[..., None]  # [B, Hkv, W]
    if bool(((block_indices < 0) | (block_indices >= n_blocks))[real].any()):
        raise ValueError(f"block_indices hold a block outside [0, {n_blocks}) for a cache of {kv_len} slots")
    target = torch.where(real, block_indices.long(), n_blocks)
    blocks = torch.zeros(*counts.shape, n_blocks + 1, dtype=torch.bool, device=block_indices.device)
    blocks = blocks.scatter_(-1, target, True)[..., :n_blocks]  # [B, Hkv, nB]
    return blocks.repeat_interleave(block_size, dim=-1)[..., :kv_len]


def sparse_decode_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    counts: torch.Tensor,
    *,
    block_size: int = 64,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse decode attention in fp32 (see module docstring for the conventions).

    Args:
        q: ``[B, Hq, D]``; k, v: ``[B, Hkv, Sk, D]``.
        block_indices: int ``[B, Hkv, W]``; counts: int ``[B, Hkv]``.
        block_size: slots per key block. scale: softmax scale (default ``1/sqrt(D)``).
        key_padding_mask: optional bool ``[B, Sk]``. softcap: optional logit soft-capping.
        return_lse: also return the natural-log sum-exp ``[B, Hq]`` fp32.

    Returns:
        ``out [B, Hq, D]`` in ``q.dtype`` (and ``lse``).
    """
    check_decode_inputs(q, k, v, block_indices, counts, block_size, key_padding_mask)
    batch, hq, head_dim = q.shape
    _, hkv, kv_len, _ = k.shape
    group = hq // hkv
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    visible = decode_lists_to_token_mask(block_indices, counts, kv_len, block_size)  # [B, Hkv, Sk]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, :]
    qg = q.float().view(batch, hkv, group, head_dim)
    scores = torch.einsum("bhgd,bhsd->bhgs", qg, k.float()) * scale  # [B, Hkv, g, Sk]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, g]
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # rows without a key: 0
    out = torch.einsum("bhgs,bhsd->bhgd", probs, v.float()).reshape(batch, hq, head_dim).to(q.dtype)
    return (out, lse.reshape(batch, hq)) if return_lse else out


def combine_split_results(partial_out: torch.Tensor, partial_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge split-KV partial results with the log-sum-exp.

    Args:
        partial_out: fp32 ``[..., n_splits, D]``, each normalised within its split (zero for empty splits).
        partial_lse: fp32 ``[..., n_splits]`` natural-log sum-exp of each split (``-inf`` for empty splits).

    Returns:
        ``out [..., D]`` fp32 and ``lse [...]`` fp32 (``-inf`` and zeros when every split is empty).
    """
    lse = torch.logsumexp(partial_lse, dim=-1)  # [...]
    weights = torch.exp(partial_lse - lse[..., None]).nan_to_num(0.0)  # [..., n_splits]
    return (weights[..., None] * partial_out).sum(dim=-2), lse
