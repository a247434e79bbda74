"""Figures for notebooks and the CLI (matplotlib, optional extra ``seer-adapter[plots]``).

* `capture_gate_maps` + `plot_gate_map`: a layer's gate probabilities next to the true pooled attention map, with
  the kept blocks outlined;
* `plot_layer_density`: per-layer density of the last forward;
* `plot_ppl_vs_density`: perplexity against measured density for every selector of an evaluation results file;
* `plot_kernel_speed`: kernel time against density from a kernel benchmark results file (``benchmarks/`` scripts,
  ``seer-adapter bench``);
* `plot_distillation_loss`: the loss curve of a distillation run (``log.jsonl`` or `train_gates`' records);
* `plot_task_accuracy`: task-suite accuracy against length and against density per selector (`seer_adapter.tasks`).

Every function returns the matplotlib ``Figure`` and, given ``path``, also writes it (PNG at 150 dpi). Figures are
made with ``pyplot`` in whatever backend is active (inline in Jupyter); these functions never switch backends:
a script without a display that only writes files should call ``matplotlib.use("Agg")`` first, as the CLI does.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from dataclasses import dataclass, field
from typing import Any

import torch

from .attention import SeerAttentionMask, SeerLayerState, gate_probabilities
from .benchmarking import format_seq_len
from .distill import GateDistillationHook
from .masks import select_blocks

PLOTS_EXTRA_HINT = "plotting needs matplotlib: pip install 'seer-adapter[plots]'"


def require_matplotlib() -> None:
    """Raise ``ImportError`` naming the ``plots`` extra when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(PLOTS_EXTRA_HINT) from exc


def _pyplot() -> Any:
    require_matplotlib()
    import matplotlib.pyplot as plt

    return plt


def _finish(fig: Any, path: str | os.PathLike | None) -> Any:
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig


@dataclass
class GateMaps:
    """One layer's maps for one sequence: ``[H, nB, nB]`` each (H = query heads), and the sparsity settings in force
    for that layer when ``kept`` was selected."""

    layer: int
    gate_probs: torch.Tensor
    ground_truth: torch.Tensor
    kept: torch.Tensor
    settings: dict[str, Any] = field(default_factory=dict)


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
    return GateMaps(layer, probs[0].float().cpu(), target[0].float().cpu(), kept[0].cpu(), dict(settings))


def _describe_settings(settings: dict[str, Any]) -> str:
    method = settings.get("sparsity_method")
    if method in ("threshold", "nz_ratio", "token_budget"):
        return f"{method} = {settings.get(method)}"
    return str(method or "")


