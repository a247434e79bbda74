"""Ground truth for gate distillation: exact dense causal attention plus the pooled block-attention map.

For every query row the softmax over its full causal row is taken; inside each key block the largest
(row-normalised) probability is kept; these are max-pooled over the real query rows of the query block (and,
with ``group_max``, over the query heads of a GQA group, which is the target of a per-KV-head gate); finally each
query-block row is renormalised to sum to 1 (an all-zero row stays all zeros). Blocks above the causal diagonal are 0.

Three entry points with one signature:

* `attention_with_block_ground_truth_reference`: pure PyTorch, fp32, chunked over query blocks (16k fits on CPU);
* `attention_with_block_ground_truth_triton`: one Triton kernel, one pass over K/V per query tile: the ordinary
  online-softmax attention, which also stores each row's largest score per key tile into a small per-program record
  (a persistent grid of a few programs per SM, so the records take ``programs * nK * 64`` floats, not
  ``[B, H, S, S / block]``); when the tile's rows know their log-sum-exp, an epilogue turns the records into
  probabilities, max-pools them over rows and merges them into the ``[.., nQ, nK]`` map with atomic max. A two-pass
  variant without records (pass 1: row max and sum; pass 2: probabilities) is kept for comparison;
* `attention_with_block_ground_truth`: picks one with the same rules as `kernels.block_sparse_attention`
  (Triton on CUDA, reference elsewhere, ``$SEER_ADAPTER_KERNEL`` or ``backend=`` to force).

The model's own output is returned too (``out [B, Hq, S, D]`` in ``q.dtype``), since the frozen model continues with
it: a distillation step costs about one dense forward.
"""

import math
import os

import torch

from . import _OPS, backend_for, on_tensor_device, register_backend
from .reference import _MAX_SCORE_ELEMENTS, causal_token_mask, check_attention_inputs

try:
    import triton
    import triton.language as tl

    from .block_sparse_triton import (
        _dot_acc,
        _key_tile_scores,
        _load_key_tile,
        check_triton_inputs,
        empty_like_bshd,
        key_padding_as_int8,
        softcap_factors,
    )
except ImportError:  # pragma: no cover - triton not installed
    triton = None

ENV_GT_CONFIG = "SEER_ADAPTER_GT_CONFIG"

__all__ = [
    "GROUND_TRUTH_BACKENDS",
    "attention_with_block_ground_truth",
    "attention_with_block_ground_truth_reference",
    "attention_with_block_ground_truth_triton",
    "normalize_block_map_rows",
]


def _check_ground_truth_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, key_padding_mask: torch.Tensor | None
) -> None:
    batch, hq, q_len, _ = q.shape
    n_q, n_k = math.ceil(q_len / block_size), math.ceil(k.shape[2] / block_size)
    dense_mask = torch.ones((), dtype=torch.bool, device=q.device).expand(batch, hq, n_q, n_k)  # no memory
    check_attention_inputs(q, k, v, dense_mask, block_size, key_padding_mask)


def normalize_block_map_rows(block_map: torch.Tensor) -> torch.Tensor:
    """Divide every row of ``block_map [..., nQ, nK]`` by its sum, in place; all-zero rows stay zero."""
    row_sum = block_map.sum(dim=-1, keepdim=True)
    return block_map.div_(row_sum.clamp_min_(torch.finfo(block_map.dtype).tiny))


