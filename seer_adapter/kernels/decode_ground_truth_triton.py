"""Decode-gate distillation target in one Triton kernel (same contract as `decode_block_ground_truth_reference`).

The PyTorch reference materialises fp32 scores ``[B, Hkv, g, rows, S]`` chunk by chunk and makes some ten passes
over them (scale, mask, log-sum-exp, block max, exp, ...): memory-bound, and at a 16k context it was most of a
distillation step's time. Here one program per (tile of query rows, record head, batch row) keeps everything in
registers:

1. pass 1 over the causally visible key tiles (one key block per tile): the running row max and sum of the softmax,
   giving each row's log-sum-exp (log2 units);
2. pass 2 over the blocks strictly earlier than the tile's last row: per row, ``exp2(max score - lse)`` (the
   ``"max"`` target) or ``sum exp2(score - lse)`` (``"mass"``), stored into a record (zero where the block is not
   strictly earlier than the row's token).

Two strategies, one kernel:

* **per head** (`decode_block_ground_truth_triton_per_head`, backend ``"triton_per_head"``, by name only): a
  program holds 64 rows of one query head and writes a per-query-head record ``[B, Hq, R, nK - 1]``; the reduction
  over the GQA group (max or sum) runs in PyTorch on that record (``R · nK`` floats per head, against ``R · S``
  scores);
* **grouped** (`decode_block_ground_truth_triton_grouped`, backend ``"triton"``, the CUDA default): a program stacks
  the group's query heads as the rows of one tile (``HEADS_PAD × BLOCK_M`` rows, ``BLOCK_M = 64 / HEADS_PAD`` tokens
  of each head) and reduces over them in registers, so its record is the ``[B, Hkv, R, nK - 1]`` result itself:
  ``Hq / Hkv`` times less memory (Qwen2.5-0.5B at 16k with 16-token blocks: ~0.94 GB -> ~134 MB per layer) and no
  reduction pass; the same FLOPs, K traffic per query row and about the same number of programs. On an H200
  (``benchmarks/results/bench_decode_target_20261129-170434.json``) the per-head time over the grouped one is
  1.07-1.38 with 16-token blocks (Qwen at 16k: 4.4 against 3.2 ms) and 0.96-1.10 with 64-token blocks.

Row normalisation in PyTorch for both. Work: two ``Q·Kᵀ`` over the causal rows, no score bytes.
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

__all__ = ["decode_block_ground_truth_triton_per_head", "decode_block_ground_truth_triton_grouped"]


@triton.jit
def _decode_target_kernel(
    Q, K, Rows, Record, KeyPadding,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_rb, stride_rh, stride_rr,
    stride_pb,
    n_rows, kv_len, n_earlier, n_row_tiles, group, heads_per_program,
    qk_scale, softcap_in, softcap_out,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    KEY_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    MASS: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):  # fmt: skip
    """Grid: (row tiles, record heads, B). Q [B, Hq, S, D]; K [B, Hkv, S, D]; Rows long [R] token positions;
    KeyPadding int8 [B, S]; Record fp32 [B, record heads, R, nK - 1], every entry of the valid rows written.

    Record head ``r`` covers query heads ``r · heads_per_program + h`` (``h < heads_per_program``: 1 per head, the
    GQA group when grouped), stacked head-major as the tile's ``HEADS_PAD × BLOCK_M`` rows; a record entry is the max
    (or sum) over them. Key tiles are ``KEY_TILE`` keys: one block, or several blocks below 16 keys (a ``tl.dot``
    needs 16 columns)."""
    ROWS: tl.constexpr = HEADS_PAD * BLOCK_M
    BLOCKS_PER_TILE: tl.constexpr = KEY_TILE // BLOCK_SIZE
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    row_tile = n_row_tiles - 1 - tl.program_id(0)  # latest rows (the longest) first
    record_head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    first_q_head = record_head * heads_per_program
    kv_head = first_q_head // group

    offs_r = tl.arange(0, ROWS)
    head_in_program = offs_r // BLOCK_M
    idx = row_tile * BLOCK_M + offs_r % BLOCK_M  # [ROWS] record row of each tile row
    token_valid = idx < n_rows
    row_valid = token_valid & (head_in_program < heads_per_program)  # padding heads see no key
    pos = tl.load(Rows + idx, mask=token_valid, other=0)  # [ROWS] token positions
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    offs_n = tl.arange(0, KEY_TILE)

    q_head = first_q_head + tl.where(row_valid, head_in_program, 0)
    q_ptrs = (
        Q + batch * stride_qb + q_head.to(tl.int64)[:, None] * stride_qh
        + pos.to(tl.int64)[:, None] * stride_qs + offs_d[None, :] * stride_qd
    )  # fmt: skip
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_mask[None, :], other=0.0)  # [ROWS, BLOCK_D]
    k_head_ptr = K + batch * stride_kb + kv_head.to(tl.int64) * stride_kh
    key_padding_ptr = KeyPadding + batch * stride_pb

    row_limit = tl.where(row_valid, pos, -1)  # last visible key of each row (rows past R see none)
    last = tl.max(row_limit, 0)
    first = tl.min(tl.where(row_valid, pos, kv_len), 0)
    n_tiles = last // KEY_TILE + 1  # key tiles holding any visible key of the tile's rows
    n_full = (first + 1) // KEY_TILE  # key tiles every valid row sees entirely

    # Pass 1: row max and sum of the softmax (log2 units).
    m_i, l_i = _softmax_stats(
        q, k_head_ptr, stride_ks, stride_kd, n_full, n_tiles, offs_n, offs_d, row_limit, key_padding_ptr, kv_len,
        qk_scale, softcap_in, softcap_out, d_mask, ROWS, KEY_TILE, HAS_KEY_PADDING, HAS_SOFTCAP, EVEN_D, IEEE_DOT,
    )  # fmt: skip
    seen = l_i > 0.0
    # +inf for rows without a visible key: every exp2(score - lse) below is then 0, never NaN.
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))

    # Pass 2: the blocks strictly earlier than the tile's last row are whole and before every key they could hide,
    # so no causal check; a row keeps only the blocks strictly earlier than its own token's block.
    row_block = pos // BLOCK_SIZE
    out_idx = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    out_valid = out_idx < n_rows
    record_ptrs = Record + batch * stride_rb + record_head.to(tl.int64) * stride_rh + out_idx.to(tl.int64) * stride_rr
    if BLOCKS_PER_TILE == 1:
        for block in range(0, last // BLOCK_SIZE):
            # [ROWS, BLOCK_SIZE] scores of the block
            scores = _key_tile_scores(
                q, k_head_ptr, stride_ks, stride_kd, block * BLOCK_SIZE, offs_n, offs_d, row_limit, key_padding_ptr,
                kv_len, qk_scale, softcap_in, softcap_out, d_mask, False, HAS_KEY_PADDING, HAS_SOFTCAP, EVEN_D,
                IEEE_DOT,
            )  # fmt: skip
            if MASS:
                value = tl.sum(tl.exp2(scores - lse[:, None]), 1)
            else:
                value = tl.exp2(tl.max(scores, 1) - lse)
            value = tl.where((block < row_block) & row_valid, value, 0.0)  # [ROWS]
            heads = tl.reshape(value, (HEADS_PAD, BLOCK_M))
            per_token = tl.sum(heads, 0) if MASS else tl.max(heads, 0)  # [BLOCK_M]
            tl.store(record_ptrs + block, per_token, mask=out_valid)
        written = last // BLOCK_SIZE
    else:
        # Blocks below 16 keys: one key tile holds BLOCKS_PER_TILE of them. The last tile may reach past the rows'
        # limits and the keys' end, so tiles are bounds-checked; a row's own and later blocks are zeroed as above.
        offs_b = tl.arange(0, BLOCKS_PER_TILE)
        n_record_tiles = tl.cdiv(last // BLOCK_SIZE, BLOCKS_PER_TILE)
        for tile in range(0, n_record_tiles):
            scores = _key_tile_scores(
                q, k_head_ptr, stride_ks, stride_kd, tile * KEY_TILE, offs_n, offs_d, row_limit, key_padding_ptr,
                kv_len, qk_scale, softcap_in, softcap_out, d_mask, True, HAS_KEY_PADDING, HAS_SOFTCAP, EVEN_D,
                IEEE_DOT,
            )  # fmt: skip
            blocks = tl.reshape(scores, (ROWS, BLOCKS_PER_TILE, BLOCK_SIZE))  # [ROWS, blocks of the tile, keys]
            if MASS:
                value = tl.sum(tl.exp2(blocks - lse[:, None, None]), 2)
            else:
                value = tl.exp2(tl.max(blocks, 2) - lse[:, None])  # [ROWS, BLOCKS_PER_TILE]
            block_ids = tile * BLOCKS_PER_TILE + offs_b
            value = tl.where((block_ids[None, :] < row_block[:, None]) & row_valid[:, None], value, 0.0)
            heads = tl.reshape(value, (HEADS_PAD, BLOCK_M, BLOCKS_PER_TILE))
            per_token = tl.sum(heads, 0) if MASS else tl.max(heads, 0)  # [BLOCK_M, BLOCKS_PER_TILE]
            store_mask = out_valid[:, None] & (block_ids < n_earlier)[None, :]
            tl.store(record_ptrs[:, None] + block_ids[None, :], per_token, mask=store_mask)
        written = n_record_tiles * BLOCKS_PER_TILE
    for block in range(written, n_earlier):  # later blocks: no row of the tile has them earlier
        tl.store(record_ptrs + block, tl.zeros([BLOCK_M], tl.float32), mask=out_valid)


def _decode_target_launch_config(head_dim: int, block_size: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes: 64 query rows against one key block per tile (32 rows for wide heads, big blocks or fp32)."""
    padded_dim = max(16, triton.next_power_of_2(head_dim))
    wide = padded_dim > 128 or block_size > 64 or dtype == torch.float32
    return {"BLOCK_M": 32 if wide else 64, "num_warps": 8 if block_size > 64 else 4, "num_stages": 2}


