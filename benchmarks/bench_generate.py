"""End-to-end decoding throughput: ``generate()`` with the sparse decode gate against dense decoding (a script).

A Llama-3.1-8B-shaped model with random bf16 weights (shapes are what matter for time, as in bench_e2e.py) wrapped
with ``decode_gate=True`` (untrained decode gates: selection cost does not depend on gate quality). The prompt
(``--context`` tokens) is prefilled **once** at batch 1 into a `SeerDynamicCache` (sparse prefill, to save time;
the K-compression cache is built there), repeated to ``--batch`` rows with ``batch_repeat_interleave``, and every
variant then runs ``model.generate(prompt, cache=..., max_new_tokens=N)`` from that cache (cropped back
after each run): greedy, exactly ``N`` new tokens per row, timed end to end around ``generate()``.

Variants: ``dense_stock`` (dense attention with transformers' own `DynamicLayer`, which concatenates the whole
layer cache at every step: what a user has without the adapter), ``dense`` (``decode_method="dense"``: the base
model's attention over the whole cache, SDPA, with the adapter's in-place `GrowableDynamicLayer`) and the decode
gate at each ``--budgets`` token budget; ``dense_flash`` is ``dense`` with SDPA restricted to its FlashAttention-2
backend (PyTorch's default pick on the H200, cuDNN, builds an execution plan on the host for every new KV length,
which is every decoding step). ``dense_graph`` and ``seer_graph`` decode with a `SeerStaticCache`: shape-static steps
captured once and replayed as a CUDA graph (`seer_adapter.cuda_graphs`), dense (the base model's SDPA over the
whole buffers with a padding mask), ``dense_splitkv_graph`` (the decode gate's pipeline with a budget covering the
whole cache: exact dense attention through the split-KV decode kernel, the fastest dense step a graph can replay
here) and with the decode gate at each budget. Speed-ups are against the fastest
dense variant.

    python benchmarks/bench_generate.py                          # H200: 64k context, batch 8, budgets 2k 4k
    python benchmarks/bench_generate.py --context 32768 --batch 16 --layers 8

Writes ``benchmarks/results/bench_generate_<time>.json`` (``meta`` with ``gpu``; rows with ``variant``,
``budget``, ``batch``, ``context``, ``new_tokens``, ``s``, ``tokens_per_s``, ``ms_per_step``,
``speedup_vs_dense``, ``peak_gib`` (the variant's peak allocated memory), ``cache_gib`` (KV, compressed keys,
RoPE tables), and ``gpu_ms_per_step`` / ``gpu_speedup_vs_dense``: the kernels' device time per step, what
a step would cost with the host out of the way) and prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_e2e import llama_8b_shaped  # noqa: E402
from transformers.cache_utils import DynamicLayer  # noqa: E402

from seer_adapter import SeerAttentionConfig, SeerDynamicCache, SeerStaticCache, get_seer_model  # noqa: E402
from seer_adapter.benchmarking import benchmark_meta  # noqa: E402
from seer_adapter.config import QUERY_MERGES  # noqa: E402
from seer_adapter.decode import GrowableDynamicLayer  # noqa: E402
from seer_adapter.evaluation import cache_argument  # noqa: E402


def timed_generate(model, prompt: torch.Tensor, cache: SeerDynamicCache, cache_name: str, new_tokens: int) -> float:
    """Seconds of one greedy ``generate()`` of exactly ``new_tokens`` tokens per row from ``cache``; crops back."""
    cached = cache.get_seq_length()
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        **{cache_name: cache},
    )
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if out.shape[1] != prompt.shape[1] + new_tokens:
        raise RuntimeError(f"generate() returned {out.shape[1] - prompt.shape[1]} tokens, expected {new_tokens}")
    cache.crop(cached - cache.get_seq_length())  # a negative count: every transformers 5.x release takes it
    return seconds


def gpu_ms_per_step(model, prompt: torch.Tensor, cache: SeerDynamicCache, cache_name: str, steps: int) -> float:
    """GPU busy time of one decoding step (ms): the kernels' summed device time over ``steps`` steps (torch profiler).

    Eager `generate()` at small batch is paced by the host; this is what a step would cost with the host out of the
    way (CUDA graphs), so the ratio of two variants' GPU times is the speed-up such a decode loop could show."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        timed_generate(model, prompt, cache, cache_name, steps)
    return sum(event.self_device_time_total for event in prof.key_averages()) / 1000 / steps


