"""Decode-gate distillation target: the PyTorch reference against the Triton kernel, alone and inside a
distillation step (a script, not a test).

Kernel rows: one layer's target at the shapes of SmolLM2-135M (Hq 9 / Hkv 3, D 64) at 8k, Qwen2.5-0.5B (14 / 2, 64)
at 16k and Llama-3.1-8B (32 / 8, 128) at 32k, random bf16 inputs, at each ``--block-sizes`` (default 64), for the
token rows distillation uses (an evenly strided ``fraction`` of the tokens after the first quarter). Backends: the
PyTorch reference, ``triton_per_head`` (per-query-head record, group reduced in PyTorch) and ``triton`` (the
default: the group's heads in one tile, reduced in registers); ``mb_<backend>`` is the call's peak memory beyond its
inputs. FLOPs counted
as the kernel does its work: two passes of ``Q·Kᵀ`` over each row's causal keys, ``2 · 2 · D · Hq · Σ (pos + 1)``.

Step rows: one distillation step (forward with both targets, gate backward) of a Qwen2.5-0.5B-shaped model (random
bf16 weights, 24 layers) with a decode gate, the target from each backend.

    python benchmarks/bench_decode_target.py [--steps-only] [--kernels-only] [--block-sizes 16 64]

Writes ``benchmarks/results/bench_decode_target_<time>.json`` and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import seer_adapter.distill as distill  # noqa: E402
from seer_adapter import SeerAttentionConfig, get_seer_model  # noqa: E402
from seer_adapter.distill import decode_target_rows, distillation_loss  # noqa: E402
from seer_adapter.kernels import decode_block_ground_truth  # noqa: E402

# name -> (Hq, Hkv, D, S)
SHAPES = {"smollm2_8k": (9, 3, 64, 8192), "qwen0.5b_16k": (14, 2, 64, 16384), "llama8b_32k": (32, 8, 128, 32768)}
QWEN_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)


def cuda_ms(fn, repeats: int = 5) -> float:
    """Median milliseconds of ``fn()`` (after one warm-up), CUDA events."""
    fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def peak_mb(fn) -> tuple[torch.Tensor, float]:
    """``fn()`` and its peak CUDA memory beyond what was allocated before it (MB)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    return result, (torch.cuda.max_memory_allocated() - before) / 2**20


def kernel_rows(fractions: list[float], block_sizes: list[int]) -> list[dict]:
    rows = []
    for name, (hq, hkv, head_dim, length) in SHAPES.items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, length, hq, head_dim, device="cuda", generator=gen, dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(1, hkv, length, head_dim, device="cuda", generator=gen, dtype=torch.bfloat16)
        for block_size, fraction in itertools.product(block_sizes, fractions):
            query_rows = decode_target_rows(length, 0.25, fraction, q.device)
            flops = 2 * 2 * head_dim * hq * float((query_rows + 1).sum())
            for target in ("max", "mass"):
                row = {"shape": name, "S": length, "Hq": hq, "Hkv": hkv, "D": head_dim, "block_size": block_size}
                row.update(fraction=fraction, target=target, rows=query_rows.numel(), gflop=flops / 1e9)
                results = {}
                for backend in ("reference", "triton_per_head", "triton"):
                    if backend == "reference" and (fraction == 1.0 and length > 16384 or block_size != 64):
                        continue  # minutes of fp32 scores; the 0.25 row at block 64 shows the ratio
                    call = functools.partial(
                        decode_block_ground_truth, q, k, block_size=block_size, query_rows=query_rows, target=target,
                        backend=backend,
                    )  # fmt: skip
                    results[backend], row[f"mb_{backend}"] = peak_mb(call)
                    row[f"ms_{backend}"] = cuda_ms(call, repeats=3 if backend == "reference" else 10)
                row["tflops_triton"] = flops / row["ms_triton"] / 1e9
                row["tflops_triton_per_head"] = flops / row["ms_triton_per_head"] / 1e9
                row["per_head_max_abs_diff"] = float((results["triton_per_head"] - results["triton"]).abs().max())
                if "reference" in results:
                    row["max_abs_diff"] = float((results["triton"] - results["reference"]).abs().max())
                    row["speedup"] = row["ms_reference"] / row["ms_triton"]
                del results
                rows.append(row)
                print(json.dumps(row), flush=True)
        del q, k
        torch.cuda.empty_cache()
    return rows


def time_step(model, ids: torch.Tensor, repeats: int, **loss_kwargs) -> float:
    """Median seconds of one distillation step (forward with the targets, gate backward), after one warm-up."""
    times = []
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        started = time.perf_counter()
        loss, _ = distillation_loss(model, ids, **loss_kwargs)
        loss.backward()
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    return sorted(times)[len(times) // 2]


def step_rows(length: int, fractions: list[float], repeats: int) -> list[dict]:
    config = Qwen2Config(**QWEN_05B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    model = get_seer_model(base, SeerAttentionConfig(decode_gate=True))
    ids = torch.randint(0, config.vocab_size, (1, length), device="cuda")
    # the prefill gates alone: the floor the decode target adds to
    variants = [(0.0, "none (prefill gates only)")]
    backends = ("reference", "triton_per_head", "triton")
    variants += [(fraction, backend) for fraction in fractions for backend in backends]
    rows = []
    original = distill.decode_block_ground_truth
    try:
        for fraction, backend in variants:
            if fraction:
                distill.decode_block_ground_truth = functools.partial(original, backend=backend)
                seconds = time_step(model, ids, repeats, decode_token_fraction=fraction)
            else:
                seconds = time_step(model, ids, repeats, decode_loss_weight=0.0)
            row = {"shape": "qwen0.5b_model", "S": length, "fraction": fraction, "target_backend": backend}
            row.update(step_s=seconds, tokens_per_s=length / seconds)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        distill.decode_block_ground_truth = original
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[64], help="key-block sizes of the kernel rows")
    parser.add_argument("--step-length", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernels-only", action="store_true")
    parser.add_argument("--steps-only", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    rows = [] if args.steps_only else kernel_rows(args.fractions, args.block_sizes)
    steps = [] if args.kernels_only else step_rows(args.step_length, args.fractions, args.repeats)
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": getattr(sys.modules.get("triton"), "__version__", None),
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_decode_target_{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows, "steps": steps}, indent=2))
    print(f"\nwrote {path}")
    print(f"{'shape':<14} {'blk':>4} {'frac':>5} {'target':<5} {'rows':>6} {'GFLOP':>7} {'ref ms':>8} "
          f"{'per-head ms':>11} {'MB':>7} {'grouped ms':>10} {'MB':>7} {'x ref':>6} {'max diff':>9}")  # fmt: skip
    for r in rows:
        print(
            f"{r['shape']:<14} {r['block_size']:>4} {r['fraction']:>5} {r['target']:<5} {r['rows']:>6} "
            f"{r['gflop']:>7.1f} {r.get('ms_reference', float('nan')):>8.2f} {r['ms_triton_per_head']:>11.3f} "
            f"{r['mb_triton_per_head']:>7.0f} {r['ms_triton']:>10.3f} {r['mb_triton']:>7.0f} "
            f"{r.get('speedup', float('nan')):>6.1f} "
            f"{max(r.get('max_abs_diff', 0.0), r['per_head_max_abs_diff']):>9.2e}"
        )
    for r in steps:
        print(f"step S={r['S']} fraction {r['fraction']} target {r['target_backend']}: {r['step_s']:.3f} s "
              f"= {r['tokens_per_s']:.0f} tokens/s")  # fmt: skip


if __name__ == "__main__":
    main()
