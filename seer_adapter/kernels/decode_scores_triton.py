"""Decode-gate scores of one decoding step in one Triton launch (same contract as `decode_scores`).

The PyTorch path is some twenty small kernels per layer and step (dtype conversions, inverse RoPE, a head-major
reshape, the merge, RoPE again, the dot products, a concatenation); at batch 8 each moves a few kilobytes, so the
step costs their launches, not their work. Here two launches do it: one program per (row, KV head) makes the merged,
rotated gate query in registers, then one program per (row, KV head, chunk of 64 blocks) scores the keys (a single
program per (row, KV head) walking a 64k cache's 1024 blocks took 38 µs on the H200, latency-bound):

* RoPE pairs channel ``i`` with a partner ``p(i)`` (``i ± r/2`` for ``"half"``, ``i ^ 1`` for the interleaved
  styles). Registers cannot be permuted, so the partner values are *loaded* instead: the query at ``p(i)`` for the
  inverse rotation, and the merge weight's rows at ``p(i)`` for the rotation of the merged query
  (``merged[p(i)] = W[p(i)] · q``); the weight is read twice, from L2 the second time.
* The merge streams the weight in ``[G, BLOCK_K]`` tiles over the ``g·D`` input channels.
* With ``m > 1`` gate queries (``q_weight [Hkv, m·G, g·D]``) the query kernel runs one program per gate query and
  the score kernel scores each key tile against the ``m`` queries: the keys are read once whatever ``m``. The
  ``"logsumexp"`` merge happens there, online in registers. The ``"mixture"`` merge needs each query's normaliser
  over all earlier blocks, which no single chunk program sees: the score kernel writes the ``m`` rows of logits
  (``[B·Hkv, m, width]`` fp32, a few MB at 64k), and a third kernel, one program per (row, KV head), makes two
  passes over them in ``[m, BLOCK_W]`` tiles (the normalisers by an online logsumexp, then the merged scores).
* The scores read the compressed keys in ``[BLOCK_C, G]`` tiles, written straight into the selection layout
  ``[B, Hkv, 1, n_earlier + 1]`` with the current block's lowest-float column; ``n_earlier`` may be a device tensor
  (shape-static decoding steps), then every column from it on is the lowest float.

Bytes per program: ``g·D·G`` weight elements (twice, shared by the batch rows through L2) and ``n_earlier·G`` key
elements; at Llama-3-8B shape (``g·D = 512``, ``G = 128``) and 64k tokens, 0.5 MB of fp32 weight and 0.5 MB of keys.
"""

from __future__ import annotations

