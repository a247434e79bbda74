"""Perplexity of a wrapped model, and the baselines the gates are judged against at equal density.

Selectors (all choose blocks per query-block row; top-k methods keep the same number of blocks per row, so
their densities match by construction):

* ``dense`` — every block (the base model);
* ``gate`` — the active adapter's gates (``nz_ratio`` and ``threshold`` sweeps);
* ``untrained`` — freshly initialised gates (the mean-pooling prior, see `AttnGate`);
* ``moba`` — parameter-free MoBA-style scores: mean-pooled post-RoPE Q · mean-pooled post-RoPE K;
* ``oracle`` — the true pooled attention map of the layer (upper bound, needs the full attention);
* ``random`` — uniformly random scores.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from .attention import SeerAttentionMask, SeerLayerState
from .gate import pool_blocks
from .kernels.ground_truth import attention_with_block_ground_truth

# Logits post-processing some families apply after the LM head (config attribute -> function).
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": lambda logits, cap: cap * torch.tanh(logits / cap),
    "logit_scale": lambda logits, scale: logits * scale,
    "logits_scaling": lambda logits, scale: logits / scale,
}


def _lm_head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name, transform in _LOGIT_TRANSFORMS.items():
        value = getattr(config, name, None)
        if value is not None:
            logits = transform(logits, value)
    return logits


def _check_chunked_logits(model: nn.Module, ids: torch.Tensor) -> None:
    """The backbone + LM head path must reproduce the model's own logits (families may post-process them)."""
    probe = ids[:, : min(64, ids.shape[1])]
    want = model(input_ids=probe, use_cache=False).logits.float()
    hidden = model.base_model(input_ids=probe, use_cache=False).last_hidden_state
    got = _lm_head_logits(model, hidden).float()
    if not torch.allclose(got, want, atol=1e-3 * want.abs().max().item() + 1e-4):
        raise RuntimeError(
            f"{type(model).__name__}: computing logits in chunks (backbone + LM head) does not reproduce the model's "
            "logits; this family post-processes logits in a way seer_adapter does not know yet."
        )


@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor, loss_chunk: int = 4096) -> tuple[float, int]:
    """Summed next-token NLL of one window ``ids [1, S]``, the LM head applied ``loss_chunk`` positions at a time
    (logits of a 32k window over a 150k vocabulary would not fit in memory). Returns ``(nll_sum, n_tokens)``."""
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state  # [1, S, H]
    total, count = 0.0, 0
    for start in range(0, ids.shape[1] - 1, loss_chunk):
        stop = min(ids.shape[1] - 1, start + loss_chunk)
        logits = _lm_head_logits(model, hidden[:, start:stop]).float()
        targets = ids[:, start + 1 : stop + 1]
        total += nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    return total, count


@torch.no_grad()
def perplexity(
    model: nn.Module, token_ids: torch.Tensor, window: int, max_windows: int | None = None, loss_chunk: int = 4096
) -> float:
    """Perplexity of ``token_ids`` (1-D) scored in non-overlapping windows of ``window`` tokens.

    Each window is one forward pass from an empty context (so every window exercises the full prefill path);
    the last partial window is dropped. ``model`` may be a `SeerModel` or a plain transformers model.
    Returns ``exp(mean token NLL)``.
    """
    hf_model = getattr(model, "base_model", model) if hasattr(model, "runtime") else model
    n_windows = token_ids.numel() // window
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"need at least {window} tokens to score one window, got {token_ids.numel()}")
    device = next(hf_model.parameters()).device
    windows = [token_ids[i * window : (i + 1) * window].to(device)[None] for i in range(n_windows)]
    _check_chunked_logits(hf_model, windows[0])
    total, count = 0.0, 0
    for ids in windows:
        nll, n = window_nll(hf_model, ids, loss_chunk)
        total, count = total + nll, count + n
    return math.exp(total / count)


