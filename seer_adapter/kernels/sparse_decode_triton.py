"""Split-KV sparse decode attention in Triton (FlashDecoding over listed key blocks), GQA-native.

Same contract as `seer_adapter.kernels.sparse_decode.sparse_decode_reference`.

How it works:

* Grid ``(B * Hkv, n_splits)``. Program ``(b·Hkv + h, s)`` owns KV head ``h`` of sequence ``b`` and the ``s``-th
  contiguous chunk of that head's block list (``per_split`` entries).
* **All query heads of the GQA group in one tile**: the ``g`` queries of the group are the rows of a
  ``[BLOCK_H, D]`` tile (``BLOCK_H = max(16, next_pow2(g))``, extra rows masked), so every K/V tile is loaded once
  for the whole group and the scores are one ``tl.dot``.
* The listed blocks are walked in ``BLOCK_N``-slot tiles with an online softmax in the log2 domain: a block larger
  than a tile takes several tiles, and blocks smaller than a tile share one (``BLOCK_N / BLOCK_SIZE`` list entries
  gathered per tile), so 16-token blocks run the same number of 64-row ``tl.dot`` steps as 64-token ones instead of
  four times as many quarter-full ones. Slots past the end of the cache, marked padding or past the split's last
  entry are masked element-wise.
* Each program writes its normalised partial output ``[BLOCK_H, D]`` and its log-sum-exp (fp32); a second small
  kernel (one program per query head) merges the splits with the log-sum-exp, as `combine_split_results` does,
  and writes the output in the query dtype (an empty split has ``lse = -inf`` and weight 0).
* Two launches and four allocations per call, no host synchronisation: a decoding step is short, so host time per
  call matters as much as the kernel (measured: the combine in PyTorch ops cost more than the kernel).

Forward only (the base model runs frozen).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import on_tensor_device, register_backend
from .sparse_decode import check_decode_inputs

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Programs to aim for when choosing the number of splits: enough blocks in flight to reach HBM bandwidth (each
# program streams its blocks one after another; ~8 resident programs per SM on an H100/H200 with 132 SMs).
_TARGET_PROGRAMS = 1056
# At most this many splits per list (the combine kernel holds [splits, D] partial outputs in registers).
_MAX_SPLITS = 64


@triton.jit
def _sparse_decode_split_kernel(
    Q,
    K,
    V,
    Indices,
    Counts,
    Padding,
    OutPartial,
    LsePartial,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_ib,
    stride_ih,
    stride_iw,
    stride_pb,
    stride_ps,
    kv_len,
    num_kv_heads,
    per_split,
    n_splits,
    scale_log2,
    softcap,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPAN: tl.constexpr,  # min(BLOCK_SIZE, BLOCK_N): slots of one list entry inside a tile
    HAS_PADDING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    # int64 batch/head offsets: b * stride_kb exceeds int32 at batch 16 x 128k x Hkv 8 x D 128
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h = (pid_bh % num_kv_heads).to(tl.int64)
    rows = tl.arange(0, BLOCK_H)  # query heads of the group
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < GROUP
    dim_ok = dims < HEAD_DIM
    q_ptrs = Q + b * stride_qb + (h * GROUP + rows)[:, None] * stride_qh + dims[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]

    count = tl.load(Counts + pid_bh)
    start = split * per_split
    stop = tl.minimum(start + per_split, count)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_N)
    for first in range(start, stop, BLOCK_N // SPAN):
        entry = first + cols // SPAN  # [BLOCK_N] list entry of each slot (all equal when BLOCK_SIZE >= BLOCK_N)
        entry_ok = entry < stop
        block = tl.load(Indices + b * stride_ib + h * stride_ih + entry * stride_iw, mask=entry_ok, other=0)
        for offset in range(0, BLOCK_SIZE, BLOCK_N):  # one pass when BLOCK_SIZE <= BLOCK_N
            slots = block * BLOCK_SIZE + offset + cols % SPAN  # [BLOCK_N]
            slot_ok = entry_ok & (slots < kv_len)
            if HAS_PADDING:
                real = tl.load(Padding + b * stride_pb + slots * stride_ps, mask=slot_ok, other=0)
                slot_ok = slot_ok & (real != 0)
            k_ptrs = K + b * stride_kb + h * stride_kh + slots[:, None] * stride_ks + dims[None, :] * stride_kd
            k = tl.load(k_ptrs, mask=slot_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            if IEEE_DOT:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))  # [BLOCK_H, BLOCK_N] fp32
            if HAS_SOFTCAP:
                # softcap * tanh(s * scale / softcap), tanh written with exp for portability
                x = s * (scale_log2 / LOG2E) / softcap
                t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
                s = softcap * t * LOG2E
            else:
                s = s * scale_log2
            s = tl.where(slot_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_ptrs = V + b * stride_vb + h * stride_vh + slots[:, None] * stride_vs + dims[None, :] * stride_vd
            v = tl.load(v_ptrs, mask=slot_ok[:, None] & dim_ok[None, :], other=0.0)
            if IEEE_DOT:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    base = (pid_bh * n_splits + split) * BLOCK_H
    o_ptrs = OutPartial + (base + rows)[:, None] * HEAD_DIM + dims[None, :]
    tl.store(o_ptrs, out, mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(LsePartial + base + rows, lse, mask=row_ok)


@triton.jit
def _combine_splits_kernel(
    OutPartial,
    LsePartial,
    Out,
    Lse,
    n_splits,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # one program per query head: pid = (b * Hkv + h) * GROUP + r
    pid = tl.program_id(0)
    bh = pid // GROUP
    r = pid % GROUP
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < n_splits
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    rows = (bh * n_splits + splits).to(tl.int64) * BLOCK_H + r  # [BLOCK_S] rows of the partial buffers
    lse = tl.load(LsePartial + rows, mask=split_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weights = tl.exp(lse - m_safe)  # empty splits (lse = -inf) weigh 0
    total = tl.sum(weights, axis=0)
    partial = tl.load(OutPartial + rows[:, None] * HEAD_DIM + dims[None, :], mask=split_ok[:, None] & dim_ok[None, :],
                      other=0.0)  # fmt: skip
    out = tl.sum(partial * weights[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(Out + pid.to(tl.int64) * HEAD_DIM + dims, out.to(Out.dtype.element_ty), mask=dim_ok)
    tl.store(Lse + pid, tl.where(total > 0.0, m_safe + tl.log(tl.where(total > 0.0, total, 1.0)), float("-inf")))


def _num_splits(batch: int, num_kv_heads: int, width: int) -> int:
    """Splits of each block list so that the grid has about `_TARGET_PROGRAMS` programs (at least one entry each,
    at most `_MAX_SPLITS`)."""
    return max(1, min(width, _MAX_SPLITS, math.ceil(_TARGET_PROGRAMS / max(1, batch * num_kv_heads))))


def sparse_decode_triton(
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
    num_splits: int | None = None,
    tile_slots: int = 64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `sparse_decode_reference`, any power-of-two ``block_size``.

    ``num_splits`` overrides the split heuristic (tests); ``tile_slots`` (a power of two >= 16) is the number of key
    slots per ``tl.dot`` tile, gathered from ``tile_slots / block_size`` list entries when blocks are smaller.
    """
    check_decode_inputs(q, k, v, block_indices, counts, block_size, key_padding_mask)
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"sparse_decode_triton needs q, k, v of one dtype in {_SUPPORTED_DTYPES}")
    batch, hq, head_dim = q.shape
    _, hkv, kv_len, _ = k.shape
    if head_dim < 16:
        raise ValueError(
            f"sparse_decode_triton needs head_dim >= 16 (tl.dot tiles), got {head_dim}; use backend='reference'"
        )
    if block_size & (block_size - 1) or tile_slots < 16 or tile_slots & (tile_slots - 1):
        raise ValueError(
            f"sparse_decode_triton needs a power-of-two block_size and tile_slots >= 16 (a power of two), got "
            f"block_size={block_size}, tile_slots={tile_slots}"
        )
    group = hq // hkv
    width = block_indices.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    splits = num_splits or _num_splits(batch, hkv, max(width, 1))
    if not 1 <= splits <= 4 * _MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {4 * _MAX_SPLITS}], got {splits}")
    span = min(block_size, tile_slots)
    entries_per_tile = tile_slots // span
    # whole tiles per split (a split's last tile is the only partial one); the heuristic then drops the splits this
    # leaves empty, an explicit num_splits is kept (tests use it to reach empty splits)
    per_split = entries_per_tile * math.ceil(max(1, math.ceil(width / splits)) / entries_per_tile)
    if num_splits is None:
        splits = max(1, math.ceil(width / per_split))
    block_h = max(16, triton.next_power_of_2(group))
    indices = block_indices if block_indices.dtype == torch.int32 else block_indices.to(torch.int32)
    counts32 = counts if counts.dtype == torch.int32 and counts.is_contiguous() else counts.to(torch.int32).contiguous()
    partial_out = torch.empty(batch, hkv, splits, block_h, head_dim, dtype=torch.float32, device=q.device)
    partial_lse = torch.empty(batch, hkv, splits, block_h, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, hq, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, hq, dtype=torch.float32, device=q.device)
    padding = key_padding_mask.view(torch.int8) if key_padding_mask is not None else counts32  # dummy pointer
    pad_strides = (padding.stride(0), padding.stride(1)) if key_padding_mask is not None else (0, 0)
    block_d = triton.next_power_of_2(head_dim)
    with on_tensor_device(q):
        _sparse_decode_split_kernel[(batch * hkv, splits)](
            q, k, v, indices, counts32, padding, partial_out, partial_lse,
            *q.stride(), *k.stride(), *v.stride(), *indices.stride(), *pad_strides,
            kv_len, hkv, per_split, splits, scale * 1.4426950408889634, float(softcap or 1.0),
            GROUP=group, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d,
            BLOCK_SIZE=block_size, BLOCK_N=tile_slots, SPAN=span, HAS_PADDING=key_padding_mask is not None,
            HAS_SOFTCAP=softcap is not None, IEEE_DOT=q.dtype == torch.float32,
        )  # fmt: skip
        _combine_splits_kernel[(batch * hq,)](
            partial_out, partial_lse, out, lse, splits,
            GROUP=group, BLOCK_H=block_h, HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_S=max(2, triton.next_power_of_2(splits)),
        )  # fmt: skip
    return (out, lse) if return_lse else out


register_backend("triton", sparse_decode_triton, device_types=("cuda",), op="decode")