import math

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
def _decode_query_kernel(
    Q, Cos, Sin, W, QGate,
    stride_qb, stride_qh,
    stride_tb,
    stride_wh, stride_wo,
    n_kv_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, GATE_DIM: tl.constexpr, N_QUERIES: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
    ROT: tl.constexpr, PAIRING: tl.constexpr, TABLE: tl.constexpr,
):  # fmt: skip
    """Grid (B * Hkv * m,). Gate query ``j`` of one (row, KV head), merged and rotated: QGate fp32
    [B * Hkv * m, G]. Q [B, Hq, D], Cos/Sin [B or 1, r] (row stride 0 when shared), W [Hkv, m·G, g·D]; last
    dimensions contiguous."""
    pid = tl.program_id(0)
    query = pid % N_QUERIES
    batch = (pid // (n_kv_heads * N_QUERIES)).to(tl.int64)
    head = ((pid // N_QUERIES) % n_kv_heads).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < GATE_DIM
    table_row = batch * stride_tb
    w_head = W + head * stride_wh + (query * GATE_DIM).to(tl.int64) * stride_wo  # this gate query's G rows
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
    tl.store(QGate + pid.to(tl.int64) * GATE_DIM + offs_g, q_gate, mask=g_ok)


@triton.jit
def _decode_block_scores_kernel(
    QGate, Keys, Out, NEarlier,
    stride_kb, stride_kh, stride_kc,
    stride_ob, stride_oh,
    n_kv_heads, n_earlier, width, scale,
    GATE_DIM: tl.constexpr, N_QUERIES: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
    N_ON_DEVICE: tl.constexpr, PER_QUERY: tl.constexpr,
):  # fmt: skip
    """Grid (B * Hkv, cdiv(width, BLOCK_C)). Out fp32 [B, Hkv, 1, width]: columns below the number of earlier blocks
    (``n_earlier``, or read from ``NEarlier`` [1] when N_ON_DEVICE) get ``q_gate · key * scale`` (the logsumexp over
    the N_QUERIES gate queries of QGate [B * Hkv * m, G]), the others the lowest finite float (the current block, and
    with N_ON_DEVICE the blocks after it). PER_QUERY: Out is [B * Hkv, m, width] instead, each query's raw logits
    (every column; `_merge_mixture_kernel` reads the scored ones)."""
    pid = tl.program_id(0)
    batch = (pid // n_kv_heads).to(tl.int64)
    head = (pid % n_kv_heads).to(tl.int64)
    if N_ON_DEVICE:
        n_earlier = tl.load(NEarlier).to(tl.int32)
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < GATE_DIM
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    scored = offs_c < n_earlier
    q_rows = QGate + pid.to(tl.int64) * N_QUERIES * GATE_DIM
    k_head = Keys + batch * stride_kb + head * stride_kh
    k = tl.load(k_head + offs_c[:, None].to(tl.int64) * stride_kc + offs_g[None, :],
                mask=scored[:, None] & g_ok[None, :], other=0.0)  # fmt: skip
    k = k.to(tl.float32)
    q_gate = tl.load(q_rows + offs_g, mask=g_ok, other=0.0)
    scores = tl.sum(k * q_gate[None, :], axis=1) * scale
    if PER_QUERY:
        out_rows = Out + pid.to(tl.int64) * N_QUERIES * width
        tl.store(out_rows + offs_c, scores, mask=offs_c < width)
        for query in tl.static_range(1, N_QUERIES):
            q_gate = tl.load(q_rows + query * GATE_DIM + offs_g, mask=g_ok, other=0.0)
            scores = tl.sum(k * q_gate[None, :], axis=1) * scale
            tl.store(out_rows + query * width + offs_c, scores, mask=offs_c < width)
        return
    if N_QUERIES > 1:  # online logsumexp over the gate queries (natural log, as torch.logsumexp)
        total = tl.full([BLOCK_C], 1.0, tl.float32)  # sum of exp(score_j - scores), scores the running max
        for query in tl.static_range(1, N_QUERIES):
            q_gate = tl.load(q_rows + query * GATE_DIM + offs_g, mask=g_ok, other=0.0)
            other = tl.sum(k * q_gate[None, :], axis=1) * scale
            high = tl.maximum(scores, other)
            total = total * tl.exp(scores - high) + tl.exp(other - high)
            scores = high
        scores = scores + tl.log(total)
    scores = tl.where(scored, scores, -3.4028234663852886e38)  # not scored: lowest finite float
    tl.store(Out + batch * stride_ob + head * stride_oh + offs_c, scores, mask=offs_c < width)


@triton.jit
def _merge_mixture_kernel(
    PerQuery, Valid, Out, NEarlier,
    stride_vb, stride_ob, stride_oh,
    n_kv_heads, n_earlier, width, log_queries,
    N_QUERIES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
    N_ON_DEVICE: tl.constexpr, HAS_VALID: tl.constexpr,
):  # fmt: skip
    """Grid (B * Hkv,). PerQuery fp32 [B * Hkv, m, width] raw logits -> Out fp32 [B, Hkv, 1, width]: the scored
    columns (below n_earlier) get ``log(mean_j softmax_j)``, each query's softmax normalised over the columns of
    `merge_query_logits`' reference (the n_earlier scored ones, or every column with N_ON_DEVICE) where the blocks
    that are not allowed (not scored, or Valid [B, >= width] False) stand in as -1e4; the others the lowest float."""
    pid = tl.program_id(0)
    batch = (pid // n_kv_heads).to(tl.int64)
    head = (pid % n_kv_heads).to(tl.int64)
    if N_ON_DEVICE:
        n_earlier = tl.load(NEarlier).to(tl.int32)
        norm_cols = width
    else:
        norm_cols = n_earlier
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < N_QUERIES
    rows = PerQuery + pid.to(tl.int64) * N_QUERIES * width + offs_m[:, None] * width
    high = tl.full([BLOCK_M], -1e30, tl.float32)  # running max of each query's logits
    total = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp(logit - high)
    for start in range(0, norm_cols, BLOCK_W):
        offs_w = start + tl.arange(0, BLOCK_W)
        in_norm = offs_w < norm_cols
        allowed = (offs_w < n_earlier) & in_norm
        if HAS_VALID:
            allowed &= tl.load(Valid + batch * stride_vb + offs_w, mask=allowed, other=0) != 0
        x = tl.load(rows + offs_w[None, :], mask=m_ok[:, None] & allowed[None, :], other=-1e4)
        x = tl.where(in_norm[None, :], x, -1e30)  # past the normalised columns: no mass
        new_high = tl.maximum(high, tl.max(x, axis=1))
        total = total * tl.exp(high - new_high) + tl.sum(tl.exp(x - new_high[:, None]), axis=1)
        high = new_high
    norm = high + tl.log(tl.maximum(total, 1.0))  # [BLOCK_M] each query's log normaliser (total >= 1 unless empty)
    for start in range(0, width, BLOCK_W):
        offs_w = start + tl.arange(0, BLOCK_W)
        in_row = offs_w < width
        scored = offs_w < n_earlier
        allowed = scored
        if HAS_VALID:
            allowed &= tl.load(Valid + batch * stride_vb + offs_w, mask=scored, other=0) != 0
        x = tl.load(rows + offs_w[None, :], mask=m_ok[:, None] & allowed[None, :], other=-1e4)
        log_p = tl.where(m_ok[:, None], x - norm[:, None], -1e30)  # [BLOCK_M, BLOCK_W]
        top = tl.max(log_p, axis=0)
        merged = top + tl.log(tl.sum(tl.exp(log_p - top[None, :]), axis=0)) - log_queries
        merged = tl.where(scored, merged, -3.4028234663852886e38)
        tl.store(Out + batch * stride_ob + head * stride_oh + offs_w, merged, mask=in_row)


def decode_gate_scores_triton(
    q: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    q_weight: torch.Tensor,
    keys: torch.Tensor,
    n_earlier: int | torch.Tensor,
    *,
    rope_style: str = "half",
    scale: float = 1.0,
    num_queries: int = 1,
    query_merge: str = "mixture",
    block_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `decode_scores.decode_gate_scores_reference`: one program per (row, KV head, gate query)
    merges a query, then one per (row, KV head, chunk of blocks) scores the compressed keys (and, for the mixture of
    ``m > 1`` queries, one per (row, KV head) merges their scores)."""
    check_decode_score_inputs(q, cos, sin, q_weight, keys, n_earlier, rope_style, num_queries, query_merge, block_valid)
    batch, hq, head_dim = q.shape
    hkv, gate_dim, n_queries = q_weight.shape[0], keys.shape[3], num_queries
    q, q_weight, keys = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, q_weight, keys))
    on_device = isinstance(n_earlier, torch.Tensor)
    width = keys.shape[2] if on_device else n_earlier + 1
    out = torch.empty(batch, hkv, 1, width, dtype=torch.float32, device=q.device)
    mixture = n_queries > 1 and query_merge == "mixture"
    # the mixture's per-query logits [B·Hkv, m, width]
    scored_out = torch.empty(batch * hkv, n_queries, width, dtype=torch.float32, device=q.device) if mixture else out
    q_gate = torch.empty(batch * hkv * n_queries, gate_dim, dtype=torch.float32, device=q.device)
    pairing, table = _ROPE_CODES[None if cos is None else rope_style]
    rot = 0 if cos is None else cos.shape[-1]
    if cos is None:
        cos = sin = out  # never read
        table_stride = 0
    else:
        cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
        table_stride = cos.stride(0) if cos.shape[0] == batch and batch > 1 else 0
    block_g = triton.next_power_of_2(gate_dim)
    block_c = 32 if block_g > 128 else 64
    with on_tensor_device(q):
        _decode_query_kernel[(batch * hkv * n_queries,)](
            q, cos, sin, q_weight, q_gate,
            q.stride(0), q.stride(1),
            table_stride,
            q_weight.stride(0), q_weight.stride(1),
            hkv,
            GROUP=hq // hkv, HEAD_DIM=head_dim, GATE_DIM=gate_dim, N_QUERIES=n_queries,
            BLOCK_G=block_g, BLOCK_K=min(64, triton.next_power_of_2(head_dim)),
            ROT=rot, PAIRING=pairing, TABLE=table, num_warps=8,
        )  # fmt: skip
        _decode_block_scores_kernel[(batch * hkv, triton.cdiv(width, block_c))](
            q_gate, keys, scored_out, n_earlier if on_device else out,
            keys.stride(0), keys.stride(1), keys.stride(2),
            out.stride(0), out.stride(1),
            hkv, 0 if on_device else n_earlier, width, float(scale),
            GATE_DIM=gate_dim, N_QUERIES=n_queries, BLOCK_G=block_g, BLOCK_C=block_c, N_ON_DEVICE=on_device,
            PER_QUERY=mixture,
        )  # fmt: skip
        if mixture:
            valid = out if block_valid is None else block_valid
            valid = valid if valid.stride(-1) == 1 else valid.contiguous()
            block_m = triton.next_power_of_2(n_queries)
            _merge_mixture_kernel[(batch * hkv,)](
                scored_out, valid, out, n_earlier if on_device else out,
                valid.stride(0) if block_valid is not None else 0, out.stride(0), out.stride(1),
                hkv, 0 if on_device else n_earlier, width, math.log(n_queries),
                N_QUERIES=n_queries, BLOCK_M=block_m, BLOCK_W=max(64, 2048 // block_m),
                N_ON_DEVICE=on_device, HAS_VALID=block_valid is not None,
            )  # fmt: skip
    return out


register_backend("triton", decode_gate_scores_triton, device_types=("cuda",), op="decode_scores")
