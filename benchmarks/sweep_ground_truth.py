"""Time the ground-truth kernel under several launch configurations (a tuning script, not a test).

    python benchmarks/sweep_ground_truth.py --seq-lens 8192 32768

Each configuration is set through ``$SEER_ADAPTER_GT_CONFIG``; the output is checked against the default
configuration's before timing. Prints ms per configuration and writes ``results/sweep_ground_truth_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from seer_adapter.kernels.ground_truth import ENV_GT_CONFIG, attention_with_block_ground_truth_triton  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    configs = [""] + [
        f"block_m={m},block_n={n},warps={w},stages={s}"
        for m, n, w, s in itertools.product((64, 32), (64, 32), (4, 8), (2, 3, 4))
    ]
    rows = []
    for length in args.seq_lens:
        torch.manual_seed(0)
        q = torch.randn(1, 32, length, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 8, length, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 8, length, 128, device="cuda", dtype=torch.bfloat16)
        os.environ.pop(ENV_GT_CONFIG, None)
        want_out, want_map = attention_with_block_ground_truth_triton(q, k, v)
        for config in configs:
            os.environ[ENV_GT_CONFIG] = config
            try:
                out, block_map = attention_with_block_ground_truth_triton(q, k, v)
                ok = (out - want_out).abs().max().item() < 2e-2 and (block_map - want_map).abs().max().item() < 1e-4
                ms = triton.testing.do_bench(
                    lambda q=q, k=k, v=v: attention_with_block_ground_truth_triton(q, k, v),
                    warmup=10,
                    rep=40,
                    return_mode="median",
                )
                rows.append({"S": length, "config": config or "default", "ms": ms, "matches_default": ok})
            except Exception as exc:  # a configuration that does not compile or fit: record and go on
                rows.append({"S": length, "config": config, "error": f"{type(exc).__name__}: {exc}"[:200]})
            print(rows[-1], flush=True)
    os.environ.pop(ENV_GT_CONFIG, None)
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "shape": "B=1, Hq=32, Hkv=8, D=128, bf16, block 64",
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"sweep_ground_truth_{meta['date']}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("\nbest per length:")
    for length in args.seq_lens:
        good = [r for r in rows if r["S"] == length and r.get("matches_default")]
        for r in sorted(good, key=lambda r: r["ms"])[:5]:
            print(f"S={length} {r['config']:<45} {r['ms']:.3f} ms")


if __name__ == "__main__":
    main()
