"""Gate input pooling: inverse RoPE and block pooling of post-RoPE Q or K in one pass over the tensor.

The gate needs, per block of ``block_size`` tokens, the avg / max / min of the *pre-RoPE* query and key channels
(`seer_adapter.gate.pool_blocks`). The attention function receives them post-RoPE, so the unfused path casts the full
``[B, H, S, D]`` tensor to fp32, inverts RoPE with several full-size temporaries and pools it again. Only the pooled
``[B, H, S / block_size, P * D]`` result is needed, so one kernel does it all:

* `pool_pre_rope_blocks_reference`: the exact composition ``pool_blocks(apply_rope(x.float(), cos, sin, style,
  inverse=True), block_size, poolings, token_valid)`` (the test oracle and the CPU path);
* `pool_pre_rope_blocks_triton`: one Triton program per (block, head, batch) walks the block's tokens in chunks,
  inverts RoPE per token in registers (the rotation partner of a channel is loaded from the same cache lines, so
  ``x`` is read once from memory; padding tokens are not read at all) and reduces in fp32;
* `pool_pre_rope_blocks`: picks one with `seer_adapter.kernels.select_backend` (Triton on CUDA, reference elsewhere,
  ``$SEER_ADAPTER_KERNEL`` or ``backend=`` to force), like every other kernel of this package.

RoPE conventions (`seer_adapter.rope`): ``"half"`` pairs channel ``i`` with ``i + r/2``, ``"interleaved"`` pairs
``2i`` with ``2i + 1``, ``"interleaved_half_table"`` pairs like ``"interleaved"`` but channel ``c`` reads table
column ``c // 2``. Only the first ``r = cos.shape[-1]`` channels rotate (partial rotary).

The Triton launch is wrapped in the custom op ``torch.ops.seer_adapter.pool_pre_rope_blocks`` (with a fake
implementation) so that ``torch.compile`` treats it as one opaque node. Forward only: the pooled gate inputs of
SeerAttention never need a gradient (distillation detaches Q and K).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..gate import pool_blocks
from ..rope import ROPE_STYLES, apply_rope
from . import _OPS, backend_for, on_tensor_device, register_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton not installed
    triton = None

__all__ = [
    "GATE_POOLING_BACKENDS",
    "POOLING_KINDS",
    "check_pool_inputs",
    "pool_pre_rope_blocks",
    "pool_pre_rope_blocks_reference",
    "pool_pre_rope_blocks_triton",
]

POOLING_KINDS = ("avg", "max", "min")
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# RoPE style -> the kernel's ROPE constexpr (0: no RoPE).
_ROPE_CODES = {"half": 1, "interleaved": 2, "interleaved_half_table": 3}


def check_pool_inputs(
    x: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    rope_style: str,
    block_size: int,
    poolings: Sequence[str],
    token_valid: torch.Tensor | None,
) -> None:
    """Raise a ``ValueError`` that names the problem when the inputs of `pool_pre_rope_blocks` do not fit."""
    if x.dim() != 4:
        raise ValueError(f"x must be [B, H, S, D], got shape {tuple(x.shape)}")
    batch, _, length, head_dim = x.shape
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not poolings:
        raise ValueError("poolings must name at least one of " + ", ".join(POOLING_KINDS))
    for kind in poolings:
        if kind not in POOLING_KINDS:
            raise ValueError(f"unknown pooling {kind!r}; expected one of {POOLING_KINDS}")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must both be given (RoPE) or both be None (no RoPE)")
    if cos is not None:
        if rope_style not in ROPE_STYLES:
            raise ValueError(f"unknown rope_style {rope_style!r}; expected one of {ROPE_STYLES}")
        if cos.shape != sin.shape:
            raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
        if cos.dim() not in (2, 3) or cos.shape[-2] != length or (cos.dim() == 3 and cos.shape[0] not in (1, batch)):
            raise ValueError(
                f"cos/sin must be [B, S, r] (B = {batch} or 1) or [S, r] with S = {length}, got {tuple(cos.shape)}"
            )
        rot_dim = cos.shape[-1]
        if rot_dim % 2 or rot_dim > head_dim:
            raise ValueError(f"the rotary width r = cos.shape[-1] = {rot_dim} must be even and <= head_dim {head_dim}")
        for name, table in (("cos", cos), ("sin", sin)):
            if table.device != x.device:
                raise ValueError(f"{name} is on {table.device} but x is on {x.device}")
    if token_valid is not None:
        if token_valid.dtype != torch.bool or tuple(token_valid.shape) != (batch, length):
            raise ValueError(
                f"token_valid must be bool [B, S] = [{batch}, {length}], got {token_valid.dtype} "
                f"{tuple(token_valid.shape)}"
            )
        if token_valid.device != x.device:
            raise ValueError(f"token_valid is on {token_valid.device} but x is on {x.device}")


def pool_pre_rope_blocks_reference(
    x: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    *,
    rope_style: str = "half",
    block_size: int = 64,
    poolings: Sequence[str] = ("avg",),
    token_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool pre-RoPE ``x`` over blocks: ``pool_blocks(apply_rope(x.float(), cos, sin, style, inverse=True), ...)``.

    Args:
        x: post-RoPE ``[B, H, S, D]`` (fp16 / bf16 / fp32, any strides).
        cos, sin: the RoPE tables ``x`` was rotated with, ``[B, S, r]`` or ``[S, r]`` (``r <= D`` even; only the
            first ``r`` channels rotate); both ``None``: ``x`` has no RoPE and is pooled as is.
        rope_style: ``"half"``, ``"interleaved"`` or ``"interleaved_half_table"`` (see `seer_adapter.rope`).
        block_size: tokens per block; a trailing partial block is pooled over its real tokens.
        poolings: any of ``"avg"``, ``"max"``, ``"min"``, concatenated on the channel axis in this order.
        token_valid: optional bool ``[B, S]``; False tokens (padding) enter no pool.

    Returns:
        fp32 ``[B, H, ceil(S / block_size), len(poolings) * D]``; a block without a real token pools to 0.
    """
    check_pool_inputs(x, cos, sin, rope_style, block_size, poolings, token_valid)
    x = x.float()
    if cos is not None:
        x = apply_rope(x, cos, sin, rope_style, inverse=True)
    return pool_blocks(x, block_size, list(poolings), token_valid)


