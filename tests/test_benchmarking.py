"""seer_adapter.benchmarking: the helpers `seer-adapter bench` and benchmarks/bench_kernels.py share."""

import math

import pytest
import torch

from seer_adapter.benchmarking import (
    Shape,
    compare_outputs,
    format_kernel_table,
    format_seq_len,
    make_inputs,
    parse_seq_len,
    random_causal_block_mask,
    run_kernel_benchmark,
    sdpa_dense,
    time_ms,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize("text, tokens", [("8k", 8192), ("1.5K", 1536), (" 1000 ", 1000), ("128k", 131072)])
def test_parse_seq_len(text, tokens):
    assert parse_seq_len(text) == tokens


@pytest.mark.parametrize("text", ["", "8q", "k", "-2", "0", "1.3k", "12.5"])
def test_parse_seq_len_refuses_what_is_not_a_length(text):
    with pytest.raises(ValueError, match="sequence length"):
        parse_seq_len(text)


def test_format_seq_len():
    assert [format_seq_len(n) for n in (512, 1000, 1024, 32768, 1536)] == ["512", "1000", "1k", "32k", "1536"]


@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 1.0])
def test_random_mask_is_block_causal_keeps_sink_and_diagonal_and_reports_its_density(density):
    mask, actual = random_causal_block_mask(2, 3, 40, density, seed=0, device=CPU)
    assert mask.shape == (2, 3, 40, 40) and mask.dtype == torch.bool
    assert not mask.triu(1).any()
    assert mask[..., 0].all() and mask.diagonal(dim1=-2, dim2=-1).all()
    causal = 40 * 41 / 2
    assert actual == pytest.approx(mask.sum().item() / (causal * 6))
    assert actual == pytest.approx(density, abs=0.05)  # forced blocks are 79 of 820 here: below every target
    again, _ = random_causal_block_mask(2, 3, 40, density, seed=0, device=CPU)
    assert torch.equal(mask, again)


def test_random_mask_where_the_forced_blocks_exceed_the_target():
    mask, actual = random_causal_block_mask(1, 1, 2, 0.1, seed=0, device=CPU)  # 3 causal blocks, all forced
    assert mask[0, 0].tolist() == [[True, False], [True, True]] and actual == 1.0


def test_inputs_have_the_transformers_layout():
    q, k, v = make_inputs(Shape(70, hq=4, hkv=2, head_dim=8), CPU, torch.float32, seed=1)
    assert q.shape == (1, 4, 70, 8) and k.shape == v.shape == (1, 2, 70, 8)
    assert not q.is_contiguous()  # a transpose of [B, S, H, D], as attention modules pass it
    assert Shape(1024, hq=2, head_dim=64).flops(0.5) == 4 * 2 * 1024**2 * 64 * 0.5 * 0.5


def test_sdpa_dense_is_causal_attention_with_gqa():
    q, k, v = make_inputs(Shape(50, hq=4, hkv=2, head_dim=8), CPU, torch.float32)
    fn, note = sdpa_dense(q, k, v)
    expanded = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    want = torch.nn.functional.scaled_dot_product_attention(q, *expanded, is_causal=True)
    torch.testing.assert_close(fn(), want)
    assert note == ""


def test_time_ms_is_the_median_of_several_calls():
    calls = []

    def fn():
        calls.append(1)
        return sum(range(20000))

    ms = time_ms(fn, CPU, min_warmup_ms=1, min_rep_ms=5)
    assert 0 < ms < 1000 and len(calls) >= 5  # one untimed, one sizing, at least three timed


def test_compare_outputs_catches_differences_and_nan():
    a = torch.ones(3)
    assert compare_outputs("same", a, a.clone(), atol=0, rtol=0) == {"check": "same", "max_abs_diff": 0, "passed": True}
    assert not compare_outputs("off", a + 1e-2, a, atol=1e-3, rtol=0)["passed"]
    assert not compare_outputs("nan", torch.tensor([1.0, math.nan, 1.0]), a, atol=1, rtol=1)["passed"]


def test_run_kernel_benchmark_rows_and_table():
    results = run_kernel_benchmark(
        [100, 192], [0.5, 1.0], hq=4, hkv=2, head_dim=16, block_size=32, mask_heads="kv", progress=False
    )
    meta, rows = results["meta"], results["rows"]
    assert meta["backend"] == "reference" and meta["device"] == "cpu" and meta["dtype"] == "torch.float32"
    assert [check["passed"] for check in meta["checks"]] == [True, True]
    assert [(r["kernel"], r["S"], r["density"], r["mask_heads"]) for r in rows] == [
        (kernel, seq_len, density, heads)
        for seq_len in (100, 192)
        for kernel, density, heads in (("sdpa_dense", 1.0, "dense"), ("seer_reference", 0.5, "kv"),
                                       ("seer_reference", 1.0, "kv"))
    ]  # fmt: skip
    for row in rows:
        assert row["status"] == "ok" and row["ms"] > 0 and row["block_size"] == 32
        dense = next(r for r in rows if r["S"] == row["S"] and r["kernel"] == "sdpa_dense")
        assert row["speedup_vs_dense"] == pytest.approx(dense["ms"] / row["ms"])
        assert row["tflops_eff"] == pytest.approx(
            Shape(row["S"], 4, 2, 16).flops(row["density_actual"]) / (row["ms"] * 1e-3) / 1e12
        )
    table = format_kernel_table(rows).splitlines()
    assert table[0].split() == ["kernel", "S", "D", "Hq/Hkv", "mask", "density", "ms", "TFLOP/s", "x", "dense"]
    assert len(table) == 2 + len(rows) and table[2].split()[:6] == ["sdpa_dense", "100", "16", "4/2", "dense", "1.00"]


def test_run_kernel_benchmark_refuses_bad_settings():
    with pytest.raises(ValueError, match="multiple"):
        run_kernel_benchmark([64], [0.5], hq=3, hkv=2, head_dim=8, progress=False)
    with pytest.raises(ValueError, match="densities"):
        run_kernel_benchmark([64], [0.0], hq=2, hkv=1, head_dim=8, progress=False)
    with pytest.raises(ValueError, match="mask_heads"):
        run_kernel_benchmark([64], [0.5], hq=2, hkv=1, head_dim=8, mask_heads="all", progress=False)
    with pytest.raises(ValueError, match="not available"):
        run_kernel_benchmark([64], [0.5], hq=2, hkv=1, head_dim=8, backend="cutlass", progress=False)


def test_skipped_rows_are_listed_with_their_reason():
    rows = [
        {"kernel": "seer_triton", "S": 8192, "head_dim": 128, "hq": 32, "hkv": 8, "mask_heads": "q", "density": 0.1,
         "status": "skipped", "reason": "out of memory: CUDA"},
    ]  # fmt: skip
    assert "skipped: out of memory: CUDA" in format_kernel_table(rows)
