"""Block selection, gate scores -> kept-block lists: PyTorch path against the fused Triton kernel (a script).

Per layer of a Llama-3.1-8B-shaped model (Hq = 32, block 64): scores ``[1, 32, S/64, S/64]`` fp32. The PyTorch path
is what the sparse prefill ran before the fused kernel: softmax, `masks.select_blocks` (top-k or threshold) to a
boolean mask, then `block_mask_to_indices` (no host sync). Both results are checked to be the same lists.

    python benchmarks/bench_select.py --seq-lens 8k 32k 128k

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
from seer_adapter.kernels.block_lists import block_mask_to_indices, causal_block_allowed  # noqa: E402
from seer_adapter.kernels.block_select_triton import select_block_lists_triton  # noqa: E402
from seer_adapter.masks import select_blocks  # noqa: E402


def parse_seq_len(text: str) -> int:
    return int(text[:-1]) * 1024 if text.lower().endswith("k") else int(text)


def torch_path(logits, allowed, method, params, block_size, seq):
    probs = gate_probabilities(logits)
    keep = select_blocks(probs, allowed, method=method, block_size=block_size, **params,
                         sink_block=torch.zeros(1, dtype=torch.long, device=logits.device))  # fmt: skip
    return block_mask_to_indices(keep, block_size=block_size, q_len=seq, kv_len=seq, compact=False)


def fused_path(logits, method, params, block_size, seq):
    lists, _ = select_block_lists_triton(
        logits, method=method, block_size=block_size, q_len=seq, kv_len=seq,
        sink_block=torch.zeros(1, dtype=torch.long, device=logits.device), **params,
    )  # fmt: skip
    return lists


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", nargs="+", default=["8k", "32k", "128k"])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    device = torch.device("cuda")
    settings = [("nz_ratio", {"nz_ratio": 0.1}), ("nz_ratio", {"nz_ratio": 0.5}), ("threshold", {"threshold": 2e-3})]
    rows = []
    for seq in map(parse_seq_len, args.seq_lens):
        n_blocks = seq // args.block_size
        torch.manual_seed(0)
        allowed = causal_block_allowed(n_blocks, n_blocks, block_size=args.block_size, q_len=seq, kv_len=seq,
                                       device=device)  # fmt: skip
        logits = (torch.randn(1, args.heads, n_blocks, n_blocks, device=device) * 2).masked_fill(~allowed, -torch.inf)
        for method, params in settings:
            ref_idx, ref_cnt = torch_path(logits, allowed, method, params, args.block_size, seq)
            lists = fused_path(logits, method, params, args.block_size, seq)
            # Rows whose lists differ (ties at the k-th probability, or probabilities within an ulp of the threshold).
            width = lists.indices.shape[-1]
            real = torch.arange(width, device=device) < lists.counts[..., None]
            differs = (ref_cnt != lists.counts) | (
                torch.where(real, lists.indices, -1) != torch.where(real, ref_idx[..., :width], -1)
            ).any(-1)
            torch_ms = triton.testing.do_bench(
                functools.partial(torch_path, logits, allowed, method, params, args.block_size, seq)
            )
            fused_ms = triton.testing.do_bench(
                functools.partial(fused_path, logits, method, params, args.block_size, seq)
            )
            row = {"S": seq, "heads": args.heads, "method": method, **params, "torch_ms": torch_ms,
                   "fused_ms": fused_ms, "speedup": torch_ms / fused_ms, "same_lists": not bool(differs.any()),
                   "rows_differing": int(differs.sum()), "rows": differs.numel(),
                   "density": float(lists.counts.sum() / allowed.sum() / args.heads)}  # fmt: skip
            rows.append(row)
            print(row, flush=True)
            del ref_idx, ref_cnt, lists
            torch.cuda.empty_cache()
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
    print(f"\nwrote {path}\n{'S':>7} {'method':<10} {'param':>7} {'density':>8} {'torch ms':>9} {'fused ms':>9} "
          f"{'x':>6} rows differing")  # fmt: skip
    for r in rows:
        param = r.get("nz_ratio", r.get("threshold"))
        print(f"{r['S']:>7} {r['method']:<10} {param:>7} {r['density']:>8.3f} {r['torch_ms']:>9.3f} "
              f"{r['fused_ms']:>9.3f} {r['speedup']:>6.1f} {r['rows_differing']}/{r['rows']}")  # fmt: skip


if __name__ == "__main__":
    main()