# ------------------------------------------------------------------------------------------------------
# parameter-free block scorers (installed on SeerRuntime.block_scorer)
# ------------------------------------------------------------------------------------------------------
def moba_scorer(module, layer: SeerLayerState, query, key, value, mask: SeerAttentionMask, scaling, allowed):
    """Mean-pooled post-RoPE Q · mean-pooled post-RoPE K per block (no parameters)."""
    block = layer.runtime.config.block_size
    padding = mask.key_padding_mask
    q_mean = pool_blocks(query.float(), block, ["avg"], padding)  # [B, Hq, nB, D]
    k_mean = pool_blocks(key.float(), block, ["avg"], padding)  # [B, Hkv, nB, D]
    k_mean = k_mean.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scores = q_mean @ k_mean.transpose(-1, -2)
    return scores.masked_fill(~allowed, float("-inf"))


def oracle_scorer(module, layer: SeerLayerState, query, key, value, mask: SeerAttentionMask, scaling, allowed):
    """The layer's true pooled attention map (an upper bound that needs the full attention)."""
    _, block_map = attention_with_block_ground_truth(
        query, key, value, block_size=layer.runtime.config.block_size, scale=scaling,
        key_padding_mask=mask.key_padding_mask,
    )
    return block_map.masked_fill(~allowed, float("-inf"))


class RandomScorer:
    """Uniformly random block scores from a seeded generator (reproducible across runs)."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __call__(self, module, layer: SeerLayerState, query, key, value, mask, scaling, allowed):
        generator = torch.Generator(device=allowed.device).manual_seed(self.seed + layer.layer_idx)
        scores = torch.rand(allowed.shape, generator=generator, device=allowed.device)
        return scores.masked_fill(~allowed, float("-inf"))


SCORERS: dict[str, Any] = {"moba": moba_scorer, "oracle": oracle_scorer, "random": RandomScorer()}


@contextmanager
def block_scorer(model: Any, name: str | None) -> Iterator[None]:
    """Use a parameter-free scorer (``moba``, ``oracle``, ``random``) instead of the gates inside the block."""
    previous = model.runtime.block_scorer
    model.runtime.block_scorer = SCORERS[name] if name else None
    try:
        yield
    finally:
        model.runtime.block_scorer = previous


def stats_density(stats: list[dict[str, Any]]) -> float:
    """Kept fraction of the causal blocks summed over the ``"sparse"`` layers of ``sparsity_stats()`` rows (1.0 if
    none ran sparse)."""
    sparse = [s for s in stats if s["mode"] == "sparse"]
    causal = sum(s["causal_blocks"] for s in sparse)
    return sum(s["kept_blocks"] for s in sparse) / causal if causal else 1.0


def mean_density(model: Any) -> float:
    """`stats_density` of the model's last forward."""
    return stats_density(model.sparsity_stats())


SELECTORS = ("dense", "gate", "untrained", "moba", "oracle", "random")
_UNTRAINED_ADAPTER = "untrained"


def check_selectors(selectors: Sequence[str]) -> tuple[str, ...]:
    """``selectors`` as a tuple; raises ``ValueError`` naming the valid ones when one is unknown."""
    unknown = [s for s in selectors if s not in SELECTORS]
    if unknown:
        raise ValueError(f"unknown selector(s) {unknown}; choose from {', '.join(SELECTORS)}")
    return tuple(selectors)