def plot_gate_map(maps: GateMaps, head: int = 0, path: str | os.PathLike | None = None, log_scale: bool = True) -> Any:
    """Gate probabilities (left) and the true pooled attention (right) of one head, side by side on one colour
    scale. The blocks the sparsity settings keep are drawn in full colour, dropped causal blocks faded; blocks above
    the diagonal (never attended) are blank."""
    plt = _pyplot()
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    n_heads = maps.gate_probs.shape[0]
    if not 0 <= head < n_heads:
        raise ValueError(f"head {head} out of range: layer {maps.layer} has heads 0..{n_heads - 1}")
    n_blocks = maps.gate_probs.shape[-1]
    causal = np.tril(np.ones((n_blocks, n_blocks), dtype=bool))
    kept = maps.kept[head].numpy() & causal
    dropped = causal & ~kept
    vmax = max(maps.gate_probs[head].max().item(), maps.ground_truth[head].max().item())
    norm = LogNorm(vmin=1e-4, vmax=vmax) if log_scale else Normalize(vmin=0, vmax=vmax)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, data, title in (
        (axes[0], maps.gate_probs[head], "gate probability (prediction)"),
        (axes[1], maps.ground_truth[head], "true pooled attention (distillation target)"),
    ):
        values = data.numpy().astype(np.float64)
        values = values.clip(min=1e-4) if log_scale else values
        image = ax.imshow(np.ma.masked_where(~causal, values), cmap=cmap, norm=norm, interpolation="nearest")
        fade = np.ma.masked_where(~dropped, np.zeros_like(values))  # white (Greys at 0) over dropped blocks
        ax.imshow(fade, cmap="Greys", vmin=0, vmax=1, alpha=0.7, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row's attention per block")
    density = kept.sum() / causal.sum()
    setting = _describe_settings(maps.settings)
    fig.suptitle(
        f"Layer {maps.layer}, head {head}: kept blocks in full colour, dropped ones faded "
        f"({setting + ': ' if setting else ''}{density:.2f} of the causal blocks kept)",
        fontsize=11,
    )
    return _finish(fig, path)


def plot_layer_density(stats: list[dict[str, Any]], path: str | os.PathLike | None = None) -> Any:
    """Bar chart of per-layer density from `SeerModel.sparsity_stats()` (dense layers shown at 1.0, greyed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(stats)), 3.5))
    layers = [s["layer"] for s in stats]
    density = [s.get("density", 1.0) for s in stats]
    colors = ["tab:blue" if s["mode"] == "sparse" else "lightgrey" for s in stats]
    ax.bar(layers, density, color=colors)
    sparse = [s["density"] for s in stats if s["mode"] == "sparse"]
    if sparse:
        mean = sum(sparse) / len(sparse)
        ax.axhline(mean, color="black", linestyle=":", linewidth=1, label=f"mean of sparse layers: {mean:.2f}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("kept fraction of causal blocks")
    ax.set_title("Density per layer of the last forward (grey: layers that ran dense)", fontsize=10)
    return _finish(fig, path)


def _load(results: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(results, dict):
        return results
    with open(results, encoding="utf-8") as f:
        return json.load(f)


def plot_ppl_vs_density(
    results: dict[str, Any] | str | os.PathLike, path: str | os.PathLike | None = None, relative: bool = True
) -> Any:
    """Perplexity against measured density, one line per selector, from an `evaluate_selectors` results file
    (``seer-adapter eval --out``).

    ``relative=True`` (default) plots the increase over the dense perplexity in percent on a symmetric-log axis,
    which keeps the small differences between good selectors and the large ones of poor selectors readable in one
    figure; ``relative=False`` plots the perplexity itself (log axis).
    """
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    data = _load(results)
    rows = data["rows"]
    dense = next((r["ppl"] for r in rows if r["selector"] == "dense"), None)
    if dense is None:
        raise ValueError("the results have no dense row: evaluate_selectors always adds one; is this an eval file?")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["selector"] != "dense":
            groups.setdefault(f"{r['selector']} ({r['sparsity_method']})", []).append(r)
    plotted: list[float] = []
    for label, group in groups.items():
        group = sorted(group, key=lambda r: r["density"])
        values = [100 * (r["ppl"] / dense - 1) if relative else r["ppl"] for r in group]
        plotted += values
        style = "--" if "threshold" in label else "-"
        ax.plot([r["density"] for r in group], values, marker="o", linestyle=style, label=label)
    if relative:
        ax.axhline(0, color="black", linestyle=":", linewidth=1, label=f"dense (PPL {dense:.2f})")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:+g} %" if y else "0 %"))
        ax.set_ylabel("perplexity increase over dense")
        low, high = min([0.0, *plotted]), max([0.0, *plotted])

        def decade(value: float) -> float:  # the power of ten above 2 x value: headroom for the legend
            return 10 ** math.ceil(math.log10(2 * value)) if value > 0.5 else 1.0

        ax.set_ylim(-decade(-low) if low < -0.15 else -0.3, decade(high))
    else:
        ax.axhline(dense, color="black", linestyle=":", linewidth=1, label=f"dense ({dense:.2f})")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.set_ylabel("perplexity")
    ax.set_xlabel("density (kept fraction of causal blocks; lower = sparser)")
    ax.grid(True, which="major", alpha=0.3)
    meta = data.get("meta", {})
    model_name = str(meta.get("model", "")).split(" (")[0]
    model_name = os.path.basename(model_name.rstrip("/")) if os.path.isabs(model_name) else model_name  # a folder
    details = [model_name, f"context {meta['context']}" if "context" in meta else "", str(meta.get("device", ""))]
    ax.set_title(", ".join(d for d in details if d), fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    return _finish(fig, path)


def _kernel_shape(row: dict[str, Any]) -> tuple[int, int, int, int, int]:
    return (row["S"], row.get("head_dim", 0), row.get("hq", 0), row.get("hkv", 0), row.get("batch", 1))


def plot_kernel_speed(
    results: dict[str, Any] | str | os.PathLike,
    path: str | os.PathLike | None = None,
    mask_heads: str = "q",
    max_columns: int = 3,
) -> Any:
    """Kernel time against density, one panel per benchmarked shape (S, head_dim, heads), from a kernel benchmark
    results file (``benchmarks/bench_kernels.py``, ``seer-adapter bench --out``).

    Sparse kernels are lines over density (rows with one mask per query head, ``mask_heads="q"``, or per KV head,
    ``"kv"``; where one kernel has several rows at one density, e.g. a launch-config sweep, the fastest is shown);
    dense baselines (one row at density 1.0) are dashed horizontal lines. A kernel keeps its colour in every panel.
    """
    plt = _pyplot()
    data = _load(results)
    rows = [r for r in data["rows"] if r.get("status", "ok") == "ok" and r.get("ms") is not None]
    if not rows:
        raise ValueError("the results hold no timed rows (every variant was skipped?)")
    shapes = sorted({_kernel_shape(r) for r in rows})
    kernels = sorted({r["kernel"] for r in rows})
    colors = {kernel: f"C{index % 10}" for index, kernel in enumerate(kernels)}
    columns = min(max_columns, len(shapes))
    n_rows = -(-len(shapes) // columns)
    fig, axes = plt.subplots(n_rows, columns, figsize=(max(6.5, 4.6 * columns), 3.8 * n_rows), squeeze=False)
    shown: dict[str, Any] = {}
    for ax, shape in zip(axes.flat, shapes, strict=False):
        seq_len, head_dim, hq, hkv, batch = shape
        for kernel in kernels:
            selected = [r for r in rows if _kernel_shape(r) == shape and r["kernel"] == kernel]
            dense = [r for r in selected if r.get("mask_heads") == "dense"]
            sparse = [r for r in selected if r.get("mask_heads", "q") == mask_heads]
            if dense:
                line = ax.axhline(
                    min(r["ms"] for r in dense),
                    linestyle="--",
                    linewidth=1.3,
                    color=colors[kernel],
                    label=f"{kernel} (dense)",
                )
                shown.setdefault(f"{kernel} (dense)", line)
            if sparse:
                best: dict[float, float] = {}
                for r in sparse:
                    density = r.get("density_actual", r["density"])
                    best[r["density"]] = min(best.get(r["density"], (density, float("inf"))), (density, r["ms"]))
                points = sorted(best.values())
                (line,) = ax.plot(*zip(*points, strict=True), marker="o", color=colors[kernel], label=kernel)
                shown.setdefault(kernel, line)
        title = f"S = {format_seq_len(seq_len)}, D = {head_dim}, Hq/Hkv = {hq}/{hkv}"
        ax.set_title(title + (f", B = {batch}" if batch != 1 else ""), fontsize=10)
        ax.set_xlabel("density (kept fraction of causal blocks)")
        ax.set_ylabel("time per call (ms, median)")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(shapes) :]:
        ax.set_visible(False)
    meta = data.get("meta", {})
    device = meta.get("gpu") or meta.get("device") or ""
    details = ", ".join(str(x) for x in (device, meta.get("dtype", "").replace("torch.", "")) if x)
    fig.suptitle(f"Attention time against density ({details}; dashed: dense baselines)", fontsize=11)
    legend_columns = 2 if columns == 1 else 4
    fig.legend(
        list(shown.values()),
        list(shown),
        loc="lower center",
        ncol=min(legend_columns, len(shown)),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, (0.06 + 0.03 * ((len(shown) - 1) // legend_columns)) / n_rows**0.5, 1, 1))
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig


def _load_records(log: list[dict[str, Any]] | str | os.PathLike) -> list[dict[str, Any]]:
    if isinstance(log, list):
        return log
    path = os.fspath(log)
    if os.path.isdir(path):
        path = os.path.join(path, "log.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_distillation_loss(log: list[dict[str, Any]] | str | os.PathLike, path: str | os.PathLike | None = None) -> Any:
    """Distillation loss (left) and learning rate (right axis) against the optimizer step, from `train_gates`'
    records, a ``log.jsonl`` file, or the output folder holding it. A resumed run's log continues the same curve.
    Runs that train decode gates also show the decode gates' own KL (mean over layers, unscaled)."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    records = _load_records(log)
    if not records:
        raise ValueError("the distillation log is empty")
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    marker = "o" if len(records) < 30 else None
    (loss_line,) = ax.plot(steps, [r["loss"] for r in records], marker=marker)
    handles, labels = [loss_line], ["loss"]
    losses = [r["loss"] for r in records]
    decode = [(r["step"], r["decode_loss"]) for r in records if r.get("decode_loss") is not None]
    if decode:
        (decode_line,) = ax.plot(*zip(*decode, strict=True), marker=marker, color="tab:green")
        handles.append(decode_line)
        labels.append("decode-gate KL (mean over layers)")
        losses += [value for _, value in decode]
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    if max(losses) > 10 * min(losses):  # several decades: label 1, 2, 5 x 10^k only
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (scaled KL, summed over layers)")
    ax.grid(True, alpha=0.3)
    if all("lr" in r for r in records):
        lr_axis = ax.twinx()
        (lr_line,) = lr_axis.plot(steps, [r["lr"] for r in records], color="tab:grey", linestyle="--", linewidth=1)
        lr_axis.set_ylabel("learning rate")
        lr_axis.set_ylim(bottom=0)
        handles.append(lr_line)
        labels.append("learning rate")
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    tokens_per_s = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    speed = f", {sum(tokens_per_s) / len(tokens_per_s):,.0f} tokens/s" if tokens_per_s else ""
    ax.set_title(f"Gate distillation: {len(records)} steps{speed}", fontsize=10)
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
