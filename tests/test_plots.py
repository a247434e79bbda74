"""Plots are written, non-empty, and made from real maps and results files."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

from tiny_models import tiny_model  # noqa: E402

from seer_adapter import SeerAttentionConfig, get_seer_model  # noqa: E402
from seer_adapter.plots import (  # noqa: E402
    capture_gate_maps,
    plot_distillation_loss,
    plot_gate_map,
    plot_kernel_speed,
    plot_layer_density,
    plot_ppl_vs_density,
)

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def test_gate_map_and_density_plots(tmp_path):
    model = get_seer_model(
        tiny_model("llama"),
        SeerAttentionConfig(block_size=16, sparsity_method="nz_ratio", nz_ratio=0.4, dense_below_length=0),
    )
    ids = torch.randint(3, 128, (1, 120))
    maps = capture_gate_maps(model, ids, layer=1)
    assert maps.gate_probs.shape == maps.ground_truth.shape == maps.kept.shape == (4, 8, 8)
    torch.testing.assert_close(maps.ground_truth.sum(-1), torch.ones(4, 8))
    assert maps.kept.diagonal(dim1=-2, dim2=-1).all() and not maps.kept.triu(1).any()
    plot_gate_map(maps, head=2, path=tmp_path / "map.png")
    model(ids)
    plot_layer_density(model.sparsity_stats(), path=tmp_path / "density.png")
    for name in ("map.png", "density.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    with pytest.raises(ValueError, match="no gate"):
        capture_gate_maps(model, ids, layer=7)


def test_results_plots(tmp_path):
    evaluation = next(RESULTS.glob("eval_*.json"))
    plot_ppl_vs_density(evaluation, path=tmp_path / "ppl.png")
    kernels = next(RESULTS.glob("bench_kernels_2*.json"))
    plot_kernel_speed(kernels, path=tmp_path / "speed.png")
    for name in ("ppl.png", "speed.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    rows = json.loads(evaluation.read_text())["rows"]
    assert any(r["selector"] == "dense" for r in rows)


def test_gate_map_records_the_settings_and_checks_the_head(tmp_path):
    model = get_seer_model(
        tiny_model("llama"),
        SeerAttentionConfig(block_size=16, sparsity_method="threshold", threshold=0.05, dense_below_length=0),
    )
    maps = capture_gate_maps(model, torch.randint(3, 128, (1, 100)), layer=0)
    assert maps.settings["sparsity_method"] == "threshold" and maps.settings["threshold"] == 0.05
    figure = plot_gate_map(maps, head=3)
    assert "threshold = 0.05" in figure._suptitle.get_text()
    with pytest.raises(ValueError, match="head 4 out of range: layer 0 has heads 0..3"):
        plot_gate_map(maps, head=4)


def test_ppl_vs_density_relative_and_absolute(tmp_path):
    evaluation = next(RESULTS.glob("eval_*.json"))
    rows = json.loads(evaluation.read_text())["rows"]
    relative = plot_ppl_vs_density(evaluation, path=tmp_path / "relative.png")
    absolute = plot_ppl_vs_density(evaluation, path=tmp_path / "absolute.png", relative=False)
    dense = next(r["ppl"] for r in rows if r["selector"] == "dense")
    gate = sorted((r["density"], r["ppl"]) for r in rows if r["selector"] == "gate" and "nz_ratio" in r)
    line = next(ln for ln in relative.axes[0].lines if ln.get_label() == "gate (nz_ratio)")
    assert list(line.get_ydata()) == pytest.approx([100 * (ppl / dense - 1) for _, ppl in gate])
    line = next(ln for ln in absolute.axes[0].lines if ln.get_label() == "gate (nz_ratio)")
    assert list(line.get_ydata()) == pytest.approx([ppl for _, ppl in gate])
    with pytest.raises(ValueError, match="no dense row"):
        plot_ppl_vs_density({"rows": [r for r in rows if r["selector"] != "dense"]})


def test_kernel_speed_from_a_cli_benchmark(tmp_path):
    from seer_adapter.benchmarking import run_kernel_benchmark

    results = run_kernel_benchmark([128, 192], [0.3, 1.0], hq=2, hkv=1, head_dim=16, progress=False)
    figure = plot_kernel_speed(results, path=tmp_path / "speed.png")
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["S = 128, D = 16, Hq/Hkv = 2/1", "S = 192, D = 16, Hq/Hkv = 2/1"]
    for ax, seq_len in zip(panels, (128, 192), strict=True):
        sparse = next(ln for ln in ax.lines if ln.get_label() == "seer_reference")
        rows = [r for r in results["rows"] if r["S"] == seq_len and r["kernel"] == "seer_reference"]
        # Points are ordered by measured density (ties, e.g. at S = 128 where every mask keeps both blocks, by time).
        assert list(sparse.get_ydata()) == [r["ms"] for r in sorted(rows, key=lambda r: (r["density_actual"], r["ms"]))]
        assert [ln.get_label() for ln in ax.lines] == ["sdpa_dense (dense)", "seer_reference"]
    assert (tmp_path / "speed.png").stat().st_size > 10_000
    skipped = {"rows": [{**results["rows"][0], "status": "skipped", "ms": None}]}
    with pytest.raises(ValueError, match="no timed rows"):
        plot_kernel_speed(skipped)


def test_distillation_loss_from_records_or_log(tmp_path):
    records = [{"step": i, "loss": 100.0 / i, "lr": 1e-3, "tokens_per_s": 50.0} for i in range(1, 6)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for source in (records, tmp_path, tmp_path / "log.jsonl"):
        figure = plot_distillation_loss(source, path=tmp_path / "loss.png")
        assert list(figure.axes[0].lines[0].get_ydata()) == [r["loss"] for r in records]
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    assert "5 steps, 50 tokens/s" in figure.axes[0].get_title()
    with pytest.raises(ValueError, match="empty"):
        plot_distillation_loss([])
    # a run with decode gates: their KL is a second curve (records without one, e.g. before a resume, are skipped)
    with_decode = [{**r, "decode_loss": None if r["step"] == 1 else 1.0 / r["step"]} for r in records]
    figure = plot_distillation_loss(with_decode)
    ax = figure.axes[0]
    assert list(ax.lines[1].get_xdata()) == [2, 3, 4, 5] and list(ax.lines[1].get_ydata()) == [0.5, 1 / 3, 0.25, 0.2]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "loss",
        "decode-gate KL (mean over layers)",
        "learning rate",
    ]
