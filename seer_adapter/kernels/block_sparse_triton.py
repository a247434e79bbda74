"""Block-sparse causal FlashAttention forward in Triton, GQA-native, for long-context prefill.

The kernel follows the conventions of `reference.py` exactly (shapes, bottom-right causal alignment, per-query-head
or per-KV-head block masks, key padding, soft-capping, zero output and ``lse = -inf`` for rows that see no key).

How it works:

* The boolean block mask is turned into sorted per-row lists of kept key blocks (`block_mask_to_indices`), with
  blocks that no row of the query block may see (above the causal diagonal, or made only of padding) removed.
* One program owns one tile of query rows: ``BLOCK_M`` consecutive rows of one query block, for one query head
  (per-query-head masks) or for ``HEADS`` query heads of one GQA group stacked into ``HEADS * BLOCK_M`` rows
  (per-KV-head masks: every K/V tile is then loaded once for the whole stack). The KV head is read by index
  (``q_head // group``); K and V are never expanded.
* The program walks only the kept key blocks of its list, in two loops: first the blocks that every row of the tile
  sees entirely (no element-wise masking at all), then the at most two blocks that straddle the causal diagonal
  (element-wise causal mask, also covering the ragged end of the keys). Because lists are sorted and causally
  filtered, the straddling blocks are always the last one or two entries.
* Online softmax in the log2 domain (``log2(e)`` folded into the scale, ``exp2``), fp32 accumulators, tensor-core
  ``tl.dot`` on fp16/bf16 operands (IEEE fp32 dots for fp32 inputs).

The output is returned as ``[B, Hq, S, D]`` whose memory is laid out ``[B, S, Hq, D]``: ``out.transpose(1, 2)`` is
contiguous, which is the layout transformers wants back from an attention function, so no copy is needed there.

The forward is wrapped in the custom op ``torch.ops.seer_adapter.block_sparse_attention_fwd`` (with a fake
implementation) so that ``torch.compile`` treats it as one opaque node. Forward only: the base model runs frozen.
"""

import math
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from . import on_tensor_device, register_backend
from .block_lists import BlockLists, block_mask_to_indices, key_block_has_tokens
from .reference import check_attention_inputs

__all__ = [
    "KernelConfig",
    "block_mask_to_indices",
    "block_sparse_attention_triton",
    "choose_kernel_config",
    "key_block_has_tokens",
]

# Environment variable that overrides the launch heuristic, e.g. "block_m=64,block_n=64,heads=2,warps=4,stages=3".
ENV_KERNEL_CONFIG = "SEER_ADAPTER_TRITON_CONFIG"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
TWO_LOG2E = tl.constexpr(2.8853900817779268)


