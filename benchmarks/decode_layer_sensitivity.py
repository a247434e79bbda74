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
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distill_eval import MODELS, heldout_token_ids, model_setup, result_file_tags  # noqa: E402

from seer_adapter import SeerModel  # noqa: E402
from seer_adapter.evaluation import (  # noqa: E402
    DECODE_SELECTORS,
    decode_block_scorer,
    decode_continuation,
    environment_meta,
    write_results,
)


def decode_windows(model: SeerModel, windows: torch.Tensor, prompt: int, batch_size: int) -> dict[str, float]:
    """Teacher-forced continuation of every window under the model's current settings: ``{nll, count, density}``
    (density: kept fraction of the real-token blocks of the sparse layers' steps, 1.0 without any). On a GPU the
    steps replay as CUDA graphs (`SeerStaticCache`), as `evaluate_decode` does."""
    cache = "static" if next(model.base_model.parameters()).is_cuda else "dynamic"
    nll, count, density = 0.0, 0, []
    for first in range(0, windows.shape[0], batch_size):
        for run in decode_continuation(model, windows[first : first + batch_size], prompt, cache=cache):
            nll, count = nll + run["nll"], count + run["count"]
            density.append(run["decode_density"])
    return {"nll": nll, "count": count, "density": sum(density) / len(density)}


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
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    spec = MODELS[args.model]
    path, tokenizer, device, dtype = model_setup(args.model)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model = SeerModel.from_pretrained(base, args.adapter)
    config = model.peft_config[model.active_adapter]
    if not config.decode_gate:
        raise SystemExit(f"{args.adapter} has no decode gate: train one with distill_eval.py --decode-gate")
    window = args.prompt + args.tokens
    token_ids = heldout_token_ids(tokenizer)
    n_windows = min(args.windows, token_ids.numel() // window - args.first_window)
    if n_windows < 1:
        raise SystemExit(f"the held-out text has {token_ids.numel() // window} windows of {window} tokens")
    first = args.first_window * window
    windows = token_ids[first : first + n_windows * window].reshape(n_windows, window)  # [W, prompt + tokens]
    layers = sorted(model.gates())
    override = {"decode_method": "dense"} if args.layer_budget is None else {"decode_token_budget": args.layer_budget}
    scorer = None if args.selector == "gate" else args.selector
    started = time.perf_counter()

    def overrides_of(overridden: list[int]) -> dict[str, dict[str, Any]]:
        return {str(layer): dict(override) for layer in overridden}

    def run(label: str, method: str, overridden: list[int], budget: int = args.budget) -> dict[str, Any]:
        model.set_sparsity(
            dense_below_length=window + 1,  # dense prefill: only the decoding steps differ between runs
            decode_method=method,
            decode_token_budget=budget,
            layer_overrides=overrides_of(overridden),
        )
        with decode_block_scorer(model, scorer):
            result = decode_windows(model, windows, args.prompt, args.batch_size)
        # attended fraction over all layers: with dense overrides the sparse layers' density and the dense layers
        # whole; with --layer-budget every layer is sparse and the density already counts them all
        attended = result["density"]
        if args.layer_budget is None or method == "dense":
            dense_layers = len(layers) if method == "dense" else len(overridden)
            attended = ((len(layers) - dense_layers) * result["density"] + dense_layers) / len(layers)
        row = {
            "run": label,
            "layers_overridden": overridden,
            "ppl": math.exp(result["nll"] / result["count"]),
            "budget": None if method == "dense" else budget,
            "tokens": result["count"],
            "sparse_density": result["density"],
            "attended_fraction": attended,
        }
        print(f"{label:<22} ppl {row['ppl']:8.3f}  density {result['density']:.3f}", flush=True)
        return row

    dense = run("dense", "dense", [])
    sparse = run("all sparse", "token_budget", [])
    gap = sparse["ppl"] - dense["ppl"]
    rows = [dense, sparse]
    per_layer = []
    if args.override_sets is None:
        for layer in layers:
            row = run(f"layer {layer} overridden", "token_budget", [layer])
            row["recovered"] = (sparse["ppl"] - row["ppl"]) / gap if gap else float("nan")
            per_layer.append(row)
        rows += per_layer
        ranked = sorted(per_layer, key=lambda r: r["ppl"])
        chosen_sets = [sorted(r["layers_overridden"][0] for r in ranked[:k]) for k in args.fix_top]
        labels = [f"top {k} overridden" for k in args.fix_top]
    else:
        chosen_sets = [sorted(int(layer) for layer in text.split(",")) for text in args.override_sets]
        labels = [f"{len(chosen)} given overridden" for chosen in chosen_sets]
    for label, chosen in zip(labels, chosen_sets, strict=True):
        row = run(label, "token_budget", chosen)
        row["recovered"] = (sparse["ppl"] - row["ppl"]) / gap if gap else float("nan")
        rows.append(row)
    for budget in args.uniform_budgets:
        row = run(f"all sparse at {budget}", "token_budget", [], budget)
        row["recovered"] = (sparse["ppl"] - row["ppl"]) / gap if gap else float("nan")
        rows.append(row)
    for row in rows:
        row["ppl_delta_pct"] = 100.0 * (row["ppl"] / dense["ppl"] - 1.0)

    meta = environment_meta(
        device,
        model=f"{spec.hf_name} ({spec.gguf_name}, dequantised)",
        adapter=args.adapter,
        selector=args.selector,
        budget=args.budget,
        override=override,
        data=f"held-out works, windows {args.first_window}..{args.first_window + n_windows - 1}: prompt "
        f"{args.prompt} (dense prefill) + {args.tokens} tokens decoded token by token",
        dtype=str(dtype),
        command="python " + " ".join(sys.argv),
        seconds=time.perf_counter() - started,
    )
    tag, stamp = result_file_tags(device)
    file = Path(args.out) / f"decode_layer_sensitivity_{args.model}_{tag}_{args.prompt}_{stamp}.json"
    print(f"wrote {write_results(file, meta, rows)}")
    print(f"{'run':<22} {'Δ% ppl':>8} {'recovered':>9} {'attended':>8}")
    for r in [dense, sparse, *sorted(per_layer, key=lambda r: r["ppl"])[:8], *rows[2 + len(per_layer) :]]:
        recovered = f"{r['recovered']:>9.2f}" if "recovered" in r else f"{'-':>9}"
        attended = f"{r['attended_fraction']:>8.3f}"
        print(f"{r['run']:<22} {r['ppl_delta_pct']:>+8.2f} {recovered} {attended}")
    # the chosen sets as a user writes them: SeerAttentionConfig(layer_overrides=...) or seer-adapter eval
    # --layer-overrides (with decode_token_budget=args.budget for every other layer)
    print(f"\nlayer_overrides of the chosen sets (every other layer: decode_token_budget={args.budget}):")
    for label, chosen in zip(labels, chosen_sets, strict=True):
        print(f"{label:<22} {json.dumps(overrides_of(chosen))}")


if __name__ == "__main__":
    main()