if triton is not None:

    @triton.jit
    def _pool_pre_rope_blocks_kernel(
        X,
        Cos,
        Sin,
        Valid,
        Out,
        stride_xb,
        stride_xh,
        stride_xs,
        stride_xd,
        stride_cb,
        stride_cs,
        stride_cd,
        stride_sb,
        stride_ss,
        stride_sd,
        stride_vb,
        stride_vs,
        stride_ob,
        stride_oh,
        stride_on,
        stride_od,
        seq_len,
        rot_dim,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        TOKENS: tl.constexpr,
        ROPE: tl.constexpr,
        HAS_VALID: tl.constexpr,
        AVG_SLOT: tl.constexpr,
        MAX_SLOT: tl.constexpr,
        MIN_SLOT: tl.constexpr,
    ):
        """One program: block ``program_id(1)`` of head ``program_id(0)`` of batch ``program_id(2)``."""
        head = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        batch = tl.program_id(2).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        x_head = X + batch * stride_xb + head * stride_xh
        if ROPE != 0:
            # Inverse RoPE: y[c] = x[c] * cos[t(c)] + sign(c) * x[partner(c)] * sin[t(c)] for c < r, y[c] = x[c] else.
            rotates = d < rot_dim
            if ROPE == 1:
                half = rot_dim // 2
                first = d < half
                partner = tl.where(first, d + half, d - half)
                table = d
            else:
                first = (d % 2) == 0
                partner = d ^ 1
                if ROPE == 3:
                    table = d // 2
                else:
                    table = d
            sign = tl.where(first, 1.0, -1.0)
            cos_batch = Cos + batch * stride_cb
            sin_batch = Sin + batch * stride_sb

        acc_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_max = tl.full([BLOCK_D], float("-inf"), dtype=tl.float32)
        acc_min = tl.full([BLOCK_D], float("inf"), dtype=tl.float32)
        count = tl.zeros([TOKENS], dtype=tl.int32)
        for start in range(0, BLOCK_SIZE, TOKENS):
            offs = start + tl.arange(0, TOKENS)
            tok = block * BLOCK_SIZE + offs
            real = (offs < BLOCK_SIZE) & (tok < seq_len)
            if HAS_VALID:
                real = real & (tl.load(Valid + batch * stride_vb + tok * stride_vs, mask=real, other=0) != 0)
            count += real.to(tl.int32)
            tok = tok.to(tl.int64)
            x_rows = x_head + tok[:, None] * stride_xs
            # Padding and out-of-range tokens are not loaded: x = 0 there, so they add nothing to the sum.
            y = tl.load(x_rows + d[None, :] * stride_xd, mask=real[:, None] & d_mask[None, :], other=0.0)
            y = y.to(tl.float32)
            if ROPE != 0:
                rot_mask = real[:, None] & rotates[None, :]
                x_partner = tl.load(x_rows + partner[None, :] * stride_xd, mask=rot_mask, other=0.0).to(tl.float32)
                c = tl.load(cos_batch + tok[:, None] * stride_cs + table[None, :] * stride_cd, mask=rot_mask, other=1.0)
                s = tl.load(sin_batch + tok[:, None] * stride_ss + table[None, :] * stride_sd, mask=rot_mask, other=0.0)
                y = y * c.to(tl.float32) + sign[None, :] * x_partner * s.to(tl.float32)
            if AVG_SLOT >= 0:
                acc_sum += tl.sum(y, axis=0)
            if MAX_SLOT >= 0:
                acc_max = tl.maximum(acc_max, tl.max(tl.where(real[:, None], y, float("-inf")), axis=0))
            if MIN_SLOT >= 0:
                acc_min = tl.minimum(acc_min, tl.min(tl.where(real[:, None], y, float("inf")), axis=0))

        n_real = tl.sum(count, axis=0)
        empty = n_real == 0
        out_block = Out + batch * stride_ob + head * stride_oh + block.to(tl.int64) * stride_on
        if AVG_SLOT >= 0:
            avg = acc_sum / tl.maximum(n_real, 1).to(tl.float32)
            tl.store(out_block + (AVG_SLOT * HEAD_DIM + d) * stride_od, avg, mask=d_mask)
        if MAX_SLOT >= 0:
            tl.store(out_block + (MAX_SLOT * HEAD_DIM + d) * stride_od, tl.where(empty, 0.0, acc_max), mask=d_mask)
        if MIN_SLOT >= 0:
            tl.store(out_block + (MIN_SLOT * HEAD_DIM + d) * stride_od, tl.where(empty, 0.0, acc_min), mask=d_mask)

    _KERNEL_INTERPRETED = not isinstance(_pool_pre_rope_blocks_kernel, triton.runtime.JITFunction)
