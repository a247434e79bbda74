"""Fused block selection in Triton: gate scores straight to sorted kept-block lists.

The PyTorch path (`block_lists.select_block_lists_reference`) goes scores -> softmax -> top-k -> boolean mask ->
cumsum/scatter -> index lists, about twenty passes over a ``[B, H, nQ, nK]`` tensor plus a top-k (at 128k tokens
and 32 heads that tensor has 134 M elements per layer). Here one program owns one query-block row: it loads the
row's scores once (``nK`` floats in registers), applies the softmax, finds the top-k threshold by bisection on the
order-preserving integer image of the floats (32 counting passes over registers, no sort), adds the forced sink and
local blocks, and writes the kept block indices in ascending order with a prefix sum. Ties at the k-th value are
broken towards lower block indices. Only the lists (``[B, H, nQ, W]`` int32), their counts and the per-row count of
allowed blocks (for density statistics) are written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import on_tensor_device, register_backend
from .block_lists import BlockLists, check_selection_inputs, selection_top_k

__all__ = ["select_block_lists_triton"]

_METHOD_CODES = {"dense": 0, "threshold": 1, "nz_ratio": 2, "token_budget": 2}


@triton.jit
def _select_block_lists_kernel(
    Scores, BlockValid, SinkBlock, LocalBlock, Indices, Counts, AllowedCounts,
    stride_sb, stride_sh, stride_sq, stride_sk,
    stride_vb, stride_lb,
    stride_ib, stride_ih, stride_iq,
    stride_cb, stride_ch,
    n_q_blocks, n_k_blocks, q_len, kv_len, threshold, top_k, dense_last_query_blocks,
    BLOCK_SIZE: tl.constexpr,
    NK_PAD: tl.constexpr,
    METHOD: tl.constexpr,
    APPLY_SOFTMAX: tl.constexpr,
    HAS_BLOCK_VALID: tl.constexpr,
    HAS_SINK: tl.constexpr,
    FORCE_LOCAL: tl.constexpr,
    HAS_LOCAL_TENSOR: tl.constexpr,
    EARLY_EXIT: tl.constexpr,
):  # fmt: skip
    """Grid: (nQ, H, B). Scores [B, H, nQ, nK] float; BlockValid int8 [B, nK]; SinkBlock int64 [B];
    Indices int32 [B, H, nQ, W]; Counts, AllowedCounts int32 [B, H, nQ]. METHOD: 0 dense, 1 threshold, 2 top-k.
    EARLY_EXIT: stop the bisection at the first candidate that exactly k blocks reach (the same kept set)."""
    q_block = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)

    offs = tl.arange(0, NK_PAD)  # [NK_PAD] key-block ids
    if HAS_LOCAL_TENSOR:  # one query row whose current block is read from the device (shape-static steps)
        local = tl.load(LocalBlock + batch * stride_lb)
        allowed = (offs < n_k_blocks) & (offs <= local)
    else:
        last_row = tl.minimum((q_block + 1) * BLOCK_SIZE, q_len) - 1 + (kv_len - q_len)
        allowed = (offs < n_k_blocks) & (offs * BLOCK_SIZE <= last_row)
        local = q_block + (n_k_blocks - n_q_blocks)
    if HAS_BLOCK_VALID:
        allowed = allowed & (tl.load(BlockValid + batch * stride_vb + offs, mask=offs < n_k_blocks, other=0) != 0)
    row_ptr = Scores + batch * stride_sb + head * stride_sh + q_block.to(tl.int64) * stride_sq
    scores = tl.load(row_ptr + offs * stride_sk, mask=allowed, other=float("-inf")).to(tl.float32)
    scores = tl.where(allowed, scores, float("-inf"))
    if APPLY_SOFTMAX:
        row_max = tl.max(scores, 0)
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        weights = tl.where(allowed, tl.exp(scores - row_max), 0.0)
        total = tl.sum(weights, 0)
        probs = weights / tl.where(total > 0.0, total, 1.0)
    else:
        probs = scores

    forced = offs < 0  # all False
    if FORCE_LOCAL:
        forced = forced | (offs == local)
    if HAS_SINK:
        forced = forced | (offs == tl.load(SinkBlock + batch))
    forced = forced & allowed
    n_allowed = tl.sum(allowed.to(tl.int32), 0)

    if METHOD == 0:
        keep = allowed
    elif METHOD == 1:
        keep = allowed & (probs > threshold)
    else:
        # Order-preserving int32 image of the ranking value (forced blocks rank first, disallowed last).
        rank = tl.where(forced, float("inf"), tl.where(allowed, probs, float("-inf")))
        bits = rank.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        # Largest t with count(key >= t) >= top_k among allowed blocks: bisection over [-2^31, 2^31).
        low = tl.full([], -2147483648, tl.int64)
        high = tl.full([], 2147483648, tl.int64)
        key64 = key.to(tl.int64)
        if EARLY_EXIT:
            # A candidate that exactly k blocks reach separates the k-th value from the next: keeping key >= it is
            # the bisection's own result. Random rows reach one after about 16 passes (a step's slowest of 64 rows:
            # about 22) instead of 32; ties at the k-th value still take all 32.
            passes = 0
            exact = 0
            while (passes < 32) & (exact == 0):
                mid = low + (high - low) // 2
                reached = tl.sum((allowed & (key64 >= mid)).to(tl.int32), 0)
                low = tl.where(reached >= top_k, mid, low)
                high = tl.where(reached >= top_k, high, mid)
                exact = (reached == top_k).to(tl.int32)
                passes += 1
        else:
            for _ in range(32):
                mid = low + (high - low) // 2
                enough = tl.sum((allowed & (key64 >= mid)).to(tl.int32), 0) >= top_k
                low = tl.where(enough, mid, low)
                high = tl.where(enough, high, mid)
        above = allowed & (key64 > low)
        at = allowed & (key64 == low)
        room = top_k - tl.sum(above.to(tl.int32), 0)
        keep = above | (at & (tl.cumsum(at.to(tl.int32), 0) <= room))
    keep = keep | forced
    dense_row = (offs * 0 + q_block) >= n_q_blocks - dense_last_query_blocks  # [NK_PAD], all equal
    keep = keep | (allowed & dense_row)

    keep_i32 = keep.to(tl.int32)
    slot = tl.cumsum(keep_i32, 0) - 1
    list_ptr = Indices + batch * stride_ib + head * stride_ih + q_block.to(tl.int64) * stride_iq
    tl.store(list_ptr + slot, offs, mask=keep)
    count_offset = batch * stride_cb + head * stride_ch + q_block
    tl.store(Counts + count_offset, tl.sum(keep_i32, 0))
    tl.store(AllowedCounts + count_offset, n_allowed)


# Stop the top-k bisection early (see the kernel). Off until timed on a GPU (benchmarks/bench_select.py times both):
# the same kept lists by construction, about half the counting passes.
EARLY_EXIT_SEARCH = False


def _select_num_warps(nk_pad: int, programs: int) -> int:
    # A row lives in registers: at most 32 values per thread. With few rows (a decoding step: one per row and KV
    # head) the GPU is nearly idle and each row's 32 bisection passes set the time: spread a row over more warps.
    if programs < 1024:
        return max(1, min(8, nk_pad // 256))
    return max(1, min(8, nk_pad // 1024))


def select_block_lists_triton(
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
    """Same contract as `block_lists.select_block_lists_reference`, one Triton program per query-block row.

    The lists are ``W = min(k + 2, nK)`` wide for top-k methods (k plus at most the two forced blocks) and ``nK``
    wide otherwise; entries past each row's count are unspecified. No host synchronisation.
    """
    check_selection_inputs(scores, method, block_size, q_len, kv_len, block_valid, local_block)
    batch, heads, n_q_blocks, n_k_blocks = scores.shape
    top_k = selection_top_k(method, n_k_blocks, block_size=block_size, nz_ratio=nz_ratio, token_budget=token_budget)
    topk_method = method in ("nz_ratio", "token_budget")
    width = min(top_k + 2, n_k_blocks) if topk_method and dense_last_query_blocks == 0 else n_k_blocks
    device = scores.device
    indices = torch.empty(batch, heads, n_q_blocks, max(width, 1), dtype=torch.int32, device=device)
    counts = torch.empty(batch, heads, n_q_blocks, dtype=torch.int32, device=device)
    allowed_counts = torch.empty_like(counts)
    if counts.numel() == 0:
        return BlockLists(indices, counts.zero_(), n_k_blocks), allowed_counts.zero_()
    valid = (
        (block_valid if block_valid.stride(-1) == 1 else block_valid.contiguous()).view(torch.int8)  # rows strided
        if block_valid is not None
        else torch.ones(1, 1, dtype=torch.int8, device=device)
    )
    sink = sink_block.to(torch.int64).contiguous() if sink_block is not None else valid.new_zeros(1, dtype=torch.int64)
    local = sink if local_block is None else local_block.to(torch.int64).contiguous()
    local_stride = 1 if local_block is not None and local_block.shape[0] == batch and batch > 1 else 0
    nk_pad = max(16, triton.next_power_of_2(n_k_blocks))
    with on_tensor_device(scores):
        _select_block_lists_kernel[(n_q_blocks, heads, batch)](
            scores, valid, sink, local, indices, counts, allowed_counts,
            *scores.stride(),
            valid.stride(0), local_stride,
            indices.stride(0), indices.stride(1), indices.stride(2),
            counts.stride(0), counts.stride(1),
            n_q_blocks, n_k_blocks, q_len, kv_len, float(threshold), top_k, dense_last_query_blocks,
            BLOCK_SIZE=block_size,
            NK_PAD=nk_pad,
            METHOD=_METHOD_CODES[method],
            APPLY_SOFTMAX=apply_softmax,
            HAS_BLOCK_VALID=block_valid is not None,
            HAS_SINK=sink_block is not None,
            FORCE_LOCAL=force_local_block,
            HAS_LOCAL_TENSOR=local_block is not None,
            EARLY_EXIT=EARLY_EXIT_SEARCH,
            num_warps=_select_num_warps(nk_pad, n_q_blocks * heads * batch),
        )  # fmt: skip
    return BlockLists(indices, counts, n_k_blocks), allowed_counts


register_backend("triton", select_block_lists_triton, device_types=("cuda",), op="select")
