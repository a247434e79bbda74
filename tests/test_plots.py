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
