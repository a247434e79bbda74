"""Which layers' decode selection costs the perplexity? (a script, not a test)

Sparse decoding at a token budget costs perplexity against dense decoding; this script splits that cost by layer.
With trained decode gates it decodes the same held-out windows (dense prefill, then the continuation token by token,
teacher-forced) once densely, once with every layer sparse at ``--budget``, and then once per layer with that one
layer given more (``layer_overrides``: dense decoding by default, or ``--layer-budget`` tokens). A layer's
*recovered* share is how much of the all-sparse perplexity gap its override gives back. Finally the ``--fix-top``
costliest layers are overridden together, the configuration a user would write into ``layer_overrides``, with its
attended fraction of the context (the dense layers count whole).

    python benchmarks/decode_layer_sensitivity.py --model smollm2 --adapter /tmp/gates --prompt 960 --tokens 64 \
        --windows 4 --budget 256 --fix-top 1 2 4
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

from seer_adapter import SeerModel  # noqa: E402
from seer_adapter.evaluation import (  # noqa: E402
    DECODE_SELECTORS,
    decode_layer_sensitivity,
    environment_meta,
    format_layer_sensitivity_table,
    write_results,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    parser.add_argument("--adapter", required=True, help="gates with a decode gate (distill_eval.py --adapter-out)")
    parser.add_argument("--prompt", type=int, default=960)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument(
        "--first-window", type=int, default=0, help="skip this many windows (validate a choice on other windows)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="windows decoded together")
    parser.add_argument("--budget", type=int, default=256, help="decode token budget of every sparse layer")
    parser.add_argument(
        "--layer-budget", type=int, default=None, help="the one layer's budget (default: that layer decodes dense)"
    )
    parser.add_argument("--selector", default="gate", choices=DECODE_SELECTORS, help="who scores the blocks")
    parser.add_argument("--fix-top", type=int, nargs="*", default=[1, 2, 4], help="override the k costliest layers")
    parser.add_argument(
        "--override-sets",
        nargs="*",
        default=None,
        help="instead of the per-layer sweep, evaluate these comma-separated layer sets (e.g. 20,23 20,23,19,24), "
        "chosen on other windows",
    )
    parser.add_argument(
        "--uniform-budgets",
        type=int,
        nargs="*",
        default=[],
        help="every layer sparse at these budgets too: the uniform budgets to compare the overrides with at an equal "
        "attended fraction",
    )
    parser.add_argument(
        "--keep-average",
        action="store_true",
        help="lower every other layer's budget so the chosen sets keep the mean per-layer budget "
        "(needs --layer-budget)",
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    spec = MODELS[args.model]
    path, tokenizer, device, dtype = model_setup(args.model)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model = SeerModel.from_pretrained(base, args.adapter)
    started = time.perf_counter()
    try:
        rows = decode_layer_sensitivity(
            model,
            heldout_token_ids(tokenizer),
            args.prompt,
            args.tokens,
            budget=args.budget,
            layer_budget=args.layer_budget,
            max_windows=args.windows,
            first_window=args.first_window,
            top=args.fix_top,
            layer_sets=None if args.override_sets is None else [text.split(",") for text in args.override_sets],
            uniform_budgets=args.uniform_budgets,
            keep_average=args.keep_average,
            selector=args.selector,
            batch_size=args.batch_size,
        )
    except ValueError as exc:  # no decode gate, a budget below one block, unknown layers
        raise SystemExit(f"decode_layer_sensitivity.py: {exc}") from None
    n_windows = rows[0]["tokens"] // (args.tokens - 1)
    meta = environment_meta(
        device,
        model=f"{spec.hf_name} ({spec.gguf_name}, dequantised)",
        adapter=args.adapter,
        selector=args.selector,
        budget=args.budget,
        override="dense" if args.layer_budget is None else {"decode_token_budget": args.layer_budget},
        data=f"held-out works, windows {args.first_window}..{args.first_window + n_windows - 1}: prompt "
        f"{args.prompt} (dense prefill) + {args.tokens} tokens decoded token by token",
        dtype=str(dtype),
        command="python " + " ".join(sys.argv),
        seconds=time.perf_counter() - started,
    )
    tag, stamp = result_file_tags(device)
    file = Path(args.out) / f"decode_layer_sensitivity_{args.model}_{tag}_{args.prompt}_{stamp}.json"
    print(f"wrote {write_results(file, meta, rows)}")
    print(format_layer_sensitivity_table(rows))


if __name__ == "__main__":
    main()
