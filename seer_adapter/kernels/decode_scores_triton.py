"""Decode-gate scores of one decoding step in one Triton launch (same contract as `decode_scores`).

The PyTorch path is some twenty small kernels per layer and step (dtype conversions, inverse RoPE, a head-major
reshape, the merge, RoPE again, the dot products, a concatenation); at batch 8 each moves a few kilobytes, so the
step costs their launches, not their work. Here one program per (row, KV head) does everything in registers:

* RoPE pairs channel ``i`` with a partner ``p(i)`` (``i ± r/2`` for ``"half"``, ``i ^ 1`` for the interleaved
  styles). Registers cannot be permuted, so the partner values are *loaded* instead: the query at ``p(i)`` for the
  inverse rotation, and the merge weight's rows at ``p(i)`` for the rotation of the merged query
  (``merged[p(i)] = W[p(i)] · q``); the weight is read twice, from L2 the second time.
* The merge streams the weight in ``[G, BLOCK_K]`` tiles over the ``g·D`` input channels.
* The scores stream the compressed keys in ``[BLOCK_C, G]`` tiles, written straight into the selection layout
  ``[B, Hkv, 1, n_earlier + 1]`` with the current block's lowest-float column.

Bytes per program: ``g·D·G`` weight elements (twice, shared by the batch rows through L2) and ``n_earlier·G`` key
elements; at Llama-3-8B shape (``g·D = 512``, ``G = 128``) and 64k tokens, 0.5 MB of fp32 weight and 0.5 MB of keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import on_tensor_device, register_backend
from .decode_scores import check_decode_score_inputs

__all__ = ["decode_gate_scores_triton"]

# rope_style -> (pairing: 0 none, 1 half, 2 interleaved; table: 0 channel i reads entry i, 1 reads entry i // 2)
_ROPE_CODES = {None: (0, 0), "half": (1, 0), "interleaved": (2, 0), "interleaved_half_table": (2, 1)}


@triton.jit
def _rope_partner(offs, ROT: tl.constexpr, PAIRING: tl.constexpr):
    """Partner channel and sign of ``rotate(x)[i] = sign * x[partner]``; channels ``>= ROT`` pass through."""
    if PAIRING == 1:
        half = ROT // 2
        partner = tl.where(offs < half, offs + half, offs - half)
        sign = tl.where(offs < half, -1.0, 1.0)
    else:
        partner = offs ^ 1
        sign = tl.where((offs % 2) == 0, -1.0, 1.0)
    rotated = offs < ROT
    return tl.where(rotated, partner, offs), tl.where(rotated, sign, 0.0)


@triton.jit
def _rope_table(Table, row_offset, offs, ROT: tl.constexpr, TABLE: tl.constexpr, other: tl.constexpr):
    """Table value of each channel (``other`` past the rotary width)."""
    idx = offs // 2 if TABLE == 1 else offs
    return tl.load(Table + row_offset + idx, mask=offs < ROT, other=other).to(tl.float32)


@triton.jit
def _decode_scores_kernel(
    Q, Cos, Sin, W, Keys, Out,
    stride_qb, stride_qh,
    stride_tb,
    stride_wh, stride_wo,
    stride_kb, stride_kh, stride_kc,
    stride_ob, stride_oh,
    n_kv_heads, n_earlier, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, GATE_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    ROT: tl.constexpr, PAIRING: tl.constexpr, TABLE: tl.constexpr,
):  # fmt: skip
    """Grid (B * Hkv,). Q [B, Hq, D], Cos/Sin [B or 1, r] (row stride 0 when shared), W [Hkv, G, g·D],
    Keys [B, Hkv, nC, G], Out fp32 [B, Hkv, 1, n_earlier + 1]; every last dimension contiguous."""
    pid = tl.program_id(0)
    batch = (pid // n_kv_heads).to(tl.int64)
    head = (pid % n_kv_heads).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < GATE_DIM
    table_row = batch * stride_tb
    w_head = W + head * stride_wh
    merged = tl.zeros([BLOCK_G], dtype=tl.float32)  # W · q_pre
    merged_partner = tl.zeros([BLOCK_G], dtype=tl.float32)  # (W · q_pre)[p(i)] = W[p(i)] · q_pre
    if PAIRING != 0:
        g_partner, g_sign = _rope_partner(offs_g, ROT, PAIRING)
    for r in tl.static_range(GROUP):
        q_row = Q + batch * stride_qb + (head * GROUP + r) * stride_qh
        for d0 in tl.static_range(0, HEAD_DIM, BLOCK_K):
            offs_d = d0 + tl.arange(0, BLOCK_K)
            d_ok = offs_d < HEAD_DIM
            q = tl.load(q_row + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            if PAIRING != 0:  # undo RoPE: x = y cos - rotate(y) sin
                d_partner, d_sign = _rope_partner(offs_d, ROT, PAIRING)
                q_partner = tl.load(q_row + d_partner, mask=d_ok, other=0.0).to(tl.float32)
                cos = _rope_table(Cos, table_row, offs_d, ROT, TABLE, 1.0)
                sin = _rope_table(Sin, table_row, offs_d, ROT, TABLE, 0.0)
                q = q * cos - d_sign * q_partner * sin
            q = q.to(W.dtype.element_ty).to(tl.float32)  # the merge's input in the gate dtype, as the reference
            cols = r * HEAD_DIM + offs_d
            tile_ok = g_ok[:, None] & d_ok[None, :]
            w = tl.load(w_head + offs_g[:, None] * stride_wo + cols[None, :], mask=tile_ok, other=0.0)
            merged += tl.sum(w.to(tl.float32) * q[None, :], axis=1)
            if PAIRING != 0:
                w = tl.load(w_head + g_partner[:, None] * stride_wo + cols[None, :], mask=tile_ok, other=0.0)
                merged_partner += tl.sum(w.to(tl.float32) * q[None, :], axis=1)
    q_gate = merged
    if PAIRING != 0:  # rotate the merged query at the token's position
        cos = _rope_table(Cos, table_row, offs_g, ROT, TABLE, 1.0)
        sin = _rope_table(Sin, table_row, offs_g, ROT, TABLE, 0.0)
        q_gate = merged * cos + g_sign * merged_partner * sin
    out_row = Out + batch * stride_ob + head * stride_oh
    k_head = Keys + batch * stride_kb + head * stride_kh
    for c0 in range(0, n_earlier, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < n_earlier
        k = tl.load(k_head + offs_c[:, None].to(tl.int64) * stride_kc + offs_g[None, :],
                    mask=c_ok[:, None] & g_ok[None, :], other=0.0)  # fmt: skip
        tl.store(out_row + offs_c, tl.sum(k.to(tl.float32) * q_gate[None, :], axis=1) * scale, mask=c_ok)
    tl.store(out_row + n_earlier, -3.4028234663852886e38)  # the current block: lowest finite float


def decode_gate_scores_triton(
    q: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    q_weight: torch.Tensor,
    keys: torch.Tensor,
    n_earlier: int,
    *,
    rope_style: str = "half",
    scale: float = 1.0,
) -> torch.Tensor:
    """Same contract as `decode_scores.decode_gate_scores_reference`, one Triton program per (row, KV head)."""
    check_decode_score_inputs(q, cos, sin, q_weight, keys, n_earlier, rope_style)
    batch, hq, head_dim = q.shape
    hkv, gate_dim, _ = q_weight.shape
    q, q_weight, keys = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, q_weight, keys))
    out = torch.empty(batch, hkv, 1, n_earlier + 1, dtype=torch.float32, device=q.device)
    pairing, table = _ROPE_CODES[None if cos is None else rope_style]
    rot = 0 if cos is None else cos.shape[-1]
    if cos is None:
        cos = sin = out  # never read
        table_stride = 0
    else:
        cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
        table_stride = cos.stride(0) if cos.shape[0] == batch and batch > 1 else 0
    with on_tensor_device(q):
        _decode_scores_kernel[(batch * hkv,)](
            q, cos, sin, q_weight, keys, out,
            q.stride(0), q.stride(1),
            table_stride,
            q_weight.stride(0), q_weight.stride(1),
            keys.stride(0), keys.stride(1), keys.stride(2),
            out.stride(0), out.stride(1),
            hkv, n_earlier, float(scale),
            GROUP=hq // hkv, HEAD_DIM=head_dim, GATE_DIM=gate_dim,
            BLOCK_G=triton.next_power_of_2(gate_dim), BLOCK_K=min(32, triton.next_power_of_2(head_dim)),
            BLOCK_C=32, ROT=rot, PAIRING=pairing, TABLE=table,
        )  # fmt: skip
    return out


register_backend("triton", decode_gate_scores_triton, device_types=("cuda",), op="decode_scores")