# ----------------------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel launch.

    Attributes:
        block_m: query rows per head in one program; divides ``block_size``.
        block_n: key columns per inner step; divides ``block_size``.
        heads: query heads of one GQA group stacked in one program (per-KV-head masks only); divides the group.
        num_warps, num_stages: Triton launch parameters.
    """

    block_m: int
    block_n: int
    heads: int = 1
    num_warps: int = 4
    num_stages: int = 3


def choose_kernel_config(
    head_dim: int, block_size: int, group: int, mask_per_kv_head: bool, dtype: torch.dtype = torch.bfloat16
) -> KernelConfig:
    """Autotune-free launch heuristic for Hopper-class GPUs (overridable with ``$SEER_ADAPTER_TRITON_CONFIG``).

    A program holds at most 128 query rows (64 for head_dim > 128) so that the fp32 accumulator stays in registers;
    per-KV-head masks stack as many query heads of a group as fit, so each K/V tile is shared by them. 128-row tiles
    and head_dim 256 get 8 warps. The choices were checked against sm_90 register and shared-memory use (no spills for
    fp16/bf16); fp32 inputs (tests, not production) get small tiles without pipelining.
    """
    padded_dim = triton.next_power_of_2(head_dim)
    max_rows = 128 if padded_dim <= 128 else 64
    block_m = min(block_size, max_rows)
    heads = 1
    if mask_per_kv_head and dtype != torch.float32:
        while group % (heads * 2) == 0 and heads * 2 * block_m <= max_rows:
            heads *= 2
    rows = heads * block_m
    if dtype == torch.float32:
        config = KernelConfig(block_m=block_m, block_n=min(block_size, 32), heads=1, num_warps=8, num_stages=1)
    else:
        config = KernelConfig(
            block_m=block_m,
            block_n=min(block_size, 32 if padded_dim > 128 else 64),
            heads=heads,
            num_warps=8 if rows >= 128 or padded_dim > 128 else 4,
            num_stages=3 if padded_dim <= 128 else 2,
        )
    return _apply_config_override(config, block_size, group, mask_per_kv_head)


def _apply_config_override(config: KernelConfig, block_size: int, group: int, mask_per_kv_head: bool) -> KernelConfig:
    """``config`` with the fields named in ``$SEER_ADAPTER_TRITON_CONFIG`` replaced (validated)."""
    text = os.environ.get(ENV_KERNEL_CONFIG, "").strip()
    if not text:
        return config
    names = {"block_m": "block_m", "block_n": "block_n", "heads": "heads", "warps": "num_warps", "stages": "num_stages"}
    changes: dict[str, int] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key.strip() not in names or not value.strip().isdigit():
            raise ValueError(f"${ENV_KERNEL_CONFIG}={text!r}: expected comma-separated {sorted(names)}=<int>")
        changes[names[key.strip()]] = int(value)
    config = replace(config, **changes)
    if not mask_per_kv_head:
        config = replace(config, heads=1)
    validate_kernel_config(config, block_size, group)
    return config


def validate_kernel_config(config: KernelConfig, block_size: int, group: int) -> None:
    """Raise ValueError when ``config`` cannot tile ``block_size`` / ``group``."""
    for name in ("block_m", "block_n", "heads"):
        value = getattr(config, name)
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name}={value} must be a power of two")
    if block_size % config.block_m or block_size % config.block_n or config.block_n < 16:
        raise ValueError(
            f"block_m={config.block_m} and block_n={config.block_n} (>= 16) must divide block_size={block_size}"
        )
    if group % config.heads or config.heads * config.block_m < 16:
        raise ValueError(f"heads={config.heads} must divide the GQA group ({group}) and heads * block_m must be >= 16")


# ----------------------------------------------------------------------------------------------------------------------
# Triton device code (also used by ground_truth.py)
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits at +-inf, no NaN for large |x|.
    return 1.0 - 2.0 / (tl.exp2(x * TWO_LOG2E) + 1.0)


@triton.jit
def _dot(a, b, IEEE_DOT: tl.constexpr):
    # a @ b on tensor cores, fp32 result; fp32 operands use exact IEEE products instead of TF32.
    if IEEE_DOT:
        result = tl.dot(a, b, input_precision="ieee")
    else:
        result = tl.dot(a, b)
    return result


@triton.jit
def _dot_acc(a, b, acc, IEEE_DOT: tl.constexpr):
    # acc + a @ b with the fp32 accumulator fused into the tensor-core instruction.
    if IEEE_DOT:
        result = tl.dot(a, b, acc, input_precision="ieee")
    else:
        result = tl.dot(a, b, acc)
    return result


@triton.jit
def _load_key_tile(
    head_ptr, start, offs_n, offs_d, stride_s, stride_d, kv_len, d_mask, CHECK_COLS: tl.constexpr, EVEN_D: tl.constexpr
):
    # One [BLOCK_N, BLOCK_D] tile of K or V at key columns start + offs_n; bounds are checked only where the tile can
    # be ragged. The offsets are formed per tile: a hoisted [BLOCK_N, BLOCK_D] offset tensor would stay live in
    # registers across the loop (and spill).
    cols = start + offs_n  # [BLOCK_N]
    tile_ptr = head_ptr + tl.cast(start, tl.int64) * stride_s
    offsets = offs_n[:, None] * stride_s + offs_d[None, :] * stride_d
    if CHECK_COLS:
        if EVEN_D:
            tile = tl.load(tile_ptr + offsets, mask=(cols < kv_len)[:, None], other=0.0)
        else:
            tile = tl.load(tile_ptr + offsets, mask=(cols < kv_len)[:, None] & d_mask[None, :], other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(tile_ptr + offsets)
        else:
            tile = tl.load(tile_ptr + offsets, mask=d_mask[None, :], other=0.0)
    return tile


@triton.jit
def _key_tile_scores(
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
    """Scores of the query tile against keys ``start + offs_n``, in log2 units, ``-inf`` where not visible.

    q: [ROWS, BLOCK_D]; row_limit: [ROWS] last visible key column of each row. Returns [ROWS, BLOCK_N] fp32.
    """
    cols = start + offs_n  # [BLOCK_N]
    k = _load_key_tile(k_head_ptr, start, offs_n, offs_d, stride_ks, stride_kd, kv_len, d_mask, CAUSAL, EVEN_D)
    qk = _dot(q, tl.trans(k), IEEE_DOT)  # [ROWS, BLOCK_N]
    if HAS_SOFTCAP:
        scores = _tanh(qk * softcap_in) * softcap_out
    else:
        scores = qk * qk_scale
    if CAUSAL:
        visible = (cols[None, :] <= row_limit[:, None]) & (cols[None, :] < kv_len)
        scores = tl.where(visible, scores, float("-inf"))
    if HAS_KEY_PADDING:
        real_key = tl.load(key_padding_ptr + cols, mask=cols < kv_len, other=0) != 0
        scores = tl.where(real_key[None, :], scores, float("-inf"))
    return scores


@triton.jit
def _attend_key_tile(
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
    """One online-softmax step over a key tile. acc: [ROWS, BLOCK_D] fp32; m_i, l_i: [ROWS] fp32 (log2 units)."""
    scores = _key_tile_scores(
        q, k_head_ptr, stride_ks, stride_kd, start, offs_n, offs_d, row_limit, key_padding_ptr, kv_len,
        qk_scale, softcap_in, softcap_out, d_mask, CAUSAL, HAS_KEY_PADDING, HAS_SOFTCAP, EVEN_D, IEEE_DOT,
    )  # fmt: skip
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    if CAUSAL or HAS_KEY_PADDING:
        # A row that has seen no key yet keeps m = -inf; shift by 0 instead so that exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_shift = m_new
    p = tl.exp2(scores - m_shift[:, None])  # [ROWS, BLOCK_N]
    alpha = tl.exp2(m_i - m_shift)  # [ROWS]
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_key_tile(v_head_ptr, start, offs_n, offs_d, stride_vs, stride_vd, kv_len, d_mask, CAUSAL, EVEN_D)
    acc = _dot_acc(p.to(v.dtype), v, acc * alpha[:, None], IEEE_DOT)
    return acc, m_new, l_i


@triton.jit
def _block_sparse_attention_fwd_kernel(
    Q, K, V, Out, Lse, KvBlockIndices, KvBlockCounts, KeyPadding,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh,
    stride_ib, stride_ih, stride_iq,
    stride_cb, stride_ch,
    stride_pb,
    q_len, kv_len, n_row_tiles, group, head_tiles_per_kv_head,
    qk_scale, softcap_in, softcap_out,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEADS: tl.constexpr,
    MASK_PER_KV_HEAD: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):  # fmt: skip
    """Grid: (row tiles, head programs, B). Q [B, Hq, S, D]; K, V [B, Hkv, Sk, D]; Out like Q; Lse [B, Hq, S] fp32;
    KvBlockIndices int32 [B, Hm, nQ, W] (sorted, causally filtered); KvBlockCounts int32 [B, Hm, nQ];
    KeyPadding int8 [B, Sk]."""
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    ROWS: tl.constexpr = HEADS * BLOCK_M
    SUB_TILES: tl.constexpr = BLOCK_SIZE // BLOCK_N  # key tiles per key block
    ROW_TILES_PER_BLOCK: tl.constexpr = BLOCK_SIZE // BLOCK_M

    # Longest rows (latest query blocks) first: better tail balance under causal masking.
    row_tile = n_row_tiles - 1 - tl.program_id(0)
    head_program = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    q_block = row_tile // ROW_TILES_PER_BLOCK
    row_start = row_tile * BLOCK_M
    if MASK_PER_KV_HEAD:
        kv_head = head_program // head_tiles_per_kv_head
        first_q_head = kv_head * group + (head_program % head_tiles_per_kv_head) * HEADS
        mask_head = kv_head
    else:
        first_q_head = head_program
        kv_head = head_program // group
        mask_head = head_program

    offs_r = tl.arange(0, ROWS)
    head_of_row = offs_r // BLOCK_M  # [ROWS] query head offset within the stack
    row_in_tile = offs_r % BLOCK_M
    pos = row_start + row_in_tile  # [ROWS] query row index in [0, S)
    row_valid = pos < q_len
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)

    q_ptrs = (
        Q + batch * stride_qb + first_q_head.to(tl.int64) * stride_qh + row_start.to(tl.int64) * stride_qs
        + (head_of_row * stride_qh + row_in_tile * stride_qs)[:, None] + offs_d[None, :] * stride_qd
    )  # fmt: skip
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_mask[None, :], other=0.0)  # [ROWS, BLOCK_D]
    k_head_ptr = K + batch * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_head_ptr = V + batch * stride_vb + kv_head.to(tl.int64) * stride_vh
    key_padding_ptr = KeyPadding + batch * stride_pb

    causal_offset = kv_len - q_len
    row_limit = pos + causal_offset  # [ROWS] last key column each row may see
    # Key blocks below `full_below` are seen entirely by every row of the tile.
    full_below = (row_start + causal_offset + 1) // BLOCK_SIZE

    index_ptr = (
        KvBlockIndices + batch * stride_ib + mask_head.to(tl.int64) * stride_ih + q_block.to(tl.int64) * stride_iq
    )  # fmt: skip
    n_blocks = tl.load(KvBlockCounts + batch * stride_cb + mask_head.to(tl.int64) * stride_ch + q_block)
    # Sorted, causally filtered lists: only the last two entries can straddle the diagonal.
    last_block = tl.load(index_ptr + n_blocks - 1, mask=n_blocks >= 1, other=-1)
    second_last_block = tl.load(index_ptr + n_blocks - 2, mask=n_blocks >= 2, other=-1)
    n_full = n_blocks - (last_block >= full_below).to(tl.int32) - (second_last_block >= full_below).to(tl.int32)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for step in range(0, n_full * SUB_TILES):
        key_block = tl.load(index_ptr + step // SUB_TILES)
        start = key_block * BLOCK_SIZE + (step % SUB_TILES) * BLOCK_N
        acc, m_i, l_i = _attend_key_tile(
            acc, m_i, l_i, q, k_head_ptr, v_head_ptr, stride_ks, stride_kd, stride_vs, stride_vd, start, offs_n, offs_d,
            row_limit, key_padding_ptr, kv_len, qk_scale, softcap_in, softcap_out, d_mask,
            False, HAS_KEY_PADDING, HAS_SOFTCAP, EVEN_D, IEEE_DOT,
        )  # fmt: skip
    for step in range(n_full * SUB_TILES, n_blocks * SUB_TILES):
        key_block = tl.load(index_ptr + step // SUB_TILES)
        start = key_block * BLOCK_SIZE + (step % SUB_TILES) * BLOCK_N
        acc, m_i, l_i = _attend_key_tile(
            acc, m_i, l_i, q, k_head_ptr, v_head_ptr, stride_ks, stride_kd, stride_vs, stride_vd, start, offs_n, offs_d,
            row_limit, key_padding_ptr, kv_len, qk_scale, softcap_in, softcap_out, d_mask,
            True, HAS_KEY_PADDING, HAS_SOFTCAP, EVEN_D, IEEE_DOT,
        )  # fmt: skip

    seen_any = l_i > 0.0
    l_safe = tl.where(seen_any, l_i, 1.0)
    out = acc / l_safe[:, None]  # rows that saw nothing have acc = 0 -> zeros
    out_ptrs = (
        Out + batch * stride_ob + first_q_head.to(tl.int64) * stride_oh + row_start.to(tl.int64) * stride_os
        + (head_of_row * stride_oh + row_in_tile * stride_os)[:, None] + offs_d[None, :] * stride_od
    )  # fmt: skip
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])
    lse = tl.where(seen_any, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))  # natural log
    lse_ptrs = Lse + batch * stride_lb + (first_q_head + head_of_row).to(tl.int64) * stride_lh + pos  # [ROWS]
    tl.store(lse_ptrs, lse, mask=row_valid)


# ----------------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------------

_KERNELS_INTERPRETED = not isinstance(_block_sparse_attention_fwd_kernel, triton.runtime.JITFunction)


def check_triton_device(tensor: torch.Tensor) -> None:
    """Raise a clear error when the Triton kernels cannot run on ``tensor``'s device.

    Compiled kernels need CUDA (or ROCm) tensors; kernels built under ``TRITON_INTERPRET=1`` run anywhere.
    """
    if _KERNELS_INTERPRETED or tensor.device.type == "cuda":
        return
    raise RuntimeError(
        f"the Triton kernels of seer_adapter cannot run on {tensor.device.type} tensors. On CPU set TRITON_INTERPRET=1 "
        "before seer_adapter.kernels is first imported (small shapes only), or use the reference backend "
        "(SEER_ADAPTER_KERNEL=reference)."
    )


def check_triton_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, **extra_tensors: torch.Tensor | None
) -> None:
    """Dtype / block-size / head-dim / device requirements of the Triton kernels (on top of the shape checks of
    `check_attention_inputs`); ``extra_tensors`` (block mask, padding mask) must be on q's device too."""
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"Triton kernels need q, k, v of one dtype among fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"Triton kernels need a power-of-two block_size >= 16, got {block_size}")
    if q.shape[-1] > 256:
        raise ValueError(f"Triton kernels support head_dim <= 256, got {q.shape[-1]}")
    others = {"k": k, "v": v, **{name: tensor for name, tensor in extra_tensors.items() if tensor is not None}}
    for name, tensor in others.items():
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device} but q is on {q.device}")
    check_triton_device(q)