def _decode_target_record(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    scale: float | None,
    key_padding_mask: torch.Tensor | None,
    softcap: float | None,
    query_rows: torch.Tensor,
    target: str,
    record: torch.Tensor | None,
    grouped: bool,
) -> torch.Tensor:
    """Launch the kernel; returns the record ``[B, Hkv if grouped else Hq, R, nK - 1]`` (``record`` when given)."""
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"the decode-target kernel needs a power-of-two block_size, got {block_size}")
    key_tile = max(16, block_size)  # blocks below 16 keys share a key tile (tl.dot needs 16 columns)
    check_triton_inputs(q, k, k, key_tile, key_padding_mask=key_padding_mask)
    batch, hq, length, head_dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    record_heads, heads_per_program = (hkv, group) if grouped else (hq, 1)
    n_rows = query_rows.numel()
    n_earlier = math.ceil(length / block_size) - 1
    shape = (batch, record_heads, n_rows, n_earlier)
    if record is None:
        record = torch.empty(shape, dtype=torch.float32, device=q.device)
    if record.shape != shape or record.dtype != torch.float32 or not record.is_contiguous():
        raise ValueError(f"record must be a contiguous fp32 {list(shape)} tensor")
    if n_rows and n_earlier and batch and record_heads:
        scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        key_padding, has_key_padding = key_padding_as_int8(key_padding_mask, q)
        qk_scale, softcap_in, softcap_out = softcap_factors(scale, softcap)
        launch = _decode_target_launch_config(head_dim, key_tile, q.dtype)
        heads_pad = triton.next_power_of_2(heads_per_program)
        block_m = max(1, launch["BLOCK_M"] // heads_pad)  # about as many tile rows either way
        if heads_pad * block_m >= 128:
            launch["num_warps"] = 8
        n_row_tiles = triton.cdiv(n_rows, block_m)
        with on_tensor_device(q):
            _decode_target_kernel[(n_row_tiles, record_heads, batch)](
                q, k, query_rows, record, key_padding,
                *q.stride(), *k.stride(),
                record.stride(0), record.stride(1), record.stride(2),
                key_padding.stride(0),
                n_rows, length, n_earlier, n_row_tiles, group, heads_per_program,
                qk_scale, softcap_in, softcap_out,
                HEAD_DIM=head_dim,
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                BLOCK_SIZE=block_size,
                KEY_TILE=key_tile,
                BLOCK_M=block_m,
                HEADS_PAD=heads_pad,
                MASS=target == "mass",
                HAS_KEY_PADDING=has_key_padding,
                HAS_SOFTCAP=softcap is not None,
                IEEE_DOT=q.dtype == torch.float32,
                num_warps=launch["num_warps"],
                num_stages=launch["num_stages"],
            )  # fmt: skip
    return record


def decode_block_ground_truth_triton_per_head(
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
    record = _decode_target_record(
        q, k, block_size, scale, key_padding_mask, softcap, query_rows, target, record, grouped=False
    )
    batch, hq, _, _ = q.shape
    grouped = record.view(batch, k.shape[1], hq // k.shape[1], *record.shape[2:])
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
    """Same contract as `decode_block_ground_truth_triton_per_head`, the group reduced inside the kernel.

    ``record``: optional preallocated fp32 ``[B, Hkv, R, nK - 1]`` (the un-normalised result, every entry written).
    Memory beyond the inputs: that record, the size of the result.
    """
    query_rows = check_decode_target_inputs(q, k, key_padding_mask, query_rows, target)
    record = _decode_target_record(
        q, k, block_size, scale, key_padding_mask, softcap, query_rows, target, record, grouped=True
    )
    return normalise_decode_target(record, query_rows, key_padding_mask)


# what `seer_adapter.distill.default_decode_token_fraction` sizes: the record's heads
decode_block_ground_truth_triton_grouped.record_heads = "kv"
decode_block_ground_truth_triton_per_head.record_heads = "q"
register_backend("triton", decode_block_ground_truth_triton_grouped, device_types=("cuda",), op="decode_ground_truth")
# the first strategy, by name only (backend="triton_per_head"): slower with small blocks, Hq / Hkv x the memory
register_backend(
    "triton_per_head", decode_block_ground_truth_triton_per_head, device_types=(), op="decode_ground_truth"
)
