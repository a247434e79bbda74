"""Block selection, gate scores -> kept-block lists: PyTorch path against the fused Triton kernel (a script).

Per layer of a Llama-3.1-8B-shaped model (Hq = 32, block 64): scores ``[1, 32, S/64, S/64]`` fp32. The PyTorch path
is what the sparse prefill ran before the fused kernel: softmax, `masks.select_blocks` (top-k or threshold) to a
boolean mask, then `block_mask_to_indices` (no host sync). Both results are checked to be the same lists.

    python benchmarks/bench_select.py --seq-lens 8k 32k 128k
    python benchmarks/bench_select.py --decode --seq-lens 8k 64k 128k   # one decoding step's selection

``early_exit_ms``: the top-k methods again with the bisection stopped at the first exact count
(`block_select_triton.EARLY_EXIT_SEARCH`, off by default until this benchmark shows it faster), with a check that the
lists are the same. ``--decode`` times a decoding step's selection instead: scores ``[B, Hkv, 1, S/16 + 1]``
(batch 8, 8 KV heads, 16-token blocks, budget 2k), one row per sequence and KV head, the current block last.

Writes ``benchmarks/results/bench_select_<time>.json`` and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from seer_adapter.attention import gate_probabilities  # noqa: E402
from seer_adapter.kernels import block_select_triton  # noqa: E402
from seer_adapter.kernels.block_lists import block_mask_to_indices, causal_block_allowed  # noqa: E402
from seer_adapter.kernels.block_select_triton import select_block_lists_triton  # noqa: E402
from seer_adapter.masks import select_blocks  # noqa: E402


def parse_seq_len(text: str) -> int:
    return int(text[:-1]) * 1024 if text.lower().endswith("k") else int(text)


def torch_path(logits, allowed, method, params, block_size, q_len, kv_len):
    probs = gate_probabilities(logits)
    keep = select_blocks(probs, allowed, method=method, block_size=block_size, **params,
                         sink_block=torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))  # fmt: skip
    return block_mask_to_indices(keep, block_size=block_size, q_len=q_len, kv_len=kv_len, compact=False)


def fused_path(logits, method, params, block_size, q_len, kv_len):
    lists, _ = select_block_lists_triton(
        logits, method=method, block_size=block_size, q_len=q_len, kv_len=kv_len,
        sink_block=torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device), **params,
    )  # fmt: skip
    return lists


def lists_differ(lists, ref_idx: torch.Tensor, ref_cnt: torch.Tensor) -> torch.Tensor:
    """Rows whose lists differ (ties at the k-th probability, or probabilities within an ulp of the threshold)."""
    width = lists.indices.shape[-1]
    real = torch.arange(width, device=lists.counts.device) < lists.counts[..., None]
    return (ref_cnt != lists.counts) | (
        torch.where(real, lists.indices, -1) != torch.where(real, ref_idx[..., :width], -1)
    ).any(-1)


def early_exit_timing(fused, full_lists) -> dict:
    """``fused`` timed with the top-k bisection stopped at the first exact count (`EARLY_EXIT_SEARCH`), and whether
    its lists equal the full bisection's ``full_lists``."""
    saved = block_select_triton.EARLY_EXIT_SEARCH
    block_select_triton.EARLY_EXIT_SEARCH = True
    try:
        lists = fused()  # compiles this variant outside the timing
        ms = triton.testing.do_bench(fused)
    finally:
        block_select_triton.EARLY_EXIT_SEARCH = saved
    same = not bool(lists_differ(lists, full_lists.indices, full_lists.counts).any())
    return {"early_exit_ms": ms, "early_exit_same_lists": same}