def attention_with_block_ground_truth_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 64,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    group_max: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention and the distillation target, in fp32 PyTorch, chunked over query blocks.

    Args:
        q: ``[B, Hq, S, D]``; k, v: ``[B, Hkv, Sk, D]``, ``Sk >= S`` (queries are the last S positions).
        block_size: tokens per block.
        scale: softmax scale (default ``1 / sqrt(D)``).
        key_padding_mask: optional bool ``[B, Sk]``, True for real tokens. Padding keys get no probability and
            padding query rows (query ``i`` is position ``i + Sk - S``) are left out of the pooling.
        softcap: optional logit soft-capping ``cap * tanh(s / cap)``.
        group_max: pool over the query heads of each GQA group too (target of one mask per KV head).

    Returns:
        ``out [B, Hq, S, D]`` in ``q.dtype`` (exact dense causal attention) and ``block_map`` fp32
        ``[B, Hq or Hkv, nQ, nK]``: rows sum to 1 (or are all zero), non-causal blocks are 0.
    """
    _check_ground_truth_inputs(q, k, v, block_size, key_padding_mask)
    batch, hq, q_len, head_dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    group = hq // hkv
    n_q_blocks, n_k_blocks = math.ceil(q_len / block_size), math.ceil(kv_len / block_size)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    q_grouped = q.reshape(batch, hkv, group, q_len, head_dim).float()  # [B, Hkv, g, S, D]
    k32, v32 = k.float(), v.float()  # [B, Hkv, Sk, D]
    causal = causal_token_mask(q_len, kv_len, q.device)  # [S, Sk]
    # Query row i is real iff its own position (i + Sk - S) is a real token.
    if key_padding_mask is None:
        real_rows = torch.ones(batch, q_len, dtype=torch.bool, device=q.device)
    else:
        real_rows = key_padding_mask[:, kv_len - q_len :]  # [B, S]
    out = torch.empty(batch, hkv, group, q_len, head_dim, dtype=torch.float32, device=q.device)
    block_map = torch.zeros(batch, hkv, group, n_q_blocks, n_k_blocks, dtype=torch.float32, device=q.device)

    blocks_per_chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, batch * hq * block_size * n_k_blocks * block_size))
    for first in range(0, n_q_blocks, blocks_per_chunk):
        last = min(n_q_blocks, first + blocks_per_chunk)
        rows = slice(first * block_size, min(q_len, last * block_size))
        n_rows = rows.stop - rows.start
        scores = torch.einsum("bhgqd,bhkd->bhgqk", q_grouped[:, :, :, rows], k32) * scale  # [B, Hkv, g, r, Sk]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        allowed = causal[rows].expand(batch, 1, 1, n_rows, kv_len)
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask[:, None, None, None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        probs = torch.exp(scores - row_max)
        denom = probs.sum(dim=-1, keepdim=True)
        probs = probs / torch.where(denom > 0, denom, torch.ones_like(denom))  # row-normalised, [B, Hkv, g, r, Sk]
        out[:, :, :, rows] = torch.einsum("bhgqk,bhkd->bhgqd", probs, v32)

        # Max inside each key block, then over the real query rows of each query block.
        probs = torch.nn.functional.pad(probs, (0, n_k_blocks * block_size - kv_len))
        per_row = probs.view(batch, hkv, group, n_rows, n_k_blocks, block_size).amax(dim=-1)  # [B, Hkv, g, r, nK]
        per_row = per_row * real_rows[:, None, None, rows, None]
        per_row = torch.nn.functional.pad(per_row, (0, 0, 0, (last - first) * block_size - n_rows))
        pooled = per_row.view(batch, hkv, group, last - first, block_size, n_k_blocks).amax(dim=-2)
        block_map[:, :, :, first:last] = pooled  # [B, Hkv, g, nQc, nK]

    if group_max:
        block_map = block_map.amax(dim=2)  # [B, Hkv, nQ, nK]
    else:
        block_map = block_map.reshape(batch, hq, n_q_blocks, n_k_blocks)
    return out.reshape(batch, hq, q_len, head_dim).to(q.dtype), normalize_block_map_rows(block_map)


if triton is not None:

    @triton.jit
    def _softmax_stats_tile(
        m_i,
        l_i,
        q,
        k_head_ptr,
        stride_ks,
        stride_kd,
        start,
        offs_n,
        offs_d,
        row_limit,
        key_padding_ptr,
        kv_len,
        qk_scale,
        softcap_in,
        softcap_out,
        d_mask,
        CAUSAL: tl.constexpr,
        HAS_KEY_PADDING: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        EVEN_D: tl.constexpr,
        IEEE_DOT: tl.constexpr,
    ):
        """Pass 1 on one key tile: update the running row max ``m_i`` and sum ``l_i`` (log2 units), [ROWS] each."""
        scores = _key_tile_scores(
            q, k_head_ptr, stride_ks, stride_kd, start, offs_n, offs_d, row_limit, key_padding_ptr, kv_len,
            qk_scale, softcap_in, softcap_out, d_mask, CAUSAL, HAS_KEY_PADDING, HAS_SOFTCAP, EVEN_D, IEEE_DOT,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        if CAUSAL or HAS_KEY_PADDING:
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no NaN for rows without a visible key yet
        else:
            m_shift = m_new
        l_i = l_i * tl.exp2(m_i - m_shift) + tl.sum(tl.exp2(scores - m_shift[:, None]), 1)
        return m_new, l_i

    @triton.jit
    def _softmax_stats(
        q,
        k_head_ptr,
        stride_ks,
        stride_kd,
        n_full,
        n_tiles,
        offs_n,
        offs_d,
        row_limit,
        key_padding_ptr,
        kv_len,
        qk_scale,
        softcap_in,
        softcap_out,
        d_mask,
        ROWS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_KEY_PADDING: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        EVEN_D: tl.constexpr,
        IEEE_DOT: tl.constexpr,
    ):
        """Row max ``m`` and sum ``l`` of the softmax (log2 units, [ROWS] each) over key tiles ``[0, n_tiles)``:
        the first ``n_full`` tiles lie wholly before every row's limit (no causal check), the rest are checked."""
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        for tile in range(0, n_full):
            m_i, l_i = _softmax_stats_tile(
                m_i, l_i, q, k_head_ptr, stride_ks, stride_kd, tile * BLOCK_N, offs_n, offs_d, row_limit,
                key_padding_ptr, kv_len, qk_scale, softcap_in, softcap_out, d_mask,
                False, HAS_KEY_PADDING, HAS_SOFTCAP, EVEN_D, IEEE_DOT,
            )  # fmt: skip
        for tile in range(n_full, n_tiles):
            m_i, l_i = _softmax_stats_tile(
                m_i, l_i, q, k_head_ptr, stride_ks, stride_kd, tile * BLOCK_N, offs_n, offs_d, row_limit,
                key_padding_ptr, kv_len, qk_scale, softcap_in, softcap_out, d_mask,
                True, HAS_KEY_PADDING, HAS_SOFTCAP, EVEN_D, IEEE_DOT,
            )  # fmt: skip
        return m_i, l_i

    @triton.jit
    def _probability_tile(
        acc,
        m_shift,
        inv_l,
        row_real,
        q,
        k_head_ptr,
        v_head_ptr,
        stride_ks,
        stride_kd,
        stride_vs,
        stride_vd,
        start,
        offs_n,
        offs_d,
        row_limit,
        key_padding_ptr,
        map_row_ptr,
        kv_len,
        qk_scale,
        softcap_in,
        softcap_out,
        d_mask,
        BLOCK_SIZE: tl.constexpr,
        CAUSAL: tl.constexpr,
        HAS_KEY_PADDING: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        EVEN_D: tl.constexpr,
        IEEE_DOT: tl.constexpr,
    ):
        """Pass 2 on one key tile: normalised probabilities, P @ V, and the tile's max over real rows into the map."""
        scores = _key_tile_scores(
            q, k_head_ptr, stride_ks, stride_kd, start, offs_n, offs_d, row_limit, key_padding_ptr, kv_len,
            qk_scale, softcap_in, softcap_out, d_mask, CAUSAL, HAS_KEY_PADDING, HAS_SOFTCAP, EVEN_D, IEEE_DOT,
        )  # fmt: skip
        p = tl.exp2(scores - m_shift[:, None]) * inv_l[:, None]  # [ROWS, BLOCK_N] row-normalised probabilities
        v = _load_key_tile(v_head_ptr, start, offs_n, offs_d, stride_vs, stride_vd, kv_len, d_mask, CAUSAL, EVEN_D)
        acc = _dot_acc(p.to(v.dtype), v, acc, IEEE_DOT)
        tile_max = tl.max(tl.max(tl.where(row_real[:, None], p, 0.0), 1), 0)
        tl.atomic_max(map_row_ptr + start // BLOCK_SIZE, tile_max, sem="relaxed")
        return acc

    @triton.jit
    def _ground_truth_fwd_kernel(
        Q, K, V, Out, BlockMap, KeyPadding,
        stride_qb, stride_qh, stride_qs, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_ob, stride_oh, stride_os, stride_od,
        stride_mb, stride_mh, stride_mq,
        stride_pb,
        q_len, kv_len, n_row_tiles, group, map_head_divisor,
        qk_scale, softcap_in, softcap_out,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_KEY_PADDING: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        IEEE_DOT: tl.constexpr,
    ):  # fmt: skip
        """Grid: (row tiles, Hq, B). Q [B, Hq, S, D]; K, V [B, Hkv, Sk, D]; Out like Q;
        BlockMap fp32 [B, Hq or Hkv, nQ, nK] zero-initialised (un-normalised maxima are written); KeyPadding int8."""
        EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
        ROW_TILES_PER_BLOCK: tl.constexpr = BLOCK_SIZE // BLOCK_M

        row_tile = n_row_tiles - 1 - tl.program_id(0)
        q_head = tl.program_id(1)
        batch = tl.program_id(2).to(tl.int64)
        kv_head = q_head // group
        map_head = q_head // map_head_divisor
        q_block = row_tile // ROW_TILES_PER_BLOCK
        row_start = row_tile * BLOCK_M

        offs_m = tl.arange(0, BLOCK_M)
        pos = row_start + offs_m  # [BLOCK_M] query rows
        row_valid = pos < q_len
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        offs_n = tl.arange(0, BLOCK_N)

        q_ptrs = (
            Q + batch * stride_qb + q_head.to(tl.int64) * stride_qh + row_start.to(tl.int64) * stride_qs
            + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
        )  # fmt: skip
        q = tl.load(q_ptrs, mask=row_valid[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        k_head_ptr = K + batch * stride_kb + kv_head.to(tl.int64) * stride_kh
        v_head_ptr = V + batch * stride_vb + kv_head.to(tl.int64) * stride_vh
        key_padding_ptr = KeyPadding + batch * stride_pb

        causal_offset = kv_len - q_len
        row_limit = pos + causal_offset  # [BLOCK_M]
        last_limit = tl.minimum(row_start + BLOCK_M, q_len) - 1 + causal_offset
        n_tiles = last_limit // BLOCK_N + 1  # key tiles holding any causal key of this row tile
        n_full = (row_start + causal_offset + 1) // BLOCK_N  # key tiles every row sees entirely
        row_real = row_valid
        if HAS_KEY_PADDING:
            row_real = row_real & (tl.load(key_padding_ptr + row_limit, mask=row_valid, other=0) != 0)

        # Pass 1: row max and sum of the softmax (log2 units).
        m_i, l_i = _softmax_stats(
            q, k_head_ptr, stride_ks, stride_kd, n_full, n_tiles, offs_n, offs_d, row_limit, key_padding_ptr, kv_len,
            qk_scale, softcap_in, softcap_out, d_mask, BLOCK_M, BLOCK_N, HAS_KEY_PADDING, HAS_SOFTCAP, EVEN_D, IEEE_DOT,
        )  # fmt: skip

        # Pass 2: probabilities exp2(s - m) / l, the output, and the per-key-block maxima.
        m_shift = tl.where(m_i == float("-inf"), 0.0, m_i)
        inv_l = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
        map_row_ptr = (
            BlockMap + batch * stride_mb + map_head.to(tl.int64) * stride_mh + q_block.to(tl.int64) * stride_mq
        )  # fmt: skip
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for tile in range(0, n_full):
            acc = _probability_tile(
                acc, m_shift, inv_l, row_real, q, k_head_ptr, v_head_ptr, stride_ks, stride_kd, stride_vs, stride_vd,
                tile * BLOCK_N, offs_n, offs_d, row_limit, key_padding_ptr, map_row_ptr, kv_len, qk_scale, softcap_in,
                softcap_out, d_mask, BLOCK_SIZE, False, HAS_KEY_PADDING, HAS_SOFTCAP, EVEN_D, IEEE_DOT,
            )  # fmt: skip
        for tile in range(n_full, n_tiles):
            acc = _probability_tile(
                acc, m_shift, inv_l, row_real, q, k_head_ptr, v_head_ptr, stride_ks, stride_kd, stride_vs, stride_vd,
                tile * BLOCK_N, offs_n, offs_d, row_limit, key_padding_ptr, map_row_ptr, kv_len, qk_scale, softcap_in,
                softcap_out, d_mask, BLOCK_SIZE, True, HAS_KEY_PADDING, HAS_SOFTCAP, EVEN_D, IEEE_DOT,
            )  # fmt: skip

        out_ptrs = (
            Out + batch * stride_ob + q_head.to(tl.int64) * stride_oh + row_start.to(tl.int64) * stride_os
            + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
        )  # fmt: skip
        tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])


if triton is not None:

    @triton.jit
    def _attend_and_record_tile(
        acc,
        m_i,
        l_i,
        q,
        k_head_ptr,
        v_head_ptr,
        stride_ks,
        stride_kd,
        stride_vs,
        stride_vd,
        start,
        offs_n,
        offs_d,
        row_limit,
        key_padding_ptr,
        record_ptrs,
        kv_len,
        qk_scale,
        softcap_in,
        softcap_out,
        d_mask,
        CAUSAL: tl.constexpr,
        HAS_KEY_PADDING: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        EVEN_D: tl.constexpr,
        IEEE_DOT: tl.constexpr,
    ):
        """Online-softmax step over one key tile that also stores each row's largest score (log2 units) at
        ``record_ptrs [BLOCK_M]``: the tile's largest probability is ``exp2(that - lse)`` once lse is known."""
        scores = _key_tile_scores(
            q, k_head_ptr, stride_ks, stride_kd, start, offs_n, offs_d, row_limit, key_padding_ptr, kv_len,
            qk_scale, softcap_in, softcap_out, d_mask, CAUSAL, HAS_KEY_PADDING, HAS_SOFTCAP, EVEN_D, IEEE_DOT,
        )  # fmt: skip
        tile_max = tl.max(scores, 1)
        tl.store(record_ptrs, tile_max)
        m_new = tl.maximum(m_i, tile_max)
        if CAUSAL or HAS_KEY_PADDING:
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no NaN for rows without a visible key yet
        else:
            m_shift = m_new
        p = tl.exp2(scores - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_key_tile(v_head_ptr, start, offs_n, offs_d, stride_vs, stride_vd, kv_len, d_mask, CAUSAL, EVEN_D)
        acc = _dot_acc(p.to(v.dtype), v, acc * alpha[:, None], IEEE_DOT)
        return acc, m_new, l_i

    @triton.jit
    def _ground_truth_single_pass_kernel(
        Q, K, V, Out, BlockMap, KeyPadding, Scratch,
        stride_qb, stride_qh, stride_qs, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_ob, stride_oh, stride_os, stride_od,
        stride_mb, stride_mh, stride_mq,
        stride_pb,
        stride_slot,
        q_len, kv_len, n_row_tiles, n_work, hq, group, map_head_divisor,
        qk_scale, softcap_in, softcap_out,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        EPILOGUE_TILES: tl.constexpr,
        HAS_KEY_PADDING: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        IEEE_DOT: tl.constexpr,
    ):  # fmt: skip
        """Persistent grid: (slots,). Each program takes work items (row tile, query head, batch) in turn, longest
        rows first, and owns ``Scratch[slot]`` fp32 ``[n key tiles, BLOCK_M]``: the per-row maximum score of every key
        tile, written during the single pass over K/V and read back by the epilogue once the rows' lse are known.
        Extra memory is ``slots * nK * BLOCK_M`` floats, independent of the number of heads and linear in S."""
        EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
        ROW_TILES_PER_BLOCK: tl.constexpr = BLOCK_SIZE // BLOCK_M
        slot = tl.program_id(0)
        scratch = Scratch + slot.to(tl.int64) * stride_slot
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        offs_n = tl.arange(0, BLOCK_N)
        offs_e = tl.arange(0, EPILOGUE_TILES)
        causal_offset = kv_len - q_len

        for work in range(slot, n_work, tl.num_programs(0)):
            heads_batches = n_work // n_row_tiles  # hq * B
            row_tile = n_row_tiles - 1 - work // heads_batches
            q_head = work % hq
            batch = ((work % heads_batches) // hq).to(tl.int64)
            kv_head = q_head // group
            map_head = q_head // map_head_divisor
            q_block = row_tile // ROW_TILES_PER_BLOCK
            row_start = row_tile * BLOCK_M
            pos = row_start + offs_m
            row_valid = pos < q_len
            q_ptrs = (
                Q + batch * stride_qb + q_head.to(tl.int64) * stride_qh + row_start.to(tl.int64) * stride_qs
                + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
            )  # fmt: skip
            q = tl.load(q_ptrs, mask=row_valid[:, None] & d_mask[None, :], other=0.0)
            k_head_ptr = K + batch * stride_kb + kv_head.to(tl.int64) * stride_kh
            v_head_ptr = V + batch * stride_vb + kv_head.to(tl.int64) * stride_vh
            key_padding_ptr = KeyPadding + batch * stride_pb
            row_limit = pos + causal_offset
            last_limit = tl.minimum(row_start + BLOCK_M, q_len) - 1 + causal_offset
            n_tiles = last_limit // BLOCK_N + 1
            n_full = (row_start + causal_offset + 1) // BLOCK_N
            row_real = row_valid
            if HAS_KEY_PADDING:
                row_real = row_real & (tl.load(key_padding_ptr + row_limit, mask=row_valid, other=0) != 0)

            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for tile in range(0, n_full):
                acc, m_i, l_i = _attend_and_record_tile(
                    acc, m_i, l_i, q, k_head_ptr, v_head_ptr, stride_ks, stride_kd, stride_vs, stride_vd,
                    tile * BLOCK_N, offs_n, offs_d, row_limit, key_padding_ptr, scratch + tile * BLOCK_M + offs_m,
                    kv_len, qk_scale, softcap_in, softcap_out, d_mask,
                    False, HAS_KEY_PADDING, HAS_SOFTCAP, EVEN_D, IEEE_DOT,
                )  # fmt: skip
            for tile in range(n_full, n_tiles):
                acc, m_i, l_i = _attend_and_record_tile(
                    acc, m_i, l_i, q, k_head_ptr, v_head_ptr, stride_ks, stride_kd, stride_vs, stride_vd,
                    tile * BLOCK_N, offs_n, offs_d, row_limit, key_padding_ptr, scratch + tile * BLOCK_M + offs_m,
                    kv_len, qk_scale, softcap_in, softcap_out, d_mask,
                    True, HAS_KEY_PADDING, HAS_SOFTCAP, EVEN_D, IEEE_DOT,
                )  # fmt: skip
            seen_any = l_i > 0.0
            l_safe = tl.where(seen_any, l_i, 1.0)
            out_ptrs = (
                Out + batch * stride_ob + q_head.to(tl.int64) * stride_oh + row_start.to(tl.int64) * stride_os
                + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
            )  # fmt: skip
            out_tile = (acc / l_safe[:, None]).to(Out.dtype.element_ty)
            tl.store(out_ptrs, out_tile, mask=row_valid[:, None] & d_mask[None, :])

            # Epilogue: probability maxima exp2(max score - lse) per key tile, max over the real rows, into the map.
            row_used = row_real & seen_any
            lse = tl.where(row_used, m_i + tl.log2(l_safe), 0.0)  # [BLOCK_M], log2 units
            tl.debug_barrier()  # the records were stored by other threads of this program
            map_row_ptr = (
                BlockMap + batch * stride_mb + map_head.to(tl.int64) * stride_mh + q_block.to(tl.int64) * stride_mq
            )  # fmt: skip
            for first in range(0, n_tiles, EPILOGUE_TILES):
                tiles = first + offs_e  # [EPILOGUE_TILES]
                in_row = tiles < n_tiles
                recorded = tl.load(
                    scratch + tiles[:, None] * BLOCK_M + offs_m[None, :], mask=in_row[:, None], other=float("-inf")
                )  # [EPILOGUE_TILES, BLOCK_M]
                probs = tl.where(row_used[None, :], tl.exp2(recorded - lse[None, :]), 0.0)
                map_ptrs = map_row_ptr + (tiles * BLOCK_N) // BLOCK_SIZE
                tl.atomic_max(map_ptrs, tl.max(probs, 1), mask=in_row, sem="relaxed")
            tl.debug_barrier()  # the next work item overwrites the records


def _ground_truth_launch_config(head_dim: int, block_size: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes of the ground-truth kernel (checked against sm_90 register use: no spills for fp16/bf16).

    At most 128 query rows (64 for head_dim > 128), 64-column key tiles (32 for head_dim > 128 and fp32 inputs).
    """
    padded_dim = max(16, 1 << (head_dim - 1).bit_length())
    block_m = min(block_size, 128 if padded_dim <= 128 else 64)
    fp32 = dtype == torch.float32
    config = {
        "BLOCK_M": block_m,
        "BLOCK_N": min(block_size, 32 if padded_dim > 128 or fp32 else 64),
        # 4 warps for 64-row tiles: 2.06x faster than 8 at 32k on an H200 (results/sweep_ground_truth_2026-11-29.json)
        "num_warps": 8 if block_m >= 128 or padded_dim > 128 or fp32 else 4,
        "num_stages": 1 if fp32 else (3 if padded_dim <= 128 else 2),
    }
    # "$SEER_ADAPTER_GT_CONFIG=block_m=64,block_n=64,warps=4,stages=3" overrides fields (tuning on a new GPU).
    names = {"block_m": "BLOCK_M", "block_n": "BLOCK_N", "warps": "num_warps", "stages": "num_stages"}
    text = os.environ.get(ENV_GT_CONFIG, "").strip()
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in names or not value.strip().isdigit():
            raise ValueError(f"${ENV_GT_CONFIG}={text!r}: expected comma-separated {sorted(names)}=<int>")
        config[names[key.strip()]] = int(value)
    if block_size % config["BLOCK_M"] or block_size % config["BLOCK_N"]:
        raise ValueError(f"${ENV_GT_CONFIG}: block_m and block_n must divide block_size={block_size}")
    return config


def _ground_truth_slots(device: torch.device) -> int:
    """Programs of the persistent single-pass kernel: enough to fill every SM a few times over."""
    if device.type != "cuda":
        return 4  # the interpreter runs programs one after another
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def attention_with_block_ground_truth_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 64,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    group_max: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `attention_with_block_ground_truth_reference`, in one Triton kernel (fp16/bf16/fp32).

    Memory beyond the inputs: ``out`` (laid out ``[B, S, Hq, D]``, returned as ``[B, Hq, S, D]``) and the fp32
    ``block_map [B, Hq or Hkv, nQ, nK]``.
    """
    return _launch_ground_truth(q, k, v, block_size, scale, key_padding_mask, softcap, group_max)


def _launch_ground_truth(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    scale: float | None,
    key_padding_mask: torch.Tensor | None,
    softcap: float | None,
    group_max: bool,
    out: torch.Tensor | None = None,
    single_pass: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the ground-truth kernel; ``out``: optional preallocated ``[B, Hq, S, D]`` result (tests poison it).

    ``single_pass`` (default): one pass over K/V with per-program records of the tile maxima (`_ground_truth_single
    _pass_kernel`); otherwise the two-pass kernel that needs no scratch memory (1.5x the ``Q K^T`` work).
    """
    if triton is None:
        raise RuntimeError("attention_with_block_ground_truth_triton needs triton; use the reference backend")
    _check_ground_truth_inputs(q, k, v, block_size, key_padding_mask)
    check_triton_inputs(q, k, v, block_size, key_padding_mask=key_padding_mask)
    batch, hq, q_len, head_dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    group = hq // hkv
    n_q_blocks, n_k_blocks = math.ceil(q_len / block_size), math.ceil(kv_len / block_size)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

    if out is None:
        out = empty_like_bshd(q)  # [B, Hq, S, D]
    map_heads = hkv if group_max else hq
    block_map = torch.zeros(batch, map_heads, n_q_blocks, n_k_blocks, dtype=torch.float32, device=q.device)
    if q_len == 0 or batch == 0 or hq == 0:
        return out, block_map
    key_padding, has_key_padding = key_padding_as_int8(key_padding_mask, q)
    qk_scale, softcap_in, softcap_out = softcap_factors(scale, softcap)
    launch = _ground_truth_launch_config(head_dim, block_size, q.dtype)
    n_row_tiles = triton.cdiv(q_len, launch["BLOCK_M"])
    if single_pass:
        n_work = n_row_tiles * hq * batch
        slots = min(n_work, _ground_truth_slots(q.device))
        n_key_tiles = triton.cdiv(kv_len, launch["BLOCK_N"])
        scratch = torch.empty(slots, n_key_tiles * launch["BLOCK_M"], dtype=torch.float32, device=q.device)
        with on_tensor_device(q):
            _ground_truth_single_pass_kernel[(slots,)](
                q, k, v, out, block_map, key_padding, scratch,
                *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                block_map.stride(0), block_map.stride(1), block_map.stride(2),
                key_padding.stride(0),
                scratch.stride(0),
                q_len, kv_len, n_row_tiles, n_work, hq, group, group if group_max else 1,
                qk_scale, softcap_in, softcap_out,
                HEAD_DIM=head_dim,
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                BLOCK_SIZE=block_size,
                EPILOGUE_TILES=16,
                HAS_KEY_PADDING=has_key_padding,
                HAS_SOFTCAP=softcap is not None,
                IEEE_DOT=q.dtype == torch.float32,
                **launch,
            )  # fmt: skip
        return out, normalize_block_map_rows(block_map)
    with on_tensor_device(q):
        _ground_truth_fwd_kernel[(n_row_tiles, hq, batch)](
            q, k, v, out, block_map, key_padding,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            block_map.stride(0), block_map.stride(1), block_map.stride(2),
            key_padding.stride(0),
            q_len, kv_len, n_row_tiles, group, group if group_max else 1,
            qk_scale, softcap_in, softcap_out,
            HEAD_DIM=head_dim,
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            BLOCK_SIZE=block_size,
            HAS_KEY_PADDING=has_key_padding,
            HAS_SOFTCAP=softcap is not None,
            IEEE_DOT=q.dtype == torch.float32,
            **launch,
        )  # fmt: skip
    return out, normalize_block_map_rows(block_map)


# Registered under the kernel op "ground_truth": backends are chosen by the rules of the attention kernels.
register_backend("reference", attention_with_block_ground_truth_reference, device_types=(), op="ground_truth")
if triton is not None:
    register_backend("triton", attention_with_block_ground_truth_triton, device_types=("cuda",), op="ground_truth")
GROUND_TRUTH_BACKENDS = _OPS["ground_truth"]


def attention_with_block_ground_truth(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 64,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    group_max: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention and the pooled, renormalised block map; dispatches like `block_sparse_attention`.

    Args:
        q: ``[B, Hq, S, D]``; k, v: ``[B, Hkv, Sk, D]``.
        block_size, scale, key_padding_mask, softcap, group_max: see `attention_with_block_ground_truth_reference`.
        backend: force ``"reference"`` or ``"triton"`` (default: ``$SEER_ADAPTER_KERNEL``, else by device).

    Returns:
        ``out [B, Hq, S, D]`` in ``q.dtype`` and ``block_map`` fp32 ``[B, Hq or Hkv, nQ, nK]``.
    """
    return backend_for("ground_truth", q.device, backend)(
        q,
        k,
        v,
        block_size=block_size,
        scale=scale,
        key_padding_mask=key_padding_mask,
        softcap=softcap,
        group_max=group_max,
    )
