"""The kernel half of seer_adapter: one dispatch point for every attention kernel.

Every caller reaches a kernel through `block_sparse_attention` (attention over kept blocks), `select_block_lists`
(gate scores -> kept-block lists), `sparse_decode_attention` (one new token over listed key blocks per KV head) or
`decode_gate_scores` (the decode gate's block scores of one step); each picks a backend:

* ``"reference"`` — the pure-PyTorch oracle of `reference.py` (any device; the CPU path);
* ``"triton"`` — Triton kernels, registered by `register_backend` when they are importable; the default on
  CUDA tensors once present.

The choice can be forced with the ``backend=`` argument or the environment variable
``SEER_ADAPTER_KERNEL`` (``auto`` | ``reference`` | ``triton``). Forcing a backend that cannot run raises; it
never falls back silently.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

from .block_lists import BlockLists, select_block_lists_reference
from .decode_ground_truth import decode_block_ground_truth_reference
from .decode_scores import decode_gate_scores_reference
from .reference import (
    block_sparse_attention_reference,
    causal_token_mask,
    check_attention_inputs,
    expand_block_mask,
)
from .sparse_decode import sparse_decode_reference

ENV_BACKEND = "SEER_ADAPTER_KERNEL"
# Operation -> backend name -> implementation. "attention": `block_sparse_attention`; "select": `select_block_lists`;
# "decode": `sparse_decode_attention`; "decode_ground_truth": `decode_block_ground_truth`; "decode_scores":
# `decode_gate_scores`; "gate_pooling" and "ground_truth" register themselves from their modules.
_OPS: dict[str, dict[str, Callable[..., object]]] = {
    "attention": {"reference": block_sparse_attention_reference},
    "select": {"reference": select_block_lists_reference},
    "decode": {"reference": sparse_decode_reference},
    "decode_ground_truth": {"reference": decode_block_ground_truth_reference},
    "decode_scores": {"reference": decode_gate_scores_reference},
    "gate_pooling": {},
    "ground_truth": {},
}
# Backends able to run on a device type, in order of preference for "auto".
_AUTO_ORDER: dict[str, list[str]] = {}


def register_backend(
    name: str, fn: Callable[..., object], device_types: tuple[str, ...], op: str = "attention"
) -> None:
    """Make a kernel backend available for ``op`` (same signature as that op's reference implementation).

    An attention backend that reads `BlockLists` directly sets ``fn.accepts_block_lists = True``; others get the
    equivalent boolean mask.

    ``op``: ``"attention"`` (`block_sparse_attention`), ``"select"`` (`select_block_lists`), ``"decode"``
    (`sparse_decode_attention`), ``"decode_scores"`` (`decode_gate_scores`), ``"gate_pooling"`` or
    ``"ground_truth"``.
    See `backend_for` for what happens when a backend lacks an op.
    """
    _OPS[_check_op(op)][name] = fn
    _RESOLVED.clear()
    for device_type in device_types:
        order = _AUTO_ORDER.setdefault(device_type, [])
        if name not in order:
            order.insert(0, name)


def on_tensor_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``tensor``'s CUDA device the current one for a kernel launch.

    Triton launches on the *current* device, not on the device of the tensors it is given; with a model spread over
    GPUs (``device_map``) a layer on ``cuda:1`` would otherwise launch on ``cuda:0`` with ``cuda:1`` pointers.
    """
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _check_op(op: str) -> str:
    if op not in _OPS:
        raise ValueError(f"unknown kernel op {op!r}; expected one of {sorted(_OPS)}")
    return op


def available_backends(op: str | None = None) -> list[str]:
    """Backend names (for ``op`` only, when given)."""
    return sorted(_OPS[_check_op(op)] if op else set().union(*_OPS.values()))


# (op, device type, backend argument, $SEER_ADAPTER_KERNEL) -> implementation: a decoding step resolves three ops per
# layer, and resolving costs more host time than some of the kernels take on the GPU. Cleared by `register_backend`.
_RESOLVED: dict[tuple[str, str, str | None, str], Callable[..., object]] = {}


def backend_for(op: str, device: torch.device, backend: str | None = None) -> Callable[..., object]:
    """The implementation of ``op`` for tensors on ``device``, chosen by `select_backend`.

    A backend forced with ``backend=`` that lacks ``op`` raises. One named by ``$SEER_ADAPTER_KERNEL`` that lacks it
    (say a custom attention-only backend) picks the attention kernel only: ``op`` then runs on the device's default.
    """
    key = (op, device.type, backend, os.environ.get(ENV_BACKEND, "auto"))
    fn = _RESOLVED.get(key)
    if fn is None:
        fn = _RESOLVED[key] = _resolve_backend(op, device, backend)
    return fn


def _resolve_backend(op: str, device: torch.device, backend: str | None) -> Callable[..., object]:
    name = select_backend(device, backend)
    implementations = _OPS[_check_op(op)]
    if name not in implementations:
        if backend is not None:
            raise ValueError(f"kernel backend {name!r} has no {op} implementation; available: {available_backends(op)}")
        name = select_backend(device, "auto")
        name = name if name in implementations else "reference"
    return implementations[name]


def select_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend used for tensors on ``device``: explicit argument, else ``$SEER_ADAPTER_KERNEL``, else auto."""
    requested = backend or os.environ.get(ENV_BACKEND, "auto")
    if requested == "auto":
        order = _AUTO_ORDER.get(device.type, [])
        return order[0] if order else "reference"
    if requested not in available_backends():
        raise ValueError(
            f"Kernel backend {requested!r} is not available (from {'argument' if backend else ENV_BACKEND}); "
            f"available: {available_backends()} or 'auto'."
        )
    return requested


def block_sparse_attention(
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
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse causal attention: the single entry point to every kernel.

    Args:
        q: ``[B, Hq, S, D]``; k, v: ``[B, Hkv, Sk, D]`` (GQA by index; queries are the last S positions).
        block_mask: bool ``[B, Hq or Hkv, ceil(S/block_size), ceil(Sk/block_size)]``, or the same kept blocks as
            `BlockLists` (from `select_block_lists`; the Triton kernel reads these directly).
        block_size: tokens per block (default 64).
        scale: softmax scale (default ``1/sqrt(D)``).
        key_padding_mask: optional bool ``[B, Sk]``, True for real tokens.
        softcap: optional logit soft-capping value.
        return_lse: also return ``lse [B, Hq, S]`` (fp32).
        backend: force a backend (see module docstring).

    Returns:
        ``out [B, Hq, S, D]`` in ``q.dtype`` (and ``lse`` when asked).
    """
    fn = backend_for("attention", q.device, backend)
    if isinstance(block_mask, BlockLists) and not getattr(fn, "accepts_block_lists", False):
        block_mask = block_mask.to_mask()  # a backend that takes boolean masks only
    return fn(
        q,
        k,
        v,
        block_mask,
        block_size=block_size,
        scale=scale,
        key_padding_mask=key_padding_mask,
        softcap=softcap,
        return_lse=return_lse,
    )


def sparse_decode_attention(
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
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse decode attention: the single entry point to the decode kernels.

    Args:
        q: ``[B, Hq, D]`` (one new token per sequence); k, v: ``[B, Hkv, Sk, D]`` (cache, new token appended).
        block_indices: int ``[B, Hkv, W]`` key blocks per KV head (one list shared by the query group);
            counts: int ``[B, Hkv]`` real entries of each list.
        block_size, scale, key_padding_mask, softcap, return_lse: as `block_sparse_attention`.
        backend: force a backend (see module docstring).

    Returns:
        ``out [B, Hq, D]`` in ``q.dtype`` (and ``lse [B, Hq]`` fp32 when asked).
    """
    fn = backend_for("decode", q.device, backend)
    return fn(
        q,
        k,
        v,
        block_indices,
        counts,
        block_size=block_size,
        scale=scale,
        key_padding_mask=key_padding_mask,
        softcap=softcap,
        return_lse=return_lse,
    )


def decode_block_ground_truth(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 64,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    query_rows: torch.Tensor | None = None,
    target: str = "max",
    backend: str | None = None,
) -> torch.Tensor:
    """Decode-gate distillation target ``[B, Hkv, S, nK]`` (see `decode_ground_truth`): the single entry point.

    ``query_rows`` (long ``[R]``) computes the rows of those token positions only (``[B, Hkv, R, nK]``);
    ``target`` is ``"max"`` (SeerAttention-R's) or ``"mass"`` (probability mass per block).

    Backends: the PyTorch reference (chunked fp32 scores) and one Triton kernel (``decode_ground_truth_triton``,
    the default on CUDA: two passes over ``Q·Kᵀ`` in registers, no score tensor).
    """
    fn = backend_for("decode_ground_truth", q.device, backend)
    return fn(
        q, k, block_size=block_size, scale=scale, key_padding_mask=key_padding_mask, softcap=softcap,
        query_rows=query_rows, target=target,
    )  # fmt: skip


def decode_gate_scores(
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
    backend: str | None = None,
) -> torch.Tensor:
    """Decode-gate scores of one decoding step, laid out for `select_block_lists`: the single entry point.

    Args:
        q: post-RoPE queries of the new token ``[B, Hq, D]``; cos, sin: its RoPE tables ``[B or 1, r]`` (or
            ``None``); q_weight: the decode gate's query merge ``[Hkv, m·G, g·D]`` (``m = num_queries`` gate
            queries); keys: the compressed keys ``[B, Hkv, nC, G]``, of which the first ``n_earlier`` are scored
            (an int, or a long ``[1]`` device tensor for shape-static steps: then the result is ``nC`` wide, the
            lowest float from ``n_earlier`` on).
        rope_style, scale: the model's RoPE convention; the dot-product scale (``1 / sqrt(G)``).
        query_merge: how ``m > 1`` gate queries' logits become one score (``"mixture"`` default, or
            ``"logsumexp"``; `decode_scores.merge_query_logits`); block_valid: optional bool ``[B, >= nC]`` mask of
            the blocks holding a real token (the mixture's normalisers skip the others, as in training).

    Returns:
        fp32 ``[B, Hkv, 1, n_earlier + 1]``; the last column (the current block) is the lowest finite float.
        See `decode_scores` for the definition.
    """
    fn = backend_for("decode_scores", q.device, backend)
    return fn(q, cos, sin, q_weight, keys, n_earlier, rope_style=rope_style, scale=scale, num_queries=num_queries,
              query_merge=query_merge, block_valid=block_valid)  # fmt: skip


def select_block_lists(
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
    backend: str | None = None,
) -> tuple[BlockLists, torch.Tensor]:
    """Gate scores ``[B, H, nQ, nK]`` -> sorted kept-block lists: the single entry point to block selection.

    See `block_lists.select_block_lists_reference` for the arguments. Returns `BlockLists` and ``allowed_counts``
    int32 ``[B, H, nQ]`` (blocks each row could keep: the density denominator).
    """
    fn = backend_for("select", scores.device, backend)
    return fn(
        scores,
        method=method,
        block_size=block_size,
        q_len=q_len,
        kv_len=kv_len,
        block_valid=block_valid,
        apply_softmax=apply_softmax,
        threshold=threshold,
        nz_ratio=nz_ratio,
        token_budget=token_budget,
        sink_block=sink_block,
        force_local_block=force_local_block,
        dense_last_query_blocks=dense_last_query_blocks,
        local_block=local_block,
    )


__all__ = [
    "ENV_BACKEND",
    "BlockLists",
    "available_backends",
    "backend_for",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "causal_token_mask",
    "decode_block_ground_truth",
    "decode_gate_scores",
    "check_attention_inputs",
    "expand_block_mask",
    "register_backend",
    "select_backend",
    "select_block_lists",
    "sparse_decode_attention",
    "sparse_decode_reference",
]

try:  # Triton kernels register themselves as backend "triton" (default on CUDA) when triton is importable.
    from . import (  # noqa: E402, F401
        block_select_triton,
        block_sparse_triton,
        decode_ground_truth_triton,
        decode_scores_triton,
        sparse_decode_triton,
    )
except ImportError as _triton_error:  # pragma: no cover - triton not installed
    if torch.cuda.is_available():
        import warnings

        warnings.warn(
            f"Triton is not importable ({_triton_error}); CUDA tensors will use the slow PyTorch reference kernels. "
            "Install triton (pip install 'seer-adapter[triton]') for the fast path.",
            stacklevel=2,
        )
