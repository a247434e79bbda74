"""Rotary position embedding helpers: apply, invert and identify the model's RoPE convention.

The attention function receives post-RoPE Q/K; the gate needs them pre-RoPE. Since RoPE is a rotation,
``x = R(-theta) (R(theta) x)``: inverting it with the same ``(cos, sin)`` the attention module received is
exact up to float rounding. Two conventions exist in transformers:

* ``"half"`` (GPT-NeoX / Llama): channel ``i`` pairs with ``i + r/2``; ``cos = cat(f, f)``.
* ``"interleaved"`` (GPT-J / Cohere): channel ``2i`` pairs with ``2i + 1``; ``cos = repeat_interleave(f, 2)``.
* ``"interleaved_half_table"`` (GLM, Helium): interleaved pairs, but the tables arrive as ``cat(f, f)`` and
  are re-laid out inside the model's ``apply_rotary_pos_emb``.

Partial rotary (GPT-NeoX, Phi, StableLM) rotates only the first ``r = cos.shape[-1]`` channels.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

ROPE_STYLES = ("half", "interleaved", "interleaved_half_table")


def _rotate(x: torch.Tensor, style: str) -> torch.Tensor:
    """Multiply every channel pair by i: ``(a, b) -> (-b, a)``."""
    if style == "half":
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def _broadcast_table(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # [B, N, r] or [N, r] -> broadcastable to x [B, H, N, r]
    if table.dim() == 2:
        return table[None, None]
    return table.unsqueeze(1)


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str, inverse: bool = False
) -> torch.Tensor:
    """Rotate ``x [B, H, N, D]`` by the angles of ``cos, sin [B, N, r]`` (or ``[N, r]``), ``r <= D`` even.

    With ``inverse=True`` rotates by the opposite angles, undoing a previous application.
    """
    if style == "interleaved_half_table":
        cos = cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1)
        sin = sin[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1)
    rot_dim = cos.shape[-1]
    cos = _broadcast_table(cos, x).to(x.dtype)
    sin = _broadcast_table(sin, x).to(x.dtype)
    if inverse:
        sin = -sin
    rotated, passthrough = x[..., :rot_dim], x[..., rot_dim:]
    rotated = rotated * cos + _rotate(rotated, style) * sin
    return torch.cat((rotated, passthrough), dim=-1) if passthrough.shape[-1] else rotated


def _probe_tables(style: str, head_dim: int, length: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.arange(1, length + 1, dtype=torch.float64)[:, None] * freqs[None, :]  # [N, D/2]
    angles = angles.repeat_interleave(2, dim=-1) if style == "interleaved" else torch.cat((angles, angles), dim=-1)
    return angles.cos()[None], angles.sin()[None]  # [1, N, D]


def detect_rope_style(attention_module: torch.nn.Module, head_dim: int) -> str | None:
    """Identify the RoPE convention of a model family by probing its own ``apply_rotary_pos_emb``.

    Returns ``"half"`` or ``"interleaved"``, or ``None`` when the module's file has no such function
    (models without RoPE, or RoPE applied in a way we cannot probe).
    """
    module = sys.modules.get(type(attention_module).__module__)
    apply_fn: Callable | None = getattr(module, "apply_rotary_pos_emb", None)
    if apply_fn is None:
        return None
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 5, head_dim, dtype=torch.float64, generator=generator)
    for style in ROPE_STYLES:
        cos, sin = _probe_tables(style, head_dim)
        try:
            rotated, _ = apply_fn(x, x, cos, sin)
        except Exception:  # a signature we do not know: try the next convention, report None at the end
            continue
        expected = apply_rope(x, cos, sin, style)
        if rotated.shape == x.shape and torch.allclose(rotated.to(torch.float64), expected, atol=1e-9):
            return style
    return None
