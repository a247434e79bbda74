"""Perplexity of a (wrapped) causal LM on real text."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, window: int, max_windows: int | None = None) -> float:
    """Perplexity of ``token_ids`` (1-D) scored in non-overlapping windows of ``window`` tokens.

    Each window is one forward pass from an empty context (so every window exercises the full prefill
    path); the last partial window is dropped. Returns ``exp(mean token NLL)``.
    """
    n_windows = token_ids.numel() // window
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"need at least {window} tokens to score one window, got {token_ids.numel()}")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for i in range(n_windows):
        ids = token_ids[i * window : (i + 1) * window].to(device)[None]
        loss = model(input_ids=ids, labels=ids).loss
        total_nll += loss.item() * (window - 1)
        total_tokens += window - 1
    return math.exp(total_nll / total_tokens)
