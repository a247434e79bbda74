"""Decode-gate distillation target in one Triton kernel (same contract as `decode_block_ground_truth_reference`).

The PyTorch reference materialises fp32 scores ``[B, Hkv, g, rows, S]`` chunk by chunk and makes some ten passes
over them (scale, mask, log-sum-exp, block max, exp, ...): memory-bound, and at a 16k context it was most of a
distillation step's time. Here one program per (tile of query rows, query head, batch row) keeps everything in
registers:

1. pass 1 over the causally visible key tiles (one key block per tile): the running row max and sum of the softmax,
   giving each row's log-sum-exp (log2 units);
2. pass 2 over the blocks strictly earlier than the tile's last row: per row, ``exp2(max score - lse)`` (the
   ``"max"`` target) or ``sum exp2(score - lse)`` (``"mass"``), stored into a per-query-head record
   ``[B, Hq, R, nK - 1]`` (zero where the block is not strictly earlier than the row's token).

The reduction over the GQA group (max or sum) and the row normalisation run in PyTorch on that small record
(``R · nK`` floats per head, against ``R · S`` scores). Work: two ``Q·Kᵀ`` over the causal rows, no score bytes.

A second strategy, `decode_block_ground_truth_triton_grouped` (backend ``"triton_grouped"``, chosen explicitly;
not yet timed on a GPU), stacks the query heads of a GQA group as the rows of one tile (``GROUP_PAD × BLOCK_M`` rows:
``BLOCK_M`` tokens of each head) and reduces over the group in registers, so its record is the ``[B, Hkv, R, nK - 1]``
result itself: ``Hq / Hkv`` times less memory (7× on Qwen2.5-0.5B: at 16k and 16-token blocks ~0.94 GB per layer ->
~134 MB) and no PyTorch reduction pass; the same FLOPs and, with ``BLOCK_M = 64 / GROUP_PAD``, the same K traffic per
query row and about the same number of programs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import on_tensor_device, register_backend
from .block_sparse_triton import _key_tile_scores, check_triton_inputs, key_padding_as_int8, softcap_factors
from .decode_ground_truth import check_decode_target_inputs, normalise_decode_target
from .ground_truth import _softmax_stats

__all__ = ["decode_block_ground_truth_triton", "decode_block_ground_truth_triton_grouped"]


@triton.jit
def _decode_target_kernel(
    Q, K, Rows, Record, KeyPadding,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_rb, stride_rh, stride_rr,
    stride_pb,
    n_rows, kv_len, n_earlier, n_row_tiles, group,
    qk_scale, softcap_in, softcap_out,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASS: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):  # fmt: skip
    """Grid: (row tiles, Hq, B). Q [B, Hq, S, D]; K [B, Hkv, S, D]; Rows long [R] token positions; Record fp32
    [B, Hq, R, nK - 1], every entry of the valid rows written; KeyPadding int8 [B, S]."""
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    row_tile = n_row_tiles - 1 - tl.program_id(0)  # latest rows (the longest) first
    q_head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    kv_head = q_head // group

    offs_m = tl.arange(0, BLOCK_M)
    idx = row_tile * BLOCK_M + offs_m  # [BLOCK_M] record rows
    row_valid = idx < n_rows
    pos = tl.load(Rows + idx, mask=row_valid, other=0)  # [BLOCK_M] token positions
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_SIZE)

    q_ptrs = (
        Q + batch * stride_qb + q_head.to(tl.int64) * stride_qh
        + pos.to(tl.int64)[:, None] * stride_qs + offs_d[None, :] * stride_qd
    )  # fmt: skip
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_head_ptr = K + batch * stride_kb + kv_head.to(tl.int64) * stride_kh
    key_padding_ptr = KeyPadding + batch * stride_pb

    row_limit = tl.where(row_valid, pos, -1)  # last visible key of each row (rows past R see none)
    last = tl.max(row_limit, 0)
    first = tl.min(tl.where(row_valid, pos, kv_len), 0)
    n_tiles = last // BLOCK_SIZE + 1  # key tiles holding any visible key of the tile's rows
    n_full = (first + 1) // BLOCK_SIZE  # key tiles every valid row sees entirely

    # Pass 1: row max and sum of the softmax (log2 units).
    m_i, l_i = _softmax_stats(
        q, k_head_ptr, stride_ks, stride_kd, n_full, n_tiles, offs_n, offs_d, row_limit, key_padding_ptr, kv_len,
        qk_scale, softcap_in, softcap_out, d_mask, BLOCK_M, BLOCK_SIZE, HAS_KEY_PADDING, HAS_SOFTCAP, EVEN_D, IEEE_DOT,
    )  # fmt: skip
    seen = l_i > 0.0
    # +inf for rows without a visible key: every exp2(score - lse) below is then 0, never NaN.
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))

    # Pass 2: the blocks strictly earlier than the tile's last row are whole and before every key they could hide,
    # so no causal check; a row keeps only the blocks strictly earlier than its own token's block.
    row_block = pos // BLOCK_SIZE
    record_ptrs = Record + batch * stride_rb + q_head.to(tl.int64) * stride_rh + idx.to(tl.int64) * stride_rr
    for block in range(0, last // BLOCK_SIZE):
        # [BLOCK_M, BLOCK_SIZE] scores of the block
        scores = _key_tile_scores(
            q, k_head_ptr, stride_ks, stride_kd, block * BLOCK_SIZE, offs_n, offs_d, row_limit, key_padding_ptr,
            kv_len, qk_scale, softcap_in, softcap_out, d_mask, False, HAS_KEY_PADDING, HAS_SOFTCAP, EVEN_D, IEEE_DOT,
        )  # fmt: skip
        if MASS:
            value = tl.sum(tl.exp2(scores - lse[:, None]), 1)
        else:
            value = tl.exp2(tl.max(scores, 1) - lse)
        value = tl.where(block < row_block, value, 0.0)
        tl.store(record_ptrs + block, value, mask=row_valid)
    for block in range(last // BLOCK_SIZE, n_earlier):  # later blocks: no row of the tile has them earlier
        tl.store(record_ptrs + block, tl.zeros([BLOCK_M], tl.float32), mask=row_valid)


@triton.jit
def _decode_target_grouped_kernel(
    Q, K, Rows, Record, KeyPadding,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_rb, stride_rh, stride_rr,
    stride_pb,
    n_rows, kv_len, n_earlier, n_row_tiles, group,
    qk_scale, softcap_in, softcap_out,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    MASS: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):  # fmt: skip
    """Grid: (row tiles, Hkv, B). Tile row ``r`` is query head ``r // BLOCK_M`` of the group at record row
    ``tile · BLOCK_M + r % BLOCK_M`` (head-major, so a reshape to ``[GROUP_PAD, BLOCK_M]`` groups each token's heads).
    Record fp32 [B, Hkv, R, nK - 1], every entry of the valid rows written: the group's max (or sum) per block."""
    ROWS: tl.constexpr = GROUP_PAD * BLOCK_M
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    row_tile = n_row_tiles - 1 - tl.program_id(0)  # latest rows (the longest) first
    kv_head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)

    offs_r = tl.arange(0, ROWS)
    head_in_group = offs_r // BLOCK_M
    idx = row_tile * BLOCK_M + offs_r % BLOCK_M  # [ROWS] record row of each tile row
    token_valid = idx < n_rows
    row_valid = token_valid & (head_in_group < group)  # padding heads (GROUP_PAD > group) see no key
    pos = tl.load(Rows + idx, mask=token_valid, other=0)  # [ROWS] token positions
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_SIZE)

    q_head = kv_head * group + tl.where(row_valid, head_in_group, 0)
    q_ptrs = (
        Q + batch * stride_qb + q_head.to(tl.int64)[:, None] * stride_qh
        + pos.to(tl.int64)[:, None] * stride_qs + offs_d[None, :] * stride_qd
    )  # fmt: skip
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_mask[None, :], other=0.0)  # [ROWS, BLOCK_D]
    k_head_ptr = K + batch * stride_kb + kv_head.to(tl.int64) * stride_kh
    key_padding_ptr = KeyPadding + batch * stride_pb

    row_limit = tl.where(row_valid, pos, -1)
    last = tl.max(row_limit, 0)
    first = tl.min(tl.where(row_valid, pos, kv_len), 0)
    n_tiles = last // BLOCK_SIZE + 1
    n_full = (first + 1) // BLOCK_SIZE

    m_i, l_i = _softmax_stats(
        q, k_head_ptr, stride_ks, stride_kd, n_full, n_tiles, offs_n, offs_d, row_limit, key_padding_ptr, kv_len,
        qk_scale, softcap_in, softcap_out, d_mask, ROWS, BLOCK_SIZE, HAS_KEY_PADDING, HAS_SOFTCAP, EVEN_D, IEEE_DOT,
    )  # fmt: skip
    seen = l_i > 0.0
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))

    row_block = pos // BLOCK_SIZE
    out_idx = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    out_valid = out_idx < n_rows
    record_ptrs = Record + batch * stride_rb + kv_head.to(tl.int64) * stride_rh + out_idx.to(tl.int64) * stride_rr
    for block in range(0, last // BLOCK_SIZE):
        scores = _key_tile_scores(
            q, k_head_ptr, stride_ks, stride_kd, block * BLOCK_SIZE, offs_n, offs_d, row_limit, key_padding_ptr,
            kv_len, qk_scale, softcap_in, softcap_out, d_mask, False, HAS_KEY_PADDING, HAS_SOFTCAP, EVEN_D, IEEE_DOT,
        )  # fmt: skip
        if MASS:
            value = tl.sum(tl.exp2(scores - lse[:, None]), 1)
        else:
            value = tl.exp2(tl.max(scores, 1) - lse)
        value = tl.where((block < row_block) & row_valid, value, 0.0)  # [ROWS]
        heads = tl.reshape(value, (GROUP_PAD, BLOCK_M))
        per_token = tl.sum(heads, 0) if MASS else tl.max(heads, 0)  # [BLOCK_M]
        tl.store(record_ptrs + block, per_token, mask=out_valid)
    for block in range(last // BLOCK_SIZE, n_earlier):
        tl.store(record_ptrs + block, tl.zeros([BLOCK_M], tl.float32), mask=out_valid)


def _decode_target_launch_config(head_dim: int, block_size: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes: 64 query rows against one key block per tile (32 rows for wide heads, big blocks or fp32)."""
    padded_dim = max(16, triton.next_power_of_2(head_dim))
    wide = padded_dim > 128 or block_size > 64 or dtype == torch.float32
    return {"BLOCK_M": 32 if wide else 64, "num_warps": 8 if block_size > 64 else 4, "num_stages": 2}


def decode_block_ground_truth_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 64,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    query_rows: torch.Tensor | None = None,
    target: str = "max",
    record: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `decode_block_ground_truth_reference` (fp16/bf16/fp32 inputs, power-of-two block size).

    ``record``: optional preallocated fp32 ``[B, Hq, R, nK - 1]`` per-query-head record, every entry written (tests
    poison it). Memory beyond the inputs: that record, ``Hq / Hkv`` times the result.
    """
    query_rows = check_decode_target_inputs(q, k, key_padding_mask, query_rows, target)
    check_triton_inputs(q, k, k, block_size, key_padding_mask=key_padding_mask)
    batch, hq, length, head_dim = q.shape
    hkv = k.shape[1]
    n_rows = query_rows.numel()
    n_earlier = math.ceil(length / block_size) - 1
    if record is None:
        record = torch.empty(batch, hq, n_rows, n_earlier, dtype=torch.float32, device=q.device)
    if record.shape != (batch, hq, n_rows, n_earlier) or record.dtype != torch.float32 or not record.is_contiguous():
        raise ValueError(f"record must be a contiguous fp32 [{batch}, {hq}, {n_rows}, {n_earlier}] tensor")
    if n_rows and n_earlier and batch and hq:
        scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        key_padding, has_key_padding = key_padding_as_int8(key_padding_mask, q)
        qk_scale, softcap_in, softcap_out = softcap_factors(scale, softcap)
        launch = _decode_target_launch_config(head_dim, block_size, q.dtype)
        n_row_tiles = triton.cdiv(n_rows, launch["BLOCK_M"])
        with on_tensor_device(q):
            _decode_target_kernel[(n_row_tiles, hq, batch)](
                q, k, query_rows, record, key_padding,
                *q.stride(), *k.stride(),
                record.stride(0), record.stride(1), record.stride(2),
                key_padding.stride(0),
                n_rows, length, n_earlier, n_row_tiles, hq // hkv,
                qk_scale, softcap_in, softcap_out,
                HEAD_DIM=head_dim,
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                BLOCK_SIZE=block_size,
                MASS=target == "mass",
                HAS_KEY_PADDING=has_key_padding,
                HAS_SOFTCAP=softcap is not None,
                IEEE_DOT=q.dtype == torch.float32,
                **launch,
            )  # fmt: skip
    grouped = record.view(batch, hkv, hq // hkv, n_rows, n_earlier)
    per_block = grouped.amax(dim=2) if target == "max" else grouped.sum(dim=2)  # [B, Hkv, R, nK - 1]
    return normalise_decode_target(per_block, query_rows, key_padding_mask)


def decode_block_ground_truth_triton_grouped(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 64,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    query_rows: torch.Tensor | None = None,
    target: str = "max",
    record: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `decode_block_ground_truth_triton`, the group reduced inside the kernel.

    ``record``: optional preallocated fp32 ``[B, Hkv, R, nK - 1]`` (the un-normalised result, every entry written).
    Memory beyond the inputs: that record, the size of the result.
    """
    query_rows = check_decode_target_inputs(q, k, key_padding_mask, query_rows, target)
    check_triton_inputs(q, k, k, block_size, key_padding_mask=key_padding_mask)
    batch, hq, length, head_dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    n_rows = query_rows.numel()
    n_earlier = math.ceil(length / block_size) - 1
    if record is None:
        record = torch.empty(batch, hkv, n_rows, n_earlier, dtype=torch.float32, device=q.device)
    if record.shape != (batch, hkv, n_rows, n_earlier) or record.dtype != torch.float32 or not record.is_contiguous():
        raise ValueError(f"record must be a contiguous fp32 [{batch}, {hkv}, {n_rows}, {n_earlier}] tensor")
    if n_rows and n_earlier and batch and hkv:
        scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        key_padding, has_key_padding = key_padding_as_int8(key_padding_mask, q)
        qk_scale, softcap_in, softcap_out = softcap_factors(scale, softcap)
        launch = _decode_target_launch_config(head_dim, block_size, q.dtype)
        group_pad = triton.next_power_of_2(group)
        block_m = max(1, launch["BLOCK_M"] // group_pad)  # about as many tile rows as the per-head kernel's
        if group_pad * block_m >= 128:
            launch["num_warps"] = 8
        n_row_tiles = triton.cdiv(n_rows, block_m)
        with on_tensor_device(q):
            _decode_target_grouped_kernel[(n_row_tiles, hkv, batch)](
                q, k, query_rows, record, key_padding,
                *q.stride(), *k.stride(),
                record.stride(0), record.stride(1), record.stride(2),
                key_padding.stride(0),
                n_rows, length, n_earlier, n_row_tiles, group,
                qk_scale, softcap_in, softcap_out,
                HEAD_DIM=head_dim,
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                BLOCK_SIZE=block_size,
                BLOCK_M=block_m,
                GROUP_PAD=group_pad,
                MASS=target == "mass",
                HAS_KEY_PADDING=has_key_padding,
                HAS_SOFTCAP=softcap is not None,
                IEEE_DOT=q.dtype == torch.float32,
                num_warps=launch["num_warps"],
                num_stages=launch["num_stages"],
            )  # fmt: skip
    return normalise_decode_target(record, query_rows, key_padding_mask)


register_backend("triton", decode_block_ground_truth_triton, device_types=("cuda",), op="decode_ground_truth")
# chosen by name only (backend="triton_grouped"): not in the CUDA default order until it has been timed on a GPU
register_backend("triton_grouped", decode_block_ground_truth_triton_grouped, device_types=(), op="decode_ground_truth")
