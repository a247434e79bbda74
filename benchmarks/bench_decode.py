"""Sparse decode kernel (split-KV over selected blocks) against dense decoding (a script).

One decoding step of one layer, Llama-3.1-8B-shaped (Hq = 32, Hkv = 8, D = 128, bf16, block 64): ``q [B, Hq, D]``
against a KV cache of ``S`` slots, for batch {1, 16}, S {8k, 32k, 128k}, token budgets {2k, 4k, 8k}. Each budget
keeps the first block, the last (current) block and random other blocks per KV head (``budget / 64`` in all).

Kernels timed (median, `seer_adapter.benchmarking.time_ms`):

* ``seer_decode_triton``: `seer_adapter.kernels.sparse_decode_triton` (what `sparse_decode_attention` runs on CUDA)
  at each ``--block-sizes`` and ``--tile-slots`` (key slots per ``tl.dot`` tile; blocks smaller than a tile share
  one, ``--tile-slots`` equal to the block size is one block per tile); rows carry ``block_size`` and ``tile_slots``;
* ``sdpa_cudnn`` / ``sdpa_flash``: dense SDPA decoding (one query row, no mask) on the cuDNN / FlashAttention-2
  backends (``enable_gqa``; a backend that refuses the call is recorded as skipped, with the reason);
* ``flex_dense``: FlexAttention decoding, dense (skipped with the reason when unavailable).

Every kernel is timed twice: ``ms``, called from Python as a model would (host time per call counts when it
exceeds the GPU time), and ``ms_graph``, replayed from a CUDA graph captured around one call (the GPU time alone,
what a decode loop under CUDA graphs sees). ``speedup_vs_dense`` / ``speedup_vs_dense_graph`` compare each with
the fastest dense SDPA timed the same way.

Before timing, the Triton kernel is checked against the PyTorch reference on the same lists (``meta["checks"]``).

    python benchmarks/bench_decode.py                       # H200: the full grid
    python benchmarks/bench_decode.py --smoke               # CPU: tiny shapes, Triton interpreter, no timing claims

Writes ``benchmarks/results/bench_decode_<time>.json`` (``meta`` with ``gpu``; rows with ``kernel``, ``batch``,
``S``, ``budget``, ``ms``, ``speedup_vs_dense`` = fastest dense SDPA ms / ms) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:  # the Triton interpreter must be chosen before triton kernels are defined
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from seer_adapter.benchmarking import benchmark_meta, compare_outputs, parse_seq_len, time_ms  # noqa: E402
from seer_adapter.kernels import sparse_decode_attention  # noqa: E402
from seer_adapter.kernels.sparse_decode_triton import sparse_decode_triton  # noqa: E402


def random_lists(batch: int, hkv: int, n_blocks: int, keep: int, device: torch.device, seed: int):
    """Sorted block lists per KV head: block 0, the last block and ``keep - 2`` random others (``keep`` in all)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    keep = min(keep, n_blocks)
    noise = torch.rand(batch, hkv, n_blocks, generator=gen)
    noise[..., 0] = noise[..., -1] = 2.0  # forced: sink and current block
    chosen = noise.topk(keep, dim=-1).indices.sort(dim=-1).values
    counts = torch.full((batch, hkv), keep, dtype=torch.int32)
    return chosen.to(torch.int32).to(device), counts.to(device)