@contextmanager
def selector_session(model: Any, selectors: Sequence[str]) -> Iterator[Callable[..., AbstractContextManager[None]]]:
    """Prepare a `SeerModel` to run under each of ``selectors`` (see `SELECTORS`) in turn.

    Yields ``use(selector, sparsity_method="nz_ratio", value=None)``, a context manager inside which the model's
    prefill picks blocks with ``selector``: ``"dense"`` runs the base model (adapter disabled; ``sparsity_method``
    and ``value`` are ignored), every other selector runs the gated prefill with ``sparsity_method`` set to
    ``value`` (an ``nz_ratio`` or a ``threshold``) and ``dense_below_length=0``, so prompts of any length are gated.
    Top-k (``nz_ratio``) selection keeps the same number of blocks per row whatever the selector, so selectors are
    compared at equal density. ``"untrained"`` uses fresh gates added for the session (the mean-pooling prior).

    On exit the active adapter and its settings are restored and the untrained gates removed.
    """
    from .config import SeerAttentionConfig

    if not hasattr(model, "runtime") or not hasattr(model, "set_sparsity"):
        raise TypeError(
            f"selectors run on a SeerModel (get_seer_model / SeerModel.from_pretrained), got {type(model).__name__}"
        )
    check_selectors(selectors)
    trained = model.active_adapter
    saved = model.peft_config[trained]
    added = None
    if "untrained" in selectors:
        added = _UNTRAINED_ADAPTER
        while added in model.peft_config:
            added = "_" + added
        fields = {k: v for k, v in saved.to_dict().items() if k not in ("gated_layers", "inference_mode")}
        model.add_adapter(added, SeerAttentionConfig(**fields))

    @contextmanager
    def use(selector: str, sparsity_method: str = "nz_ratio", value: float | None = None) -> Iterator[None]:
        check_selectors([selector])
        if selector == "dense":
            with model.disable_adapter():
                yield
            return
        if sparsity_method not in ("nz_ratio", "threshold") or value is None:
            raise ValueError(f"selector {selector!r} needs sparsity_method 'nz_ratio' or 'threshold' and a value")
        if selector == "untrained" and added is None:
            raise ValueError("'untrained' was not among the session's selectors")
        model.set_adapter(added if selector == "untrained" else trained)
        try:
            model.set_sparsity(sparsity_method=sparsity_method, dense_below_length=0, **{sparsity_method: value})
            with block_scorer(model, selector if selector in SCORERS else None):
                yield
        finally:
            model.set_adapter(trained)

    try:
        yield use
    finally:
        model.set_adapter(trained)
        model.peft_config[trained] = saved
        if added is not None:
            model.delete_adapter(added)


def evaluate_selectors(
    model: Any,
    token_ids: torch.Tensor,
    window: int,
    *,
    max_windows: int | None = None,
    nz_ratios: tuple[float, ...] = (0.5, 0.3, 0.1),
    thresholds: tuple[float, ...] = (),
    selectors: tuple[str, ...] = ("gate", "untrained", "moba", "oracle", "random"),
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Perplexity of every selector at every ``nz_ratio`` (plus gate ``threshold`` sweeps) and of dense.

    ``model`` is a `SeerModel` whose active adapter holds the gates under test. Returns rows
    ``{selector, sparsity_method, nz_ratio | threshold, density (measured), ppl}``; the dense row always comes
    first (``"dense"`` in ``selectors`` is allowed and changes nothing).
    """
    from tqdm.auto import tqdm

    selectors = tuple(s for s in check_selectors(selectors) if s != "dense")
    jobs: list[tuple[str, str, float]] = [("dense", "dense", 1.0)]
    jobs += [(sel, "nz_ratio", nz) for sel in selectors for nz in nz_ratios]
    jobs += [("gate", "threshold", t) for t in thresholds]
    rows = []
    with selector_session(model, selectors) as use:
        for selector, method, value in tqdm(jobs, disable=not progress, desc="evaluate", unit="run"):
            with use(selector, method, value):
                ppl = perplexity(model, token_ids, window, max_windows)
            if selector == "dense":
                rows.append({"selector": "dense", "sparsity_method": "dense", "density": 1.0, "ppl": ppl})
            else:
                rows.append(
                    {
                        "selector": selector,
                        "sparsity_method": method,
                        method: value,
                        "density": mean_density(model),
                        "ppl": ppl,
                    }
                )
    return rows


def environment_meta(device: torch.device, **fields: Any) -> dict[str, Any]:
    """The ``meta`` object of a results file: ``fields`` plus device, versions and date."""
    import datetime

    import transformers

    return {
        **fields,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
    }


def write_results(path: str | os.PathLike, meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Write ``{"meta": meta, "rows": rows}`` as JSON to ``path`` (folders created). Returns the path written."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return path


def format_selector_table(rows: list[dict[str, Any]]) -> str:
    """A text table of `evaluate_selectors` rows, with the perplexity change against the dense row."""
    dense = next(r["ppl"] for r in rows if r["selector"] == "dense")
    lines = [f"{'selector':<10} {'method':<10} {'setting':>8} {'density':>8} {'ppl':>9} {'vs dense':>9}"]
    for r in rows:
        setting = r.get("nz_ratio", r.get("threshold", ""))
        lines.append(
            f"{r['selector']:<10} {r['sparsity_method']:<10} {setting!s:>8} {r['density']:>8.3f} {r['ppl']:>9.3f} "
            f"{100 * (r['ppl'] / dense - 1):>+8.2f}%"
        )
    return "\n".join(lines)