def cache_gib(cache: SeerDynamicCache) -> dict[str, float]:
    """GiB held by ``cache``: KV buffers, compressed keys (with their validity) and the slots' RoPE tables."""

    def gib(tensors) -> float:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
        return sum(storages.values()) / 2**30

    kv = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    kv += [getattr(layer, name, None) for layer in cache.layers for name in ("_key_buffer", "_value_buffer")]
    compressed = cache.seer_keys.values()
    return {
        "kv": gib(kv),
        "compressed_keys": gib(t for c in compressed for t in (c._keys, c._valid)),
        "rope_tables": gib(t for tables in cache.shared_rope_tables() for t in tables.buffers()),
    }


def use_layer_class(cache: SeerDynamicCache, layer_class: type) -> None:
    """Switch the KV layers of ``cache`` between transformers' `DynamicLayer` and `GrowableDynamicLayer`.

    Switching to `DynamicLayer` drops the spare-slot buffers (their views stay the layer's keys/values, which it
    concatenates away at the next append), so the switch costs no memory; `GrowableDynamicLayer` keeps or adopts them.
    """
    for layer in cache.layers:
        layer.__class__ = layer_class
        if layer_class is DynamicLayer:
            layer._key_buffer = layer._value_buffer = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=65536, help="prompt tokens already in the cache")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--budgets", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=32, help="layers of the 8B-shaped model (32 = full)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (the median is kept)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per variant (no JSON)")
    parser.add_argument(
        "--python-profile",
        action="store_true",
        help="print the Python functions taking the most host time (cProfile) per variant (no JSON): what the "
        "torch profiler cannot see (Triton's launcher, the adapter's own Python)",
    )
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph variants")
    parser.add_argument("--skip", nargs="*", default=[], help="variants to leave out (e.g. dense_stock dense_graph)")
    parser.add_argument(
        "--decode-block-size", type=int, default=16, help="the decode gate's key-block size (default 16)"
    )
    parser.add_argument(
        "--decode-gate-queries", type=int, default=1, help="gate queries per KV head (a divisor of the group, 4)"
    )
    parser.add_argument(
        "--decode-gate-query-merge", choices=QUERY_MERGES, default="mixture", help="merge of the queries"
    )
    parser.add_argument(
        "--gate-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="the gates' dtype, hence the compressed keys' (bfloat16 halves what the decode-gate scores read)",
    )
    parser.add_argument(
        "--decode-key-dtype",
        choices=["bfloat16", "float16"],
        default=None,
        help="store the compressed keys in this dtype with the gates in --gate-dtype (decode_key_dtype)",
    )
    parser.add_argument(
        "--layer-overrides",
        type=json.loads,
        default={},
        help="per-layer decode settings of the seer variants as JSON (SeerAttentionConfig.layer_overrides), e.g. "
        '\'{"3": {"decode_token_budget": 4096}}\' with --budgets 1664: uneven budgets of the same mean',
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    device = torch.device("cuda")
    base = llama_8b_shaped(args.layers, device)
    config = base.config
    seer_config = SeerAttentionConfig(
        sparsity_method="nz_ratio",
        nz_ratio=0.1,
        decode_gate=True,
        decode_method="dense",
        decode_block_size=args.decode_block_size,
        decode_gate_queries=args.decode_gate_queries,
        decode_gate_query_merge=args.decode_gate_query_merge,
        gate_dtype=args.gate_dtype,
        decode_key_dtype=args.decode_key_dtype,
    )
    model = get_seer_model(base, seer_config)
    cache_name = cache_argument(base)
    ids = torch.randint(0, config.vocab_size, (1, args.context + 1), device=device)
    block_size = model.peft_config["default"].block_size
    # One cache for every variant, of the capacity the longest run needs; its class picks eager (dynamic) or static
    # decoding steps per variant.
    capacity = args.context + 1 + max(args.new_tokens, 2 * block_size) + block_size
    cache = SeerStaticCache(config=base.config, max_cache_len=capacity)
    started = time.perf_counter()
    with torch.no_grad():
        base(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1, **{cache_name: cache})
    torch.cuda.synchronize()
    print(f"prefill {args.context} tokens: {time.perf_counter() - started:.1f} s", flush=True)
    cache.batch_repeat_interleave(args.batch)
    prompt = ids.expand(args.batch, -1).contiguous()  # [B, context + 1]: the last token is decoded first
    print(f"cache for batch {args.batch}: {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated", flush=True)
    print("cache GiB:", {name: round(gib, 2) for name, gib in cache_gib(cache).items()}, flush=True)

    variants = [("dense_stock", None), ("dense", None), ("dense_flash", None)]
    variants += [("seer_decode", b) for b in args.budgets]
    if not args.no_graph:
        variants += [("dense_graph", None), ("dense_splitkv_graph", capacity)]
        variants += [("seer_graph", b) for b in args.budgets]
    variants = [(variant, budget) for variant, budget in variants if variant not in args.skip]
    rows = []
    for variant, budget in variants:
        cache.__class__ = SeerStaticCache if variant.endswith("_graph") else SeerDynamicCache
        captures_before = getattr(cache.graph_runner, "captures", 0)

        def sdpa(flash_only: bool = variant == "dense_flash"):  # a fresh context manager per use
            return sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if flash_only else contextlib.nullcontext()

        use_layer_class(cache, DynamicLayer if variant == "dense_stock" else GrowableDynamicLayer)
        overrides = args.layer_overrides if variant.startswith("seer") else {}
        if budget is None:
            model.set_sparsity(decode_method="dense", layer_overrides=overrides)
        else:
            model.set_sparsity(decode_method="token_budget", decode_token_budget=budget, layer_overrides=overrides)
        torch.cuda.reset_peak_memory_stats()
        with sdpa():
            # warm-up past a block boundary: a completing block compiles the pooling kernels (Triton, allocator)
            timed_generate(model, prompt, cache, cache_name, 2 * block_size)
        if args.python_profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            with sdpa():
                profiler.enable()
                timed_generate(model, prompt, cache, cache_name, args.new_tokens)
                profiler.disable()
            print(f"=== {variant} {budget}: host time by Python function, {args.new_tokens} steps", flush=True)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
            continue
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with sdpa(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                timed_generate(model, prompt, cache, cache_name, 8)
            print(f"=== {variant} {budget}: by device time", flush=True)
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=60))
            print(f"=== {variant} {budget}: by CPU time", flush=True)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60))
            continue
        with sdpa():
            seconds = sorted(
                timed_generate(model, prompt, cache, cache_name, args.new_tokens) for _ in range(args.repeats)
            )
        s = seconds[len(seconds) // 2]
        with sdpa():
            gpu_ms = gpu_ms_per_step(model, prompt, cache, cache_name, 16)
        density = None
        if budget is not None:
            stats = [r for r in model.sparsity_stats() if r.get("phase") == "decode"]
            density = sum(r["density"] for r in stats) / len(stats) if stats else None
        rows.append(
            {
                "variant": variant,
                "budget": budget,
                "layer_overrides": overrides,
                "batch": args.batch,
                "context": args.context,
                "new_tokens": args.new_tokens,
                "s": s,
                "tokens_per_s": args.batch * args.new_tokens / s,
                "ms_per_step": 1000 * s / args.new_tokens,
                "gpu_ms_per_step": gpu_ms,
                "decode_density": density,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                "cache_gib": cache_gib(cache),
            }
        )
        if variant.endswith("_graph"):
            rows[-1]["graph_captures"] = cache.graph_runner.captures - captures_before
        print(rows[-1], flush=True)
    if args.profile or args.python_profile:
        return
    dense_s = min(row["s"] for row in rows if row["variant"].startswith("dense"))
    dense_gpu_ms = min(row["gpu_ms_per_step"] for row in rows if row["variant"].startswith("dense"))
    for row in rows:
        row["speedup_vs_dense"] = dense_s / row["s"]
        row["gpu_speedup_vs_dense"] = dense_gpu_ms / row["gpu_ms_per_step"]
    meta = benchmark_meta(
        device,
        script="benchmarks/bench_generate.py",
        model=f"Llama-3.1-8B-shaped, random bf16 weights, {args.layers} layers, untrained decode gates",
        prefill="sparse nz_ratio 0.1 at batch 1, cache repeated to the batch",
        decode_block_size=seer_config.effective_decode_block_size,
        decode_gate_queries=seer_config.decode_gate_queries,
        decode_gate_query_merge=seer_config.decode_gate_query_merge,
        gate_dtype=seer_config.gate_dtype,
        decode_key_dtype=seer_config.decode_key_dtype,
        command="python " + " ".join(sys.argv),
        peak_gib=max(row["peak_gib"] for row in rows),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_generate_{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {path}")
    print(
        f"{'variant':<12} {'budget':>7} {'B':>3} {'context':>8} {'ms/step':>8} {'tok/s':>8} {'x dense':>8} "
        f"{'GPU ms':>7} {'GPU x':>6}"
    )
    for r in rows:
        print(
            f"{r['variant']:<12} {r['budget'] or '-':>7} {r['batch']:>3} {r['context']:>8} {r['ms_per_step']:>8.2f} "
            f"{r['tokens_per_s']:>8.1f} {r['speedup_vs_dense']:>8.2f} {r['gpu_ms_per_step']:>7.2f} "
            f"{r['gpu_speedup_vs_dense']:>6.2f}"
        )


if __name__ == "__main__":
    main()
