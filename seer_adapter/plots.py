"""Figures for notebooks and the CLI (matplotlib, optional extra ``seer-adapter[plots]``).

* `capture_gate_maps` + `plot_gate_map`: a layer's gate probabilities next to the true pooled attention map, with
  the kept blocks outlined;
* `plot_layer_density`: per-layer density of the last forward;
* `plot_ppl_vs_density`: perplexity against measured density for every selector of an evaluation results file;
* `plot_kernel_speed`: kernel time against density from a kernel benchmark results file;
* `plot_task_accuracy`: task-suite accuracy against length and against density per selector (`seer_adapter.tasks`).

Every function returns the matplotlib ``Figure`` and, given ``path``, also writes it (PNG at 150 dpi).
"""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import dataclass
from typing import Any

import torch

from .attention import SeerAttentionMask, SeerLayerState, gate_probabilities
from .distill import GateDistillationHook
from .masks import select_blocks


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'seer-adapter[plots]'") from exc
    return plt


def _finish(fig: Any, path: str | os.PathLike | None) -> Any:
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig


@dataclass
class GateMaps:
    """One layer's maps for one sequence: ``[H, nB, nB]`` each (H = query heads)."""

    layer: int
    gate_probs: torch.Tensor
    ground_truth: torch.Tensor
    kept: torch.Tensor


class _RecordingHook(GateDistillationHook):
    def __init__(self, layer: int):
        super().__init__(skip_first_fraction=0.0)
        self.layer = layer
        self.maps: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, module, layer: SeerLayerState, query, key, value, mask: SeerAttentionMask, scaling, **kwargs):
        from .attention import compute_gate_logits
        from .kernels.ground_truth import attention_with_block_ground_truth

        config = layer.runtime.config
        out, target = attention_with_block_ground_truth(
            query,
            key,
            value,
            block_size=config.block_size,
            scale=scaling,
            key_padding_mask=mask.key_padding_mask,
            softcap=kwargs.get("softcap"),
        )
        if layer.layer_idx == self.layer:
            logits = compute_gate_logits(layer, module, query, key, mask.key_padding_mask)
            self.maps = (logits, target)
        return out


@torch.no_grad()
def capture_gate_maps(model: Any, input_ids: torch.Tensor, layer: int) -> GateMaps:
    """Run one sequence ``input_ids [1, S]`` and return the layer's gate probabilities, the true pooled attention
    map (the distillation target) and the blocks the current sparsity settings keep."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"capture_gate_maps takes one sequence [1, S], got {tuple(input_ids.shape)}")
    if layer not in model.gates():
        raise ValueError(f"layer {layer} has no gate; gated layers: {sorted(model.gates())}")
    hook = _RecordingHook(layer)
    runtime = model.runtime
    runtime.distillation = hook
    try:
        model.base_model.base_model(input_ids=input_ids, use_cache=False)
    finally:
        runtime.distillation = None
    logits, target = hook.maps
    probs = gate_probabilities(logits)
    config = runtime.config
    settings = config.sparsity_for_layer(layer)
    kept = select_blocks(
        probs,
        torch.isfinite(logits),
        method=settings["sparsity_method"],
        block_size=config.block_size,
        threshold=settings["threshold"],
        nz_ratio=settings["nz_ratio"],
        token_budget=settings["token_budget"],
        sink_block=torch.zeros(1, dtype=torch.long, device=probs.device) if config.force_sink_block else None,
        force_local_block=config.force_local_block,
        dense_last_query_blocks=config.dense_last_query_blocks,
    )
    return GateMaps(layer, probs[0].float().cpu(), target[0].float().cpu(), kept[0].cpu())


def plot_gate_map(maps: GateMaps, head: int = 0, path: str | os.PathLike | None = None, log_scale: bool = True) -> Any:
    """Gate probabilities (left) and the true pooled attention (right) of one head, kept blocks outlined."""
    plt = _pyplot()
    import numpy as np
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    kept = maps.kept[head].numpy()
    dropped = ~kept & ((maps.gate_probs[head] > 0) | (maps.ground_truth[head] > 0)).numpy()  # causal, not kept
    vmax = max(maps.gate_probs[head].max().item(), maps.ground_truth[head].max().item())
    for ax, data, title in (
        (axes[0], maps.gate_probs[head], "gate probability"),
        (axes[1], maps.ground_truth[head], "true pooled attention (distillation target)"),
    ):
        values = data.numpy()
        norm = LogNorm(vmin=1e-4, vmax=vmax) if log_scale else None
        image = ax.imshow(
            values.clip(min=1e-4) if log_scale else values, cmap="viridis", norm=norm, interpolation="nearest"
        )
        ax.imshow(
            np.ma.masked_where(~dropped, np.ones_like(values)),
            cmap="Greys",
            vmin=0,
            vmax=1,
            alpha=0.6,
            interpolation="nearest",
        )
        ax.set_title(f"layer {maps.layer}, head {head}: {title}", fontsize=10)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="probability per block")
    density = kept.sum() / max(1, (maps.ground_truth[head] > 0).sum().item())
    fig.suptitle(f"greyed: blocks the current settings drop (kept: {density:.2f} of the causal blocks)")
    return _finish(fig, path)


def plot_layer_density(stats: list[dict[str, Any]], path: str | os.PathLike | None = None) -> Any:
    """Bar chart of per-layer density from `SeerModel.sparsity_stats()` (dense layers shown at 1.0, greyed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(stats)), 3.5))
    layers = [s["layer"] for s in stats]
    density = [s.get("density", 1.0) for s in stats]
    colors = ["tab:blue" if s["mode"] == "sparse" else "lightgrey" for s in stats]
    ax.bar(layers, density, color=colors)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("kept fraction of causal blocks")
    ax.set_title("density per layer (grey: dense)")
    return _finish(fig, path)


