"""End-to-end prefill time: a wrapped model against the same model dense (a script, not a test).

Default: a Llama-3.1-8B-shaped model with random bf16 weights (shapes are what matter for time; ANCHORS.md
measured the dense baseline the same way), one sequence, ``logits_to_keep=1``, no cache. Sparse runs use
untrained gates at ``nz_ratio`` (the density is what the kernel sees; gate quality does not change time).

    python benchmarks/bench_e2e.py --lengths 32768 131072 --nz-ratios 0.1 0.3

Writes ``benchmarks/results/e2e_prefill_<date>.json`` and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import seer_adapter.attention as seer_attention  # noqa: E402
from seer_adapter import SeerAttentionConfig, get_seer_model  # noqa: E402
from seer_adapter.distill import distillation_loss  # noqa: E402
from seer_adapter.kernels import select_backend  # noqa: E402

LLAMA_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
)


def llama_8b_shaped(layers: int = 32, device: torch.device | str = "cuda") -> torch.nn.Module:
    """A Llama-3.1-8B-shaped causal LM with random bf16 weights (``layers`` of them), built on ``device``, eval mode."""
    config = LlamaConfig(**{**LLAMA_8B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()


def time_prefill(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    """Median seconds of one prefill forward (after one warm-up); waits for every GPU (device-mapped models)."""

    def synchronize_all() -> None:
        for gpu in range(torch.cuda.device_count()):
            torch.cuda.synchronize(gpu)

    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            synchronize_all()
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            synchronize_all()
            if i:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


STAGES = {"gate": "compute_gate_logits", "mask": "select_block_lists", "attention": "block_sparse_attention"}


def stage_breakdown(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """GPU seconds spent in each stage of the sparse path during one prefill (CUDA events around every call).

    Events are recorded on the stream around the calls of `seer_adapter.attention`'s three stages (gate logits,
    block selection, attention kernel), without synchronising inside the forward; their sums are read at the end.
    """
    pairs: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {stage: [] for stage in STAGES}
    originals = {stage: getattr(seer_attention, name) for stage, name in STAGES.items()}

    def timed(stage, fn):
        def wrapper(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn(*args, **kwargs)
            end.record()
            pairs[stage].append((start, end))
            return result

        return wrapper

    for stage, name in STAGES.items():
        setattr(seer_attention, name, timed(stage, originals[stage]))
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        total = time.perf_counter() - start
    finally:
        for stage, name in STAGES.items():
            setattr(seer_attention, name, originals[stage])
    seconds = {stage: sum(a.elapsed_time(b) for a, b in events) / 1e3 for stage, events in pairs.items()}
    seconds["rest of the model"] = total - sum(seconds.values())
    seconds["total"] = total
    return seconds


def time_distillation_step(model, ids: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds of one distillation step (forward with ground truth + gate backward) and peak GiB."""
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _ = distillation_loss(model, ids)
        loss.backward()
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768])
    parser.add_argument("--nz-ratios", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--layers", type=int, default=32, help="layers of the 8B-shaped model (32 = full)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--distill", action="store_true", help="also time one distillation step per length")
    parser.add_argument("--breakdown", action="store_true", help="also measure the gate / mask / attention shares")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    device = torch.device("cuda")
    base = llama_8b_shaped(args.layers, device)
    config = base.config
    rows = []
    for length in args.lengths:
        ids = torch.randint(0, config.vocab_size, (1, length), device=device)
        dense_s = time_prefill(base, ids, args.repeats)
        rows.append({"S": length, "variant": "dense sdpa (cuDNN)", "nz_ratio": 1.0, "density": 1.0, "s": dense_s})
        print(f"S={length}: dense {dense_s:.3f} s", flush=True)
        model = get_seer_model(base, SeerAttentionConfig(sparsity_method="nz_ratio", nz_ratio=0.5))
        for nz in args.nz_ratios:
            model.set_sparsity(nz_ratio=nz)
            sparse_s = time_prefill(model, ids, args.repeats)
            stats = model.sparsity_stats()
            density = sum(s.get("density", 1.0) for s in stats) / len(stats)
            rows.append(
                {
                    "S": length,
                    "variant": "seer",
                    "nz_ratio": nz,
                    "density": density,
                    "s": sparse_s,
                    "speedup_vs_dense": dense_s / sparse_s,
                }
            )
            print(
                f"S={length}: seer nz_ratio={nz} density={density:.3f} {sparse_s:.3f} s ({dense_s / sparse_s:.2f}x)",
                flush=True,
            )
            if args.breakdown:
                shares = stage_breakdown(model, ids)
                rows[-1]["stage_seconds"] = shares
                rows[-1]["stage_share"] = {k: v / shares["total"] for k, v in shares.items() if k != "total"}
                print(
                    "    "
                    + ", ".join(
                        f"{k} {v:.3f} s ({v / shares['total']:.1%})" for k, v in shares.items() if k != "total"
                    ),
                    flush=True,
                )
        if args.distill:
            step_s, peak = time_distillation_step(model, ids, args.repeats)
            rows.append(
                {
                    "S": length,
                    "variant": "distillation step",
                    "nz_ratio": None,
                    "density": 1.0,
                    "s": step_s,
                    "tokens_per_s": length / step_s,
                    "peak_gib": peak,
                    "speedup_vs_dense": dense_s / step_s,
                }
            )
            print(
                f"S={length}: distillation step {step_s:.3f} s = {length / step_s:.0f} tokens/s, peak {peak:.1f} GiB",
                flush=True,
            )
        model.unload()
        del ids
        torch.cuda.empty_cache()

    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": getattr(sys.modules.get("triton"), "__version__", None),
        "kernel_backend": select_backend(device),
        "model": f"Llama-3.1-8B-shaped, random bf16 weights, {args.layers} layers",
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"e2e_prefill_{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {path}\n{'S':>7} {'variant':<20} {'nz':>5} {'density':>8} {'s':>8} {'x dense':>8}")
    for r in rows:
        print(
            f"{r['S']:>7} {r['variant']:<20} {r['nz_ratio']!s:>5} {r['density']:>8.3f} {r['s']:>8.3f} "
            f"{r.get('speedup_vs_dense', 1.0):>8.2f}"
        )


if __name__ == "__main__":
    main()