def softcap_factors(scale: float, softcap: float | None) -> tuple[float, float, float]:
    """(qk_scale, softcap_in, softcap_out) so that the kernel's log2-unit score is ``qk * qk_scale`` or
    ``tanh(qk * softcap_in) * softcap_out`` (= ``cap * tanh(scale * qk / cap) * log2(e)``)."""
    qk_scale = scale * float(LOG2E.value)
    if softcap is None:
        return qk_scale, 1.0, 1.0
    if softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    return qk_scale, scale / softcap, softcap * float(LOG2E.value)


def empty_like_bshd(q: torch.Tensor) -> torch.Tensor:
    """Uninitialised ``[B, Hq, S, D]`` tensor laid out as ``[B, S, Hq, D]`` (its transpose(1, 2) is contiguous)."""
    batch, heads, q_len, head_dim = q.shape
    return q.new_empty(batch, q_len, heads, head_dim).transpose(1, 2)


def key_padding_as_int8(key_padding_mask: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """int8 ``[B, Sk]`` view (or a 1-element dummy) of the key padding mask, and whether there is one."""
    if key_padding_mask is None:
        return torch.ones(1, 1, dtype=torch.int8, device=q.device), False
    return key_padding_mask.contiguous().view(torch.int8), True


def _launch_block_sparse_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float,
    key_padding_mask: torch.Tensor | None,
    softcap: float | None,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    block_indices: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel; returns ``out [B, Hq, S, D]`` (q.dtype, BSHD memory) and ``lse [B, Hq, S]`` fp32.

    ``config`` overrides the launch heuristic (benchmark sweeps); ``out`` / ``lse`` are optional preallocated results
    (``lse`` must be contiguous), e.g. NaN-poisoned buffers in tests. ``block_indices`` are precomputed
    ``(kv_block_indices, kv_block_counts)`` of ``block_mask``; they must come from `block_mask_to_indices` called with
    ``q_len``, ``kv_len`` and the same ``key_padding_mask`` (the kernel relies on sorted, causally filtered lists).
    """
    check_attention_inputs(q, k, v, block_mask, block_size, key_padding_mask)
    check_triton_inputs(q, k, v, block_size, block_mask=block_mask, key_padding_mask=key_padding_mask)
    batch, hq, q_len, head_dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    group = hq // hkv
    mask_per_kv_head = block_mask.shape[1] != hq  # Hm == Hkv < Hq
    if config is None:
        config = choose_kernel_config(head_dim, block_size, group, mask_per_kv_head, q.dtype)
    else:
        validate_kernel_config(config, block_size, group)
        if not mask_per_kv_head:
            config = replace(config, heads=1)

    if out is None:
        out = empty_like_bshd(q)  # [B, Hq, S, D]
    if lse is None:
        lse = torch.empty(batch, hq, q_len, dtype=torch.float32, device=q.device)  # [B, Hq, S]
    if q_len == 0 or batch == 0 or hq == 0:
        return out, lse
    if block_indices is None:
        block_indices = block_mask_to_indices(
            block_mask,
            block_size=block_size,
            q_len=q_len,
            kv_len=kv_len,
            key_padding_mask=key_padding_mask,
            compact=False,
        )
    kv_block_indices, kv_block_counts = block_indices  # int32 [B, Hm, nQ, W], [B, Hm, nQ]
    key_padding, has_key_padding = key_padding_as_int8(key_padding_mask, q)
    qk_scale, softcap_in, softcap_out = softcap_factors(scale, softcap)

    n_row_tiles = triton.cdiv(q_len, config.block_m)
    head_tiles_per_kv_head = group // config.heads if mask_per_kv_head else 1
    head_programs = hkv * head_tiles_per_kv_head if mask_per_kv_head else hq
    grid = (n_row_tiles, head_programs, batch)
    with on_tensor_device(q):
        _block_sparse_attention_fwd_kernel[grid](
            q, k, v, out, lse, kv_block_indices, kv_block_counts, key_padding,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            lse.stride(0), lse.stride(1),
            kv_block_indices.stride(0), kv_block_indices.stride(1), kv_block_indices.stride(2),
            kv_block_counts.stride(0), kv_block_counts.stride(1),
            key_padding.stride(0),
            q_len, kv_len, n_row_tiles, group, head_tiles_per_kv_head,
            qk_scale, softcap_in, softcap_out,
            HEAD_DIM=head_dim,
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            BLOCK_SIZE=block_size,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            HEADS=config.heads,
            MASK_PER_KV_HEAD=mask_per_kv_head,
            HAS_KEY_PADDING=has_key_padding,
            HAS_SOFTCAP=softcap is not None,
            IEEE_DOT=q.dtype == torch.float32,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )  # fmt: skip
    return out, lse


# ----------------------------------------------------------------------------------------------------------------------
# Custom op (torch.compile) and public entry point
# ----------------------------------------------------------------------------------------------------------------------

_OP_NAME = "seer_adapter::block_sparse_attention_fwd"
_OP_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor block_mask, int block_size, float scale, Tensor? key_padding_mask, "
    "float? softcap) -> (Tensor, Tensor)"
)


def _block_sparse_attention_op_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float,
    key_padding_mask: torch.Tensor | None,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_block_sparse_forward(q, k, v, block_mask, block_size, scale, key_padding_mask, softcap)


def _block_sparse_attention_op_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float,
    key_padding_mask: torch.Tensor | None,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, hq, q_len, _ = q.shape
    return empty_like_bshd(q), q.new_empty(batch, hq, q_len, dtype=torch.float32)


_INDEXED_OP_NAME = "seer_adapter::block_sparse_attention_indexed_fwd"
_INDEXED_OP_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor kv_block_indices, Tensor kv_block_counts, int n_k_blocks, int block_size, "
    "float scale, Tensor? key_padding_mask, float? softcap) -> (Tensor, Tensor)"
)


def _block_sparse_attention_indexed_op_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_indices: torch.Tensor,
    kv_block_counts: torch.Tensor,
    n_k_blocks: int,
    block_size: int,
    scale: float,
    key_padding_mask: torch.Tensor | None,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_block_lists(kv_block_indices, kv_block_counts, q, k, block_size, n_k_blocks)
    # Shape-only stand-in for the boolean mask the lists describe (checks and per-head layout; no memory).
    shape_mask = torch.ones((), dtype=torch.bool, device=q.device).expand(*kv_block_counts.shape, n_k_blocks)
    return _launch_block_sparse_forward(
        q, k, v, shape_mask, block_size, scale, key_padding_mask, softcap,
        block_indices=(kv_block_indices, kv_block_counts),
    )  # fmt: skip


def _block_sparse_attention_indexed_op_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_indices: torch.Tensor,
    kv_block_counts: torch.Tensor,
    n_k_blocks: int,
    block_size: int,
    scale: float,
    key_padding_mask: torch.Tensor | None,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, hq, q_len, _ = q.shape
    return empty_like_bshd(q), q.new_empty(batch, hq, q_len, dtype=torch.float32)


def check_block_lists(
    indices: torch.Tensor, counts: torch.Tensor, q: torch.Tensor, k: torch.Tensor, block_size: int, n_k_blocks: int
) -> None:
    """Validate `BlockLists` against q / k; raise ValueError naming the bad tensor."""
    batch, hq, q_len, _ = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    n_q = math.ceil(q_len / block_size)
    if n_k_blocks != math.ceil(kv_len / block_size):
        raise ValueError(f"block lists are for {n_k_blocks} key blocks, k has {math.ceil(kv_len / block_size)}")
    if indices.dtype != torch.int32 or counts.dtype != torch.int32 or indices.dim() != 4 or counts.dim() != 3:
        raise ValueError(
            f"block lists must be int32 indices [B, H, nQ, W] and counts [B, H, nQ], got {indices.dtype} "
            f"{tuple(indices.shape)} and {counts.dtype} {tuple(counts.shape)}"
        )
    if counts.shape[0] != batch or counts.shape[1] not in (hq, hkv) or counts.shape[2] != n_q:
        raise ValueError(f"block list counts {tuple(counts.shape)} do not fit ({batch}, {hq} or {hkv}, {n_q})")
    if indices.shape[:3] != counts.shape or indices.stride(-1) != 1:
        raise ValueError(f"block list indices {tuple(indices.shape)} must be [*counts.shape, W] with unit last stride")
    if indices.device != q.device or counts.device != q.device:
        raise ValueError(f"block lists are on {indices.device}, q on {q.device}")


def _register_custom_op() -> None:
    # The functions resolve `_launch_block_sparse_forward` through module globals at call time, so a reload of this
    # module (tests switching to the interpreter) is picked up by the ops defined first.
    for op_name, schema, impl, fake in (
        (_OP_NAME, _OP_SCHEMA, _block_sparse_attention_op_impl, _block_sparse_attention_op_fake),
        (
            _INDEXED_OP_NAME,
            _INDEXED_OP_SCHEMA,
            _block_sparse_attention_indexed_op_impl,
            _block_sparse_attention_indexed_op_fake,
        ),
    ):
        namespace, name = op_name.split("::")
        if hasattr(getattr(torch.ops, namespace), name):  # already defined (module reloaded)
            continue
        op = torch.library.custom_op(op_name, mutates_args=(), schema=schema)(impl)
        op.register_fake(fake)


_register_custom_op()


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor | BlockLists,
    *,
    block_size: int = 64,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse causal attention with the Triton kernel; same contract as `block_sparse_attention_reference`.

    Args:
        q: ``[B, Hq, S, D]`` fp16 / bf16 / fp32 (any strides, e.g. a transpose of ``[B, S, Hq, D]``).
        k, v: ``[B, Hkv, Sk, D]``, ``Sk >= S``, same dtype as ``q``; query head ``h`` reads KV head
            ``h // (Hq // Hkv)``.
        block_mask: bool ``[B, Hm, ceil(S / block_size), ceil(Sk / block_size)]`` with ``Hm`` in ``{Hq, Hkv}``, or
            `BlockLists` (sorted, causally filtered lists, e.g. from `select_block_lists`): used as they are, no
            conversion.
        block_size: tokens per block, a power of two >= 16 (64 and 128 are the tuned ones).
        scale: softmax scale (default ``1 / sqrt(D)``).
        key_padding_mask: optional bool ``[B, Sk]``, True for real tokens.
        softcap: optional logit soft-capping ``cap * tanh(s / cap)``.
        return_lse: also return ``lse [B, Hq, S]`` fp32 (natural log; ``-inf`` for rows that see no key).

    Returns:
        ``out [B, Hq, S, D]`` in ``q.dtype`` (memory laid out ``[B, S, Hq, D]``), and ``lse`` when asked.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    softcap = None if softcap is None else float(softcap)
    if isinstance(block_mask, BlockLists):
        out, lse = torch.ops.seer_adapter.block_sparse_attention_indexed_fwd(
            q, k, v, block_mask.indices, block_mask.counts, block_mask.n_k_blocks, block_size, scale,
            key_padding_mask, softcap,
        )  # fmt: skip
    else:
        out, lse = torch.ops.seer_adapter.block_sparse_attention_fwd(
            q, k, v, block_mask, block_size, scale, key_padding_mask, softcap
        )
    if return_lse:
        return out, lse
    return out


block_sparse_attention_triton.accepts_block_lists = True
register_backend("triton", block_sparse_attention_triton, device_types=("cuda",))