def dense_sdpa(q, k, v, backend_name: str):
    """A callable for dense SDPA decoding on one backend, or ``(None, reason)`` when the backend refuses."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION}[backend_name]
    q4 = q[:, :, None]  # [B, Hq, 1, D]

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)

    try:
        run()
    except RuntimeError as exc:
        return None, str(exc).splitlines()[0][:120]
    return run, ""


def graph_replay(fn):
    """``fn`` captured in a CUDA graph (after two warm-up calls on a side stream); returns the replay callable."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def flex_dense(q, k, v):
    try:
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        q4 = q[:, :, None]

        def run():
            return compiled(q4, k, v, enable_gqa=True)

        run()
    except Exception as exc:  # recorded as a skipped row, with the reason
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    return run, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--seq-lens", nargs="+", default=["8k", "32k", "128k"])
    parser.add_argument("--budgets", nargs="+", type=int, default=[2048, 4096, 8192])
    parser.add_argument("--hq", type=int, default=32)
    parser.add_argument("--hkv", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-sizes", nargs="+", type=int, default=[64], help="decode key-block sizes")
    parser.add_argument("--tile-slots", nargs="+", type=int, default=[64], help="key slots per tl.dot tile")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreter, fp16")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float16
        args.batches, args.seq_lens, args.budgets = [2], ["300"], [128]
        args.hq, args.hkv, args.head_dim, args.block_sizes, args.tile_slots = 8, 2, 32, [16, 32], [16, 64]
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    rows, checks = [], []
    for batch in args.batches:
        for seq in map(parse_seq_len, args.seq_lens):
            torch.manual_seed(0)
            q = torch.randn(batch, args.hq, args.head_dim, device=device, dtype=dtype)
            k = torch.randn(batch, args.hkv, seq, args.head_dim, device=device, dtype=dtype)
            v = torch.randn(batch, args.hkv, seq, args.head_dim, device=device, dtype=dtype)
            dense_ms, dense_graph_ms = {}, {}
            base = {"batch": batch, "S": seq, "hq": args.hq, "hkv": args.hkv, "head_dim": args.head_dim}
            if not args.smoke:
                for name in ("sdpa_cudnn", "sdpa_flash"):
                    fn, reason = dense_sdpa(q, k, v, name)
                    row = {"kernel": name, **base, "budget": seq}
                    if fn is None:
                        rows.append({**row, "status": "skipped", "reason": reason})
                        continue
                    dense_ms[name] = time_ms(fn, device)
                    dense_graph_ms[name] = time_ms(graph_replay(fn), device)
                    rows.append({**row, "status": "ok", "ms": dense_ms[name], "ms_graph": dense_graph_ms[name]})
                fn, reason = flex_dense(q, k, v)
                if fn is None:
                    rows.append({"kernel": "flex_dense", **base, "budget": seq, "status": "skipped", "reason": reason})
                else:
                    rows.append({"kernel": "flex_dense", **base, "budget": seq, "status": "ok",
                                 "ms": time_ms(fn, device)})  # fmt: skip
            best_dense = min(dense_ms.values()) if dense_ms else None
            best_dense_graph = min(dense_graph_ms.values()) if dense_graph_ms else None
            for block_size, tile_slots, budget in itertools.product(args.block_sizes, args.tile_slots, args.budgets):
                n_blocks = -(-seq // block_size)
                indices, counts = random_lists(batch, args.hkv, n_blocks, budget // block_size, device, budget)
                call = functools.partial(
                    sparse_decode_triton, q, k, v, indices, counts, block_size=block_size, tile_slots=tile_slots
                )
                reference = sparse_decode_attention(q, k, v, indices, counts, block_size=block_size,
                                                    backend="reference")  # fmt: skip
                name = f"B{batch} S{seq} budget{budget} block{block_size} tile{tile_slots}"
                checks.append(compare_outputs(name, call(), reference, atol=2e-2, rtol=2e-2))
                ms = time_ms(call, device) if not args.smoke else None
                ms_graph = time_ms(graph_replay(call), device) if not args.smoke else None
                rows.append({"kernel": "seer_decode_triton", **base, "budget": budget, "block_size": block_size,
                             "tile_slots": tile_slots, "status": "ok", "ms": ms, "ms_graph": ms_graph,
                             "density": float(counts.sum()) / (batch * args.hkv * n_blocks),
                             "speedup_vs_dense": best_dense / ms if best_dense and ms else None,
                             "speedup_vs_dense_graph": best_dense_graph / ms_graph if best_dense_graph and ms_graph
                             else None})  # fmt: skip
                print(rows[-1], checks[-1], flush=True)
    meta = benchmark_meta(device, script="benchmarks/bench_decode.py", dtype=str(dtype), block_sizes=args.block_sizes,
                          smoke=args.smoke, command="python " + " ".join(sys.argv))  # fmt: skip
    meta["checks"] = checks
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_smoke" if args.smoke else ""
    path = out / f"bench_decode{suffix}_{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {path}")
    print(f"{'kernel':<20} {'B':>3} {'S':>7} {'budget':>7} {'blk/tile':>8} {'ms':>9} {'x dense':>8} {'ms graph':>9} "
          f"{'x dense':>8}")  # fmt: skip
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['kernel']:<20} {r['batch']:>3} {r['S']:>7} {r['budget']:>7}  skipped: {r['reason'][:60]}")
            continue
        ms = f"{r['ms']:.4f}" if r["ms"] is not None else "-"
        speed = f"{r['speedup_vs_dense']:.2f}" if r.get("speedup_vs_dense") else "-"
        ms_graph = f"{r['ms_graph']:.4f}" if r.get("ms_graph") is not None else "-"
        speed_graph = f"{r['speedup_vs_dense_graph']:.2f}" if r.get("speedup_vs_dense_graph") else "-"
        tiles = f"{r['block_size']}/{r['tile_slots']}" if "block_size" in r else "-"
        print(f"{r['kernel']:<20} {r['batch']:>3} {r['S']:>7} {r['budget']:>7} {tiles:>8} {ms:>9} {speed:>8} "
              f"{ms_graph:>9} {speed_graph:>8}")  # fmt: skip
    if not all(c["passed"] for c in checks):
        raise SystemExit("the Triton decode kernel disagrees with the reference (see meta.checks)")


if __name__ == "__main__":
    main()
