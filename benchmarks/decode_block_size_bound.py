"""Does a finer block lower the selection bound of sparse decoding at a fixed token budget? (a script, not a test)

Sparse decoding selects whole key blocks per KV head under a token budget; at a budget of an eighth or a quarter of
the context even a selection from the true attention (the ``oracle`` decode selector: the gate's distillation
target, or ``oracle_mass``: the blocks with the most attention mass) costs perplexity. This script decodes the same
held-out windows with those selectors at several block sizes (same token budget, so more and smaller blocks), no
trained gate needed, and writes one JSON with a row per (block size, selector, budget).

    python benchmarks/decode_block_size_bound.py --model qwen2.5-coder-0.5b --prompt 7936 --tokens 64 \
        --windows 2 --block-sizes 16 32 64 --budgets 2048
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distill_eval import MODELS, heldout_token_ids, model_setup, result_file_tags  # noqa: E402

from seer_adapter import SeerAttentionConfig, get_seer_model  # noqa: E402
from seer_adapter.evaluation import environment_meta, evaluate_decode, format_decode_table, write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", choices=sorted(MODELS))
    parser.add_argument("--prompt", type=int, default=7936)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--budgets", type=int, nargs="+", default=[2048])
    parser.add_argument("--selectors", nargs="+", default=["oracle", "oracle_mass"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    spec = MODELS[args.model]
    path, tokenizer, device, dtype = model_setup(args.model)
    token_ids = heldout_token_ids(tokenizer)
    rows = []
    started = time.perf_counter()
    for block_size in args.block_sizes:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        model = get_seer_model(base, SeerAttentionConfig(block_size=block_size, decode_gate=True))
        results = evaluate_decode(
            model, token_ids, args.prompt, args.tokens, max_windows=args.windows, budgets=tuple(args.budgets),
            greedy_tokens=0, selectors=tuple(args.selectors), progress=False,
        )  # fmt: skip
        for row in results:
            row["block_size"] = block_size
        rows += results
        print(f"block {block_size}:\n{format_decode_table(results)}", flush=True)
        del model, base
    meta = environment_meta(
        device,
        model=f"{spec.hf_name} ({spec.gguf_name}, dequantised)",
        data=f"held-out works, {args.windows} windows: prompt {args.prompt} (dense prefill) + {args.tokens} tokens "
        "decoded token by token",
        dtype=str(dtype),
        command="python " + " ".join(sys.argv),
        seconds=time.perf_counter() - started,
    )
    tag, stamp = result_file_tags(device)
    file = Path(args.out) / f"decode_block_size_bound_{args.model}_{tag}_{args.prompt}_{stamp}.json"
    print(f"wrote {write_results(file, meta, rows)}")
    print(f"{'block':>5} {'selector':<12} {'budget':>6} {'density':>8} {'ppl':>9} {'Δ%':>7} {'top1%':>6}")
    for r in rows:
        print(
            f"{r['block_size']:>5} {r['selector']:<12} {r.get('token_budget', '-')!s:>6} {r['decode_density']:>8.3f} "
            f"{r['ppl']:>9.3f} {r['ppl_delta_pct']:>+7.2f} {r['top1_agreement']:>6.1f}"
        )


if __name__ == "__main__":
    main()
