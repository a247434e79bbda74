"""``seer-adapter bench``: the kernel against dense SDPA on this machine (CPU here: the reference backend)."""

import json
import re

import pytest

from seer_adapter.cli import build_parser, main

TINY = ["--seq-lens", "128", "200", "--densities", "0.5", "1", "--heads", "2", "--kv-heads", "1", "--head-dim", "16"]


def test_json_results_file_and_table(tmp_path, capsys):
    out = tmp_path / "results" / "bench.json"
    assert main(["bench", *TINY, "--device", "cpu", "--json", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed, written = json.loads(captured.out), json.loads(out.read_text())
    assert printed == written and set(written) == {"meta", "rows"}
    meta, rows = written["meta"], written["rows"]
    assert meta["backend"] == "reference" and meta["device"] == "cpu" and meta["dtype"] == "torch.float32"
    assert meta["command"] == "seer-adapter bench " + " ".join([*TINY, "--device", "cpu", "--json", "--out", str(out)])
    assert len(meta["checks"]) == 2 and all(check["passed"] for check in meta["checks"])
    assert [(r["kernel"], r["S"], r["density"], r["hq"], r["hkv"], r["head_dim"]) for r in rows] == [
        (kernel, seq_len, density, 2, 1, 16)
        for seq_len in (128, 200)
        for kernel, density in (("sdpa_dense", 1.0), ("seer_reference", 0.5), ("seer_reference", 1.0))
    ]
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["speedup_vs_dense"] > 0 for r in rows)
    # the human output goes to stderr under --json: the reference-backend note and the table
    assert "Kernel backend: reference" in captured.err and "x dense" in captured.err
    assert f"Wrote {out}" in captured.err


def test_plain_output_without_json(capsys):
    assert main(["bench", *TINY, "--device", "cpu", "--mask-heads", "kv", "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines() if line.startswith(("sdpa_dense", "seer_reference"))]
    assert [line[:5] for line in lines] == [
        [kernel, seq_len, "16", "2/1", mask]
        for seq_len in ("128", "200")
        for kernel, mask in (("sdpa_dense", "dense"), ("seer_reference", "kv"), ("seer_reference", "kv"))
    ]
    assert not out.lstrip().startswith("{")


def test_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plots" / "bench.png"
    assert main(["bench", *TINY, "--device", "cpu", "--plot", str(path)]) == 0
    assert path.stat().st_size > 10_000 and f"Wrote {path}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--densities", "0"], "argument --densities: a density is a fraction in (0, 1], got 0"),
        (["--densities", "1.5"], "a density is a fraction in (0, 1], got 1.5"),
        (["--densities", "half"], "argument --densities: not a number: 'half'"),
        (["--seq-lens", "8q"], "argument --seq-lens: not a sequence length: '8q'"),
        (["--heads", "0"], "argument --heads: must be >= 1, got 0"),
        (["--backend", "cutlass"], "argument --backend: invalid choice: 'cutlass'"),
    ],
)
def test_bad_arguments_are_usage_errors(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *arguments])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--heads", "6", "--kv-heads", "4"], "--heads 6 must be a multiple of --kv-heads 4"),
        (["--backend", "triton", "--device", "cpu"], "the triton backend runs on CUDA devices"),
        (["--plot", "speed.pnx"], "--plot speed.pnx: unknown image type 'pnx'; use one of"),
    ],
)
def test_bad_settings_give_clear_errors(arguments, message, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if "--plot" in arguments:
        pytest.importorskip("matplotlib")
    with pytest.raises(SystemExit, match=re.escape("seer-adapter bench: error: " + message)):
        main(["bench", *TINY, *arguments])


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--seq-lens", "--densities", "--head-dim", "--heads", "--kv-heads", "--json", "--out", "--plot"):
        assert option in text
    assert "examples:" in text and "benchmarks/bench_kernels.py" in text