else:  # pragma: no cover - triton not installed
    _KERNEL_INTERPRETED = False


def _launch_config(head_dim: int, block_size: int) -> dict[str, int]:
    """Tile sizes: ``TOKENS`` tokens x ``BLOCK_D`` channels per step (4096 fp32 values per tile, 32 per thread)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    tokens = min(max(16, triton.next_power_of_2(block_size)), max(16, 4096 // block_d))
    return {"BLOCK_D": block_d, "TOKENS": tokens, "num_warps": 4}


def _launch_pool_pre_rope_blocks(
    x: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    rope_style: str,
    block_size: int,
    poolings: Sequence[str],
    token_valid: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the pooling kernel; ``out``: optional preallocated fp32 ``[B, H, nB, P * D]`` result (tests poison it)."""
    if triton is None:
        raise RuntimeError("pool_pre_rope_blocks_triton needs triton; use the reference backend")
    check_pool_inputs(x, cos, sin, rope_style, block_size, poolings, token_valid)
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"the Triton gate pooling kernel needs x in fp16/bf16/fp32, got {x.dtype}")
    if not _KERNEL_INTERPRETED and x.device.type != "cuda":
        raise RuntimeError(
            f"the Triton kernels of seer_adapter cannot run on {x.device.type} tensors. On CPU set TRITON_INTERPRET=1 "
            "before seer_adapter.kernels.gate_pooling is first imported (small shapes only), or use the reference "
            "backend (SEER_ADAPTER_KERNEL=reference)."
        )
    batch, heads, length, head_dim = x.shape
    n_blocks = math.ceil(length / block_size)
    width = len(poolings) * head_dim
    if out is None:
        out = torch.empty(batch, heads, n_blocks, width, dtype=torch.float32, device=x.device)
    elif out.dtype != torch.float32 or tuple(out.shape) != (batch, heads, n_blocks, width) or out.device != x.device:
        raise ValueError(f"out must be fp32 [{batch}, {heads}, {n_blocks}, {width}] on {x.device}")
    if out.numel() == 0:
        return out
    # Each kind is computed once and written to its first slot; repeated kinds are copied afterwards.
    slots = {kind: poolings.index(kind) if kind in poolings else -1 for kind in POOLING_KINDS}
    if cos is None:
        cos_strides = sin_strides = (0, 0, 0)
        cos = sin = x  # never read (ROPE=0)
        rot_dim = 0
    else:
        cos_strides, sin_strides = _table_strides(cos), _table_strides(sin)
        rot_dim = cos.shape[-1]
    if token_valid is None:
        valid, has_valid = torch.ones(1, 1, dtype=torch.int8, device=x.device), False
    else:
        valid, has_valid = token_valid.view(torch.int8), True
    with on_tensor_device(x):
        _pool_pre_rope_blocks_kernel[(heads, n_blocks, batch)](
            x, cos, sin, valid, out,
            *x.stride(), *cos_strides, *sin_strides, *valid.stride(), *out.stride(),
            length, rot_dim,
            HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size,
            ROPE=_ROPE_CODES[rope_style] if rot_dim else 0,
            HAS_VALID=has_valid,
            AVG_SLOT=slots["avg"],
            MAX_SLOT=slots["max"],
            MIN_SLOT=slots["min"],
            **_launch_config(head_dim, block_size),
        )  # fmt: skip
    for slot, kind in enumerate(poolings):
        first = slots[kind]
        if first != slot:
            out[..., slot * head_dim : (slot + 1) * head_dim] = out[..., first * head_dim : (first + 1) * head_dim]
    return out


