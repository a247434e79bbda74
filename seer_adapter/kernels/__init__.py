"""The kernel half of seer_adapter: one dispatch point for every attention kernel.

Every caller reaches a kernel through `block_sparse_attention`; it picks a backend:

* ``"reference"`` — the pure-PyTorch oracle of `reference.py` (any device; the CPU path);
* ``"triton"`` — Triton kernels, registered by `register_backend` when they are importable; the default on
  CUDA tensors once present.

The choice can be forced with the ``backend=`` argument or the environment variable
``SEER_ADAPTER_KERNEL`` (``auto`` | ``reference`` | ``triton``). Forcing a backend that cannot run raises; it
never falls back silently.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .reference import (
    block_sparse_attention_reference,
    causal_token_mask,
    check_attention_inputs,
    expand_block_mask,
)

ENV_BACKEND = "SEER_ADAPTER_KERNEL"
_BACKENDS: dict[str, Callable[..., object]] = {"reference": block_sparse_attention_reference}
# Backends able to run on a device type, in order of preference for "auto".
_AUTO_ORDER: dict[str, list[str]] = {}


def register_backend(name: str, fn: Callable[..., object], device_types: tuple[str, ...]) -> None:
    """Make a kernel backend available to `block_sparse_attention` (same signature as the reference)."""
    _BACKENDS[name] = fn
    for device_type in device_types:
        order = _AUTO_ORDER.setdefault(device_type, [])
        if name not in order:
            order.insert(0, name)


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def select_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend used for tensors on ``device``: explicit argument, else ``$SEER_ADAPTER_KERNEL``, else auto."""
    requested = backend or os.environ.get(ENV_BACKEND, "auto")
    if requested == "auto":
        order = _AUTO_ORDER.get(device.type, [])
        return order[0] if order else "reference"
    if requested not in _BACKENDS:
        raise ValueError(
            f"Kernel backend {requested!r} is not available (from {'argument' if backend else ENV_BACKEND}); "
            f"available: {available_backends()} or 'auto'."
        )
    return requested


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
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
        block_mask: bool ``[B, Hq or Hkv, ceil(S/block_size), ceil(Sk/block_size)]``.
        block_size: tokens per block (default 64).
        scale: softmax scale (default ``1/sqrt(D)``).
        key_padding_mask: optional bool ``[B, Sk]``, True for real tokens.
        softcap: optional logit soft-capping value.
        return_lse: also return ``lse [B, Hq, S]`` (fp32).
        backend: force a backend (see module docstring).

    Returns:
        ``out [B, Hq, S, D]`` in ``q.dtype`` (and ``lse`` when asked).
    """
    fn = _BACKENDS[select_backend(q.device, backend)]
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


__all__ = [
    "ENV_BACKEND",
    "available_backends",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "causal_token_mask",
    "check_attention_inputs",
    "expand_block_mask",
    "register_backend",
    "select_backend",
]

try:  # Triton kernels register themselves as backend "triton" (default on CUDA) when triton is importable.
    from . import block_sparse_triton  # noqa: E402, F401
except ImportError as _triton_error:  # pragma: no cover - triton not installed
    if torch.cuda.is_available():
        import warnings

        warnings.warn(
            f"Triton is not importable ({_triton_error}); CUDA tensors will use the slow PyTorch reference kernels. "
            "Install triton (pip install 'seer-adapter[triton]') for the fast path.",
            stacklevel=2,
        )