def _load(results: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(results, dict):
        return results
    with open(results, encoding="utf-8") as f:
        return json.load(f)


def plot_ppl_vs_density(results: dict[str, Any] | str | os.PathLike, path: str | os.PathLike | None = None) -> Any:
    """Perplexity against measured density, one line per selector, from an `evaluate_selectors` results file."""
    plt = _pyplot()
    data = _load(results)
    rows = data["rows"]
    dense = next(r["ppl"] for r in rows if r["selector"] == "dense")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["selector"] != "dense":
            groups.setdefault(f"{r['selector']} ({r['sparsity_method']})", []).append(r)
    for label, group in groups.items():
        group = sorted(group, key=lambda r: r["density"])
        ax.plot([r["density"] for r in group], [r["ppl"] for r in group], marker="o", label=label)
    ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.2f})")
    ax.set_xlabel("density (kept fraction of causal blocks)")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_yscale("log")
    meta = data.get("meta", {})
    model_name = str(meta.get("model", "")).split(" (")[0]
    ax.set_title(f"{model_name}, context {meta.get('context', '?')}, {meta.get('device', '')}", fontsize=9)
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_kernel_speed(results: dict[str, Any] | str | os.PathLike, path: str | os.PathLike | None = None) -> Any:
    """Kernel time against density per sequence length, from a `benchmarks/bench_kernels.py` results file."""
    plt = _pyplot()
    data = _load(results)
    rows = [r for r in data["rows"] if r.get("status", "ok") == "ok" and "ms" in r]
    lengths = sorted({r["S"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        for index, kernel in enumerate(sorted({r["kernel"] for r in rows if r["S"] == length})):
            points = sorted(
                (r["density"], r["ms"])
                for r in rows
                if r["S"] == length
                and r["kernel"] == kernel
                and r.get("mask_heads", "q") in ("q", "dense")
                and r.get("head_dim") == 128
                and r.get("hkv") != r.get("hq")
            )
            if not points:
                continue
            style = "--" if len(points) == 1 else "-"
            xs, ys = zip(*points, strict=True)
            if len(points) == 1:
                ax.axhline(ys[0], linestyle=style, linewidth=1.2, color=f"C{index}", label=f"{kernel} (dense)")
            else:
                ax.plot(xs, ys, marker="o", color=f"C{index}", label=kernel)
        ax.set_title(f"S = {length // 1024}k", fontsize=10)
        ax.set_xlabel("density")
        ax.set_ylabel("ms (median)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{data.get('meta', {}).get('gpu', '')}: attention time against density (dashed: dense)")
    return _finish(fig, path)


_SELECTOR_COLORS = {
    "dense": "black",
    "gate": "tab:blue",
    "untrained": "tab:purple",
    "moba": "tab:orange",
    "oracle": "tab:green",
    "random": "tab:gray",
}


def _length_label(length: float) -> str:
    return f"{length / 1024:g}k" if length >= 1024 else f"{length:g}"


def plot_task_accuracy(
    results: dict[str, Any] | str | os.PathLike,
    path: str | os.PathLike | None = None,
    tasks: list[str] | None = None,
) -> Any:
    """Task-suite accuracy from an `evaluate_tasks` results file (``seer-adapter eval --tasks ... --out``).

    One panel per density setting (``nz_ratio``; gate ``threshold`` runs share one more panel): score (mean recall
    over ``tasks``, default every task of the file) against length, one line per selector, dense in black in every
    panel. Last panel: score (mean over tasks and lengths) against the measured prefill density, one line per
    selector through its settings; dense is the dashed line.
    """
    plt = _pyplot()
    data = _load(results)
    rows = [r for r in data["rows"] if tasks is None or r["task"] in tasks]
    if not rows:
        raise ValueError(f"no rows for tasks {tasks}" if tasks else "the results have no rows")
    lengths = sorted({r["length"] for r in rows})
    task_names = sorted({r["task"] for r in rows})
    dense = [r for r in rows if r["sparsity_method"] == "dense"]
    panels = [
        (f"nz_ratio = {v:g}", [r for r in rows if r.get("sparsity_method") == "nz_ratio" and r["nz_ratio"] == v])
        for v in sorted({r["nz_ratio"] for r in rows if r["sparsity_method"] == "nz_ratio"}, reverse=True)
    ]
    if any(r["sparsity_method"] == "threshold" for r in rows):
        panels.append(("gate thresholds", [r for r in rows if r["sparsity_method"] == "threshold"]))
    if not panels:
        panels = [("dense only", [])]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 4.4), squeeze=False)
    axes = axes[0]

    def mean(group: list[dict[str, Any]], key: str) -> float:
        return sum(r[key] for r in group) / len(group)

    def by_length(group: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
        xs = [n for n in lengths if any(r["length"] == n for r in group)]
        return xs, [mean([r for r in group if r["length"] == n], "score") for n in xs]

    subject = f"mean over {len(task_names)} task{'s' * (len(task_names) > 1)}"
    for ax, (title, group) in zip(axes, panels, strict=False):
        if dense:
            ax.plot(*by_length(dense), "-", marker="o", linewidth=2.5, color="black", label="dense", zorder=3)
        lines: dict[str, list[dict[str, Any]]] = {}
        for r in group:
            label = r["selector"] if r["sparsity_method"] == "nz_ratio" else f"gate thr={r['threshold']:g}"
            lines.setdefault(label, []).append(r)
        for index, (label, line) in enumerate(lines.items()):
            color = _SELECTOR_COLORS.get(label, f"C{index}")
            ax.plot(*by_length(line), marker="o", linewidth=1.5, color=color, label=label, alpha=0.85)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [_length_label(n) for n in lengths])
        ax.minorticks_off()
        if len(lengths) == 1:
            ax.set_xlim(lengths[0] / 1.5, lengths[0] * 1.5)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.set_xlabel("length (tokens, prompt + answer)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="best")
    axes[0].set_ylabel(f"score (recall %, {subject})")

    right = axes[-1]
    settings: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in rows:
        if r["sparsity_method"] != "dense":
            key = (r["selector"], r["sparsity_method"], r[r["sparsity_method"]])
            settings.setdefault(key, []).append(r)
    curves: dict[str, list[tuple[float, float]]] = {}
    for (selector, method, _), group in settings.items():
        label = selector if method == "nz_ratio" else f"{selector} (threshold)"
        curves.setdefault(label, []).append((mean(group, "density"), mean(group, "score")))
    for index, (label, points) in enumerate(curves.items()):
        xs, ys = zip(*sorted(points), strict=True)
        right.plot(xs, ys, marker="o", color=_SELECTOR_COLORS.get(label, f"C{index}"), label=label, alpha=0.85)
    if dense:
        score = mean(dense, "score")
        right.axhline(score, color="black", linestyle="--", linewidth=1.2, label=f"dense ({score:.1f})")
    right.set_xlim(0, 1.02)
    right.set_ylim(-3, 103)
    right.grid(alpha=0.3)
    right.set_xlabel("measured prefill density")
    right.set_ylabel("score (recall %, mean over tasks and lengths)")
    right.set_title("accuracy against density", fontsize=10)
    right.legend(fontsize=7, loc="best")
    meta = data.get("meta", {})
    model_name = str(meta.get("model", "")).split(" (")[0]
    adapter = meta.get("adapter") or "untrained gates"
    names = ", ".join(task_names) if len(task_names) <= 4 else f"{len(task_names)} tasks"
    title = (
        f"{model_name} + {adapter} ({meta.get('device', '?')}): {names}; {rows[0].get('num_samples', '?')} "
        "sample(s) per task and length; sparse prefill, "
        f"{'recomputed' if rows[0].get('decode') == 'recompute' else 'dense'} decode"
    )
    fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * 12)), fontsize=9)
    return _finish(fig, path)
