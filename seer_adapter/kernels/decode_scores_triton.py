"""Decode-gate scores of one decoding step in one Triton launch (same contract as `decode_scores`).

The PyTorch path is some twenty small kernels per layer and step (dtype conversions, inverse RoPE, a head-major
reshape, the merge, RoPE again, the dot products, a concatenation); at batch 8 each moves a few kilobytes, so the
step costs their launches, not their work. Here two launches do it: one program per (KV head, gate query, 16
output channels, 16 batch rows) makes the merged, rotated gate queries, then one program per (row, KV head, chunk of
64 blocks) scores the keys (a single program per (row, KV head) walking a 64k cache's 1024 blocks took 38 µs on the
H200, latency-bound):

* RoPE pairs channel ``i`` with a partner ``p(i)`` (``i ± r/2`` for ``"half"``, ``i ^ 1`` for the interleaved
  styles). Registers cannot be permuted, so the partner values are *loaded* instead: the query at ``p(i)`` for the
  inverse rotation, and the merge weight's rows at ``p(i)`` for the rotation of the merged query
  (``merged[p(i)] = W[p(i)] · q``); the weight is read twice, from L2 the second time.
* The merge streams the weight in ``[16, BLOCK_K]`` tiles over the ``g·D`` input channels and applies each tile to
  all the batch rows at once (``[16 rows, BLOCK_K] x [BLOCK_K, 16 channels]``, fp32). A first form, one program per
  (row, KV head) holding all ``G`` channels, read the whole weight once per batch row: 10 µs per layer and step at
  64k × 8 on the H200 for a few kilobytes of output.
* With ``m > 1`` gate queries (``q_weight [Hkv, m·G, g·D]``) the query kernel runs one program per gate query and
  the score kernel scores each key tile against the ``m`` queries: the keys are read once whatever ``m``. The
  ``"logsumexp"`` merge happens there, online in registers. The ``"mixture"`` merge needs each query's normaliser
  over all earlier blocks, which no single chunk program sees: the score kernel writes the ``m`` rows of logits
  (``[B·Hkv, m, width]`` fp32, a few MB at 64k) and each chunk's (max, sum of exponentials) per query, and a third
  kernel, one program per (row, KV head, 16 chunks / m), combines the chunks' statistics into the normalisers and
  merges its columns. (A first form, one program per (row, KV head) making two passes over the row, took 20 µs per
  layer at 64k × 8 on the H200: 64 programs, each a chain of dependent loads.)
* The scores read the compressed keys in ``[BLOCK_C, G]`` tiles, written straight into the selection layout
  ``[B, Hkv, 1, n_earlier + 1]`` with the current block's lowest-float column; ``n_earlier`` may be a device tensor
  (shape-static decoding steps), then every column from it on is the lowest float.

Bytes: the query kernel reads each KV head's ``m·G × g·D`` weight twice (rows and partner rows) per 16 batch rows;
at Llama-3-8B shape (``g·D = 512``, ``G = 128``) 0.5 MB of fp32 weight per KV head, 8 programs sharing it. The
score programs read ``n_earlier·G`` key elements per (row, KV head): 0.5 MB at 64k tokens.
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
def _rows_rope_table(Table, rows, row_ok, stride_tb, offs, ROT: tl.constexpr, TABLE: tl.constexpr, other: tl.constexpr):
    """Table values [R, C] of channels ``offs`` [C] for batch rows ``rows`` [R] (``other`` past the rotary width and
    on rows past the batch)."""
    idx = offs // 2 if TABLE == 1 else offs
    mask = row_ok[:, None] & (offs < ROT)[None, :]
    return tl.load(Table + rows[:, None] * stride_tb + idx[None, :], mask=mask, other=other).to(tl.float32)


@triton.jit
def _decode_query_kernel(
    Q, Cos, Sin, W, QGate,
    stride_qb, stride_qh,
    stride_tb,
    stride_wh, stride_wo,
    batch, n_kv_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, GATE_DIM: tl.constexpr, N_QUERIES: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    ROT: tl.constexpr, PAIRING: tl.constexpr, TABLE: tl.constexpr,
):  # fmt: skip
    """Grid (Hkv * m, cdiv(G, BLOCK_O), cdiv(B, BLOCK_R)). Channels ``[o0, o0 + BLOCK_O)`` of gate query ``j`` of one
    KV head, merged and rotated, for BLOCK_R batch rows: QGate fp32 [B * Hkv * m, G]. Each weight tile is read once
    for all the rows (a ``[R, K] x [K, O]`` product), not once per row. Q [B, Hq, D], Cos/Sin [B or 1, r] (row
    stride 0 when shared), W [Hkv, m·G, g·D]; last dimensions contiguous."""
    pid = tl.program_id(0)
    query = pid % N_QUERIES
    head = (pid // N_QUERIES).to(tl.int64)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = offs_o < GATE_DIM
    rows = (tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < batch
    w_head = W + head * stride_wh + (query * GATE_DIM).to(tl.int64) * stride_wo  # this gate query's G rows
    merged = tl.zeros([BLOCK_R, BLOCK_O], dtype=tl.float32)  # q_pre · Wᵀ
    merged_partner = tl.zeros([BLOCK_R, BLOCK_O], dtype=tl.float32)  # (q_pre · Wᵀ)[p(o)] = q_pre · W[p(o)]ᵀ
    if PAIRING != 0:
        o_partner, o_sign = _rope_partner(offs_o, ROT, PAIRING)
    for r in tl.static_range(GROUP):
        q_rows = Q + rows[:, None] * stride_qb + (head * GROUP + r) * stride_qh  # [R, 1]
        for d0 in tl.static_range(0, HEAD_DIM, BLOCK_K):
            offs_d = d0 + tl.arange(0, BLOCK_K)
            d_ok = offs_d < HEAD_DIM
            q_ok = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_rows + offs_d[None, :], mask=q_ok, other=0.0).to(tl.float32)  # [R, K]
            if PAIRING != 0:  # undo RoPE: x = y cos - rotate(y) sin
                d_partner, d_sign = _rope_partner(offs_d, ROT, PAIRING)
                q_partner = tl.load(q_rows + d_partner[None, :], mask=q_ok, other=0.0).to(tl.float32)
                cos = _rows_rope_table(Cos, rows, row_ok, stride_tb, offs_d, ROT, TABLE, 1.0)
                sin = _rows_rope_table(Sin, rows, row_ok, stride_tb, offs_d, ROT, TABLE, 0.0)
                q = q * cos - d_sign[None, :] * q_partner * sin
            q = q.to(W.dtype.element_ty).to(tl.float32)  # the merge's input in the gate dtype, as the reference
            cols = r * HEAD_DIM + offs_d
            w_ok = o_ok[:, None] & d_ok[None, :]
            w = tl.load(w_head + offs_o[:, None] * stride_wo + cols[None, :], mask=w_ok, other=0.0).to(tl.float32)
            merged += tl.dot(q, tl.trans(w), input_precision="ieee")
            if PAIRING != 0:
                w = tl.load(w_head + o_partner[:, None] * stride_wo + cols[None, :], mask=w_ok, other=0.0)
                merged_partner += tl.dot(q, tl.trans(w.to(tl.float32)), input_precision="ieee")
    q_gate = merged
    if PAIRING != 0:  # rotate the merged query at each row's position
        cos = _rows_rope_table(Cos, rows, row_ok, stride_tb, offs_o, ROT, TABLE, 1.0)
        sin = _rows_rope_table(Sin, rows, row_ok, stride_tb, offs_o, ROT, TABLE, 0.0)
        q_gate = merged * cos + o_sign[None, :] * merged_partner * sin
    out = QGate + ((rows[:, None] * n_kv_heads + head) * N_QUERIES + query) * GATE_DIM + offs_o[None, :]
    tl.store(out, q_gate, mask=row_ok[:, None] & o_ok[None, :])


@triton.jit
def _decode_block_scores_kernel(
    QGate, Keys, Out, NEarlier, Valid, Stats,
    stride_kb, stride_kh, stride_kc,
    stride_ob, stride_oh, stride_vb,
    n_kv_heads, n_earlier, width, n_chunks, scale,
    GATE_DIM: tl.constexpr, N_QUERIES: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
    N_ON_DEVICE: tl.constexpr, PER_QUERY: tl.constexpr, HAS_VALID: tl.constexpr,
):  # fmt: skip
    """Grid (B * Hkv, cdiv(width, BLOCK_C)). Out fp32 [B, Hkv, 1, width]: columns below the number of earlier blocks
    (``n_earlier``, or read from ``NEarlier`` [1] when N_ON_DEVICE) get ``q_gate · key * scale`` (the logsumexp over
    the N_QUERIES gate queries of QGate [B * Hkv * m, G]), the others the lowest finite float (the current block, and
    with N_ON_DEVICE the blocks after it).

    PER_QUERY (the mixture): Out is [B * Hkv, m, width] instead, each query's logits with -1e4 standing in for the
    blocks that are not allowed (not scored, or Valid [B, >= width] False), and Stats fp32 [B * Hkv, m, n_chunks, 2]
    gets this chunk's (max, sum of exp(logit - max)) over the columns each query is normalised over (the n_earlier
    scored ones, or every column with N_ON_DEVICE: `merge_query_logits`' reference), for `_merge_mixture_kernel`."""
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
        allowed = scored
        if HAS_VALID:
            allowed &= tl.load(Valid + batch * stride_vb + offs_c, mask=scored, other=0) != 0
        in_norm = offs_c < (width if N_ON_DEVICE else n_earlier)
        out_rows = Out + pid.to(tl.int64) * N_QUERIES * width
        stats = Stats + (pid.to(tl.int64) * N_QUERIES * n_chunks + tl.program_id(1)) * 2
        for query in tl.static_range(N_QUERIES):
            if query > 0:
                q_gate = tl.load(q_rows + query * GATE_DIM + offs_g, mask=g_ok, other=0.0)
                scores = tl.sum(k * q_gate[None, :], axis=1) * scale
            x = tl.where(allowed, scores, -1e4)
            tl.store(out_rows + query * width + offs_c, x, mask=offs_c < width)
            chunk_max = tl.max(tl.where(in_norm, x, -1e30), axis=0)
            chunk_sum = tl.sum(tl.where(in_norm, tl.exp(x - chunk_max), 0.0), axis=0)
            tl.store(stats + query * n_chunks * 2, chunk_max)
            tl.store(stats + query * n_chunks * 2 + 1, chunk_sum)
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
    PerQuery, Stats, Out, NEarlier,
    stride_ob, stride_oh,
    n_kv_heads, n_earlier, width, n_chunks, log_queries,
    N_QUERIES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_S: tl.constexpr,
    N_ON_DEVICE: tl.constexpr,
):  # fmt: skip
    """Grid (B * Hkv, cdiv(width, BLOCK_W)). PerQuery fp32 [B * Hkv, m, width] (the score kernel's masked logits) ->
    Out fp32 [B, Hkv, 1, width]: the scored columns (below n_earlier) of this program's BLOCK_W get
    ``log(mean_j softmax_j)``, each query's log normaliser combined from the chunks' Stats [B * Hkv, m, n_chunks, 2];
    the others the lowest float. Every program combines the (few) chunk statistics itself, so no pass walks a row."""
    pid = tl.program_id(0)
    batch = (pid // n_kv_heads).to(tl.int64)
    head = (pid % n_kv_heads).to(tl.int64)
    if N_ON_DEVICE:
        n_earlier = tl.load(NEarlier).to(tl.int32)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < N_QUERIES
    stats = Stats + pid.to(tl.int64) * N_QUERIES * n_chunks * 2 + offs_m[:, None] * n_chunks * 2
    high = tl.full([BLOCK_M], -1e30, tl.float32)  # each query's running max over the chunks
    total = tl.zeros([BLOCK_M], tl.float32)  # its sum of exp(logit - high)
    for start in range(0, n_chunks, BLOCK_S):
        offs_s = start + tl.arange(0, BLOCK_S)
        ok = m_ok[:, None] & (offs_s < n_chunks)[None, :]
        chunk_max = tl.load(stats + offs_s[None, :] * 2, mask=ok, other=-1e30)
        chunk_sum = tl.load(stats + offs_s[None, :] * 2 + 1, mask=ok, other=0.0)
        new_high = tl.maximum(high, tl.max(chunk_max, axis=1))
        total = total * tl.exp(high - new_high) + tl.sum(chunk_sum * tl.exp(chunk_max - new_high[:, None]), axis=1)
        high = new_high
    norm = high + tl.log(tl.maximum(total, 1.0))  # [BLOCK_M] (total >= 1 unless the row normalises nothing)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    scored = offs_w < n_earlier
    rows = PerQuery + pid.to(tl.int64) * N_QUERIES * width + offs_m[:, None] * width
    x = tl.load(rows + offs_w[None, :], mask=m_ok[:, None] & scored[None, :], other=-1e4)
    log_p = tl.where(m_ok[:, None], x - norm[:, None], -1e30)  # [BLOCK_M, BLOCK_W]
    top = tl.max(log_p, axis=0)
    merged = top + tl.log(tl.sum(tl.exp(log_p - top[None, :]), axis=0)) - log_queries
    merged = tl.where(scored, merged, -3.4028234663852886e38)
    tl.store(Out + batch * stride_ob + head * stride_oh + offs_w, merged, mask=offs_w < width)


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
    """Same contract as `decode_scores.decode_gate_scores_reference`: one program per (KV head, gate query, 16
    channels, 16 batch rows) merges the queries, then one per (row, KV head, chunk of blocks) scores the compressed
    keys (and, for the mixture of ``m > 1`` queries, one per (row, KV head, column tile) merges their scores)."""
    check_decode_score_inputs(q, cos, sin, q_weight, keys, n_earlier, rope_style, num_queries, query_merge, block_valid)
    batch, hq, head_dim = q.shape
    hkv, gate_dim, n_queries = q_weight.shape[0], keys.shape[3], num_queries
    q, q_weight, keys = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, q_weight, keys))
    on_device = isinstance(n_earlier, torch.Tensor)
    width = keys.shape[2] if on_device else n_earlier + 1
    out = torch.empty(batch, hkv, 1, width, dtype=torch.float32, device=q.device)
    mixture = n_queries > 1 and query_merge == "mixture"
    block_g = triton.next_power_of_2(gate_dim)
    block_c = 32 if block_g > 128 else 64
    n_chunks = triton.cdiv(width, block_c)
    # the mixture's per-query logits [B·Hkv, m, width] and their per-chunk (max, sum of exp) [B·Hkv, m, n_chunks, 2]
    scored_out = torch.empty(batch * hkv, n_queries, width, dtype=torch.float32, device=q.device) if mixture else out
    stats = torch.empty(batch * hkv, n_queries, n_chunks, 2, dtype=torch.float32, device=q.device) if mixture else out
    valid = out if block_valid is None else block_valid
    valid = valid if valid.stride(-1) == 1 else valid.contiguous()
    q_gate = torch.empty(batch * hkv * n_queries, gate_dim, dtype=torch.float32, device=q.device)
    pairing, table = _ROPE_CODES[None if cos is None else rope_style]
    rot = 0 if cos is None else cos.shape[-1]
    if cos is None:
        cos = sin = out  # never read
        table_stride = 0
    else:
        cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
        table_stride = cos.stride(0) if cos.shape[0] == batch and batch > 1 else 0
    with on_tensor_device(q):
        block_r, block_o = 16, 16  # tl.dot's smallest tile: batch rows padded to 16
        _decode_query_kernel[(hkv * n_queries, triton.cdiv(gate_dim, block_o), triton.cdiv(batch, block_r))](
            q, cos, sin, q_weight, q_gate,
            q.stride(0), q.stride(1),
            table_stride,
            q_weight.stride(0), q_weight.stride(1),
            batch, hkv,
            GROUP=hq // hkv, HEAD_DIM=head_dim, GATE_DIM=gate_dim, N_QUERIES=n_queries,
            BLOCK_R=block_r, BLOCK_O=block_o, BLOCK_K=max(16, min(64, triton.next_power_of_2(head_dim))),
            ROT=rot, PAIRING=pairing, TABLE=table, num_warps=4,
        )  # fmt: skip
        _decode_block_scores_kernel[(batch * hkv, n_chunks)](
            q_gate, keys, scored_out, n_earlier if on_device else out, valid, stats,
            keys.stride(0), keys.stride(1), keys.stride(2),
            out.stride(0), out.stride(1), valid.stride(0) if block_valid is not None else 0,
            hkv, 0 if on_device else n_earlier, width, n_chunks, float(scale),
            GATE_DIM=gate_dim, N_QUERIES=n_queries, BLOCK_G=block_g, BLOCK_C=block_c, N_ON_DEVICE=on_device,
            PER_QUERY=mixture, HAS_VALID=mixture and block_valid is not None,
        )  # fmt: skip
        if mixture:
            block_m = triton.next_power_of_2(n_queries)
            block_w = max(64, 1024 // block_m)
            _merge_mixture_kernel[(batch * hkv, triton.cdiv(width, block_w))](
                scored_out, stats, out, n_earlier if on_device else out,
                out.stride(0), out.stride(1),
                hkv, 0 if on_device else n_earlier, width, n_chunks, math.log(n_queries),
                N_QUERIES=n_queries, BLOCK_M=block_m, BLOCK_W=block_w, BLOCK_S=max(16, 256 // block_m),
                N_ON_DEVICE=on_device,
            )  # fmt: skip
    return out


register_backend("triton", decode_gate_scores_triton, device_types=("cuda",), op="decode_scores")