def bench_decode(args, device) -> list[dict]:
    """One decoding step's selection per context: [B, Hkv, 1, n_blocks] scores, the current block last."""
    rows = []
    block, batch, heads, budget = 16, 8, 8, 2048
    params = {"token_budget": budget}
    for seq in map(parse_seq_len, args.seq_lens):
        n_blocks = seq // block + 1
        kv_len = n_blocks * block
        torch.manual_seed(0)
        allowed = causal_block_allowed(1, n_blocks, block_size=block, q_len=1, kv_len=kv_len, device=device)
        logits = (torch.randn(batch, heads, 1, n_blocks, device=device) * 2).masked_fill(~allowed, -torch.inf)
        ref_idx, ref_cnt = torch_path(logits, allowed, "token_budget", params, block, 1, kv_len)
        fused = functools.partial(fused_path, logits, "token_budget", params, block, 1, kv_len)
        full_lists = fused()
        differs = lists_differ(full_lists, ref_idx, ref_cnt)
        torch_ms = triton.testing.do_bench(
            functools.partial(torch_path, logits, allowed, "token_budget", params, block, 1, kv_len)
        )
        fused_ms = triton.testing.do_bench(fused)
        row = {"mode": "decode", "S": seq, "batch": batch, "kv_heads": heads, "block_size": block, "budget": budget,
               "torch_ms": torch_ms, "fused_ms": fused_ms, "speedup": torch_ms / fused_ms,
               "rows_differing": int(differs.sum()), "rows": differs.numel(),
               **early_exit_timing(fused, full_lists)}  # fmt: skip
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", nargs="+", default=["8k", "32k", "128k"])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--decode", action="store_true", help="time a decoding step's selection instead")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    device = torch.device("cuda")
    if args.decode:
        write(args, bench_decode(args, device))
        return
    settings = [("nz_ratio", {"nz_ratio": 0.1}), ("nz_ratio", {"nz_ratio": 0.5}), ("threshold", {"threshold": 2e-3})]
    rows = []
    for seq in map(parse_seq_len, args.seq_lens):
        n_blocks = seq // args.block_size
        torch.manual_seed(0)
        allowed = causal_block_allowed(n_blocks, n_blocks, block_size=args.block_size, q_len=seq, kv_len=seq,
                                       device=device)  # fmt: skip
        logits = (torch.randn(1, args.heads, n_blocks, n_blocks, device=device) * 2).masked_fill(~allowed, -torch.inf)
        for method, params in settings:
            ref_idx, ref_cnt = torch_path(logits, allowed, method, params, args.block_size, seq, seq)
            lists = fused_path(logits, method, params, args.block_size, seq, seq)
            differs = lists_differ(lists, ref_idx, ref_cnt)
            torch_ms = triton.testing.do_bench(
                functools.partial(torch_path, logits, allowed, method, params, args.block_size, seq, seq)
            )
            fused = functools.partial(fused_path, logits, method, params, args.block_size, seq, seq)
            fused_ms = triton.testing.do_bench(fused)
            early = early_exit_timing(fused, lists) if method != "threshold" else {}
            row = {"mode": "prefill", "S": seq, "heads": args.heads, "method": method, **params, "torch_ms": torch_ms,
                   "fused_ms": fused_ms, "speedup": torch_ms / fused_ms,
                   "same_lists": not bool(differs.any()),
                   "rows_differing": int(differs.sum()), "rows": differs.numel(),
                   "density": float(lists.counts.sum() / allowed.sum() / args.heads), **early}  # fmt: skip
            rows.append(row)
            print(row, flush=True)
            del ref_idx, ref_cnt, lists
            torch.cuda.empty_cache()
    write(args, rows)


def write(args, rows: list[dict]) -> None:
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_select_{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {path}")
    if args.decode:
        print(f"{'S':>7} {'torch ms':>9} {'fused ms':>9} {'x':>6} rows differing  early exit ms (same)")
        for r in rows:
            early = f"{r['early_exit_ms']:.4f} ({r['early_exit_same_lists']})"
            print(f"{r['S']:>7} {r['torch_ms']:>9.4f} {r['fused_ms']:>9.4f} {r['speedup']:>6.1f} "
                  f"{r['rows_differing']}/{r['rows']}  {early}")  # fmt: skip
        return
    print(
        f"{'S':>7} {'method':<10} {'param':>7} {'density':>8} {'torch ms':>9} {'fused ms':>9} {'x':>6} rows differing"
        "  early exit ms (same)"
    )
    for r in rows:
        param = r.get("nz_ratio", r.get("threshold"))
        early = f"  {r['early_exit_ms']:.3f} ({r['early_exit_same_lists']})" if "early_exit_ms" in r else ""
        print(f"{r['S']:>7} {r['method']:<10} {param:>7} {r['density']:>8.3f} {r['torch_ms']:>9.3f} "
              f"{r['fused_ms']:>9.3f} {r['speedup']:>6.1f} {r['rows_differing']}/{r['rows']}"
              + early)  # fmt: skip


if __name__ == "__main__":
    main()