def _table_strides(table: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, channel) strides of a ``[B, S, r]`` or ``[S, r]`` table; a batch of 1 broadcasts (stride 0)."""
    if table.dim() == 2:
        return 0, table.stride(0), table.stride(1)
    return (0 if table.shape[0] == 1 else table.stride(0)), table.stride(1), table.stride(2)


_OP_NAME = "seer_adapter::pool_pre_rope_blocks"
_OP_SCHEMA = (
    "(Tensor x, Tensor? cos, Tensor? sin, str rope_style, int block_size, str[] poolings, Tensor? token_valid) "
    "-> Tensor"
)


def _pool_op_impl(
    x: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    rope_style: str,
    block_size: int,
    poolings: list[str],
    token_valid: torch.Tensor | None,
) -> torch.Tensor:
    return _launch_pool_pre_rope_blocks(x, cos, sin, rope_style, block_size, poolings, token_valid)


def _pool_op_fake(
    x: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    rope_style: str,
    block_size: int,
    poolings: list[str],
    token_valid: torch.Tensor | None,
) -> torch.Tensor:
    batch, heads, length, head_dim = x.shape
    n_blocks = (length + block_size - 1) // block_size
    return x.new_empty(batch, heads, n_blocks, len(poolings) * head_dim, dtype=torch.float32)


def _register_custom_op() -> None:
    namespace, name = _OP_NAME.split("::")
    if hasattr(getattr(torch.ops, namespace), name):  # already defined (module reloaded)
        return
    # The functions resolve `_launch_pool_pre_rope_blocks` through module globals at call time, so a reload of this
    # module (tests switching to the interpreter) is picked up by the op defined first.
    op = torch.library.custom_op(_OP_NAME, mutates_args=(), schema=_OP_SCHEMA)(_pool_op_impl)
    op.register_fake(_pool_op_fake)


if triton is not None:
    _register_custom_op()


def pool_pre_rope_blocks_triton(
    x: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    *,
    rope_style: str = "half",
    block_size: int = 64,
    poolings: Sequence[str] = ("avg",),
    token_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `pool_pre_rope_blocks_reference`, in one Triton kernel (``x`` fp16 / bf16 / fp32).

    Memory beyond the inputs: the fp32 result only. No autograd: ``x`` must not require a gradient while grad mode
    is on (detach it, or use the reference backend).
    """
    if triton is None:
        raise RuntimeError("pool_pre_rope_blocks_triton needs triton; use the reference backend")
    tensors = (x, cos, sin)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            "the Triton gate pooling kernel has no backward; pass detached x / cos / sin (the gate's pooled inputs "
            "need no gradient) or use the reference backend"
        )
    return torch.ops.seer_adapter.pool_pre_rope_blocks(x, cos, sin, rope_style, block_size, list(poolings), token_valid)


# Registered under the kernel op "gate_pooling": backends are chosen by the rules of the attention kernels.
register_backend("reference", pool_pre_rope_blocks_reference, device_types=(), op="gate_pooling")
if triton is not None:
    register_backend("triton", pool_pre_rope_blocks_triton, device_types=("cuda",), op="gate_pooling")
GATE_POOLING_BACKENDS = _OPS["gate_pooling"]


def pool_pre_rope_blocks(
    x: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    *,
    rope_style: str = "half",
    block_size: int = 64,
    poolings: Sequence[str] = ("avg",),
    token_valid: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Block pools of pre-RoPE ``x``, from post-RoPE ``x``; dispatches like `kernels.block_sparse_attention`.

    Args:
        x: post-RoPE ``[B, H, S, D]`` (any strides, e.g. a transpose of ``[B, S, H, D]``).
        cos, sin: ``[B, S, r]`` or ``[S, r]`` RoPE tables, or both ``None`` (no RoPE).
        rope_style, block_size, poolings, token_valid: see `pool_pre_rope_blocks_reference`.
        backend: force ``"reference"`` or ``"triton"`` (default: ``$SEER_ADAPTER_KERNEL``, else by device; an
            attention-only backend named by ``$SEER_ADAPTER_KERNEL`` leaves the pooling to the device's default).

    Returns:
        fp32 ``[B, H, ceil(S / block_size), len(poolings) * D]``.
    """
    return backend_for("gate_pooling", x.device, backend)(
        x, cos, sin, rope_style=rope_style, block_size=block_size, poolings=poolings, token_valid=token_valid
    )
