"""Run the task suite on a wrapped model under every block selector at equal density.

Generation is greedy and written out here (prefill, then one token at a time with the KV cache) rather than
through ``generate()``: the prefill's block statistics are read between the two phases, and no generation config
of the model (sampling, repetition penalties) can change the answers. ``density`` is the prefill's.

Three decode modes (``decode=``), the block selector always applies to the prefill:

* ``"dense"`` (default): cached decode with dense attention (the adapter's decode gate, if any, is switched off
  for the run). Retrieval can partly bypass the prefill's block selection: the first answer token comes from the
  sparse prefill, but every later one attends densely to the whole KV cache, where the needle's own keys and
  values (built from its local block, which is always kept) are intact.
* ``"sparse"``: cached decode through the adapter's decode gate with its decode settings (``decode_method``,
  ``decode_token_budget`` / ``decode_threshold``) — the package end to end with sparse prefill and sparse decode.
  Needs an adapter with a decode gate; the ``dense`` selector decodes densely (the base model).
* ``"recompute"``: every answer token from a fresh sparse prefill of prompt + answer so far (no KV cache), so
  every token sees only the blocks the prefill selector keeps; it costs one prefill per answer token.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ..evaluation import SELECTORS, cache_argument, check_selectors, selector_session, stats_density
from ..masks import nz_ratio_to_topk
from .generation import DEFAULT_TASKS, TaskError, TaskGenerator, TaskSample, resolve_tasks
from .scoring import score_answer

DEFAULT_SELECTORS = SELECTORS  # dense, gate, untrained, moba, oracle, random


def max_positions(model: Any) -> int | None:
    """The model's maximum sequence length from its config (``max_position_embeddings`` / ``n_positions``), or None."""
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def _forward_parameters(model: Any) -> set[str]:
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(hf_model.forward).parameters)


DECODE_MODES = ("dense", "sparse", "recompute")


@torch.no_grad()
def greedy_generate(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: set[int] | None = None,
    decode: str = "dense",
) -> tuple[list[int], list[dict[str, Any]], float]:
    """Greedy continuation of one prompt ``input_ids [1, S]`` (at most ``max_new_tokens`` tokens).

    ``decode="dense"`` / ``"sparse"``: one prefill, then single-token steps on the KV cache (attention as the
    model's decode settings say; `evaluate_tasks` sets them per mode). ``decode="recompute"``: every token from a
    full forward of prompt + tokens so far without cache, so each one
    goes through the (sparse) prefill path.

    Returns ``(new_ids, prefill_stats, prefill_seconds)``: the generated ids (the first EOS included, then stop),
    the model's ``sparsity_stats()`` right after the prompt's prefill (``[]`` for a model without them; stale
    entries of earlier calls are cleared first), and that prefill's wall time.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"greedy_generate takes one prompt [1, S], got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    eos_token_ids = eos_token_ids or set()
    parameters = _forward_parameters(model)
    cache_name = cache_argument(model)
    runtime = getattr(model, "runtime", None)
    if runtime is not None:
        runtime.stats.clear()
    extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    start = time.perf_counter()
    cached = decode != "recompute"
    out = model(input_ids=input_ids, use_cache=cached, **extra)
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize(input_ids.device)
    prefill_s = time.perf_counter() - start
    stats = model.sparsity_stats() if runtime is not None else []
    new_ids: list[int] = []
    next_id = out.logits[:, -1].argmax(dim=-1)  # [1]
    while True:
        new_ids.append(int(next_id))
        if new_ids[-1] in eos_token_ids or len(new_ids) == max_new_tokens:
            break
        if cached:
            out = model(input_ids=next_id[:, None], use_cache=True, **{cache_name: getattr(out, cache_name)})
        else:
            ids = torch.cat([input_ids, torch.tensor([new_ids], device=input_ids.device)], dim=1)
            out = model(input_ids=ids, use_cache=False, **extra)
        next_id = out.logits[:, -1].argmax(dim=-1)
    return new_ids, stats, prefill_s


def selector_free_blocks(config: Any, prompt_tokens: int, nz_ratio: float) -> int:
    """Blocks per query-block row a top-k selector chooses itself at ``nz_ratio`` (the kept ``k`` minus the forced
    sink and local blocks) in the last row of a ``prompt_tokens`` prefill; 0 or less means every selector keeps
    the same blocks."""
    n_blocks = math.ceil(prompt_tokens / config.block_size)
    forced = int(bool(config.force_local_block)) + int(bool(config.force_sink_block) and n_blocks > 1)
    return nz_ratio_to_topk(nz_ratio, n_blocks) - forced


def build_task_samples(
    tokenizer: Any,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    lengths: Sequence[int] = (4096,),
    *,
    num_samples: int = 4,
    seed: int = 0,
    max_new_tokens: int | None = None,
    depths: Sequence[float] | None = None,
    use_chat_template: bool | None = None,
    max_length: int | None = None,
) -> dict[tuple[str, int], list[TaskSample]]:
    """``{(task, length): samples}`` for every task and length (every sample is built before any model runs, so
    bad input fails fast). ``depths`` applies to the ``niah_single*`` tasks; ``max_length`` (the model's maximum
    positions) rejects longer lengths. Other arguments as in `TaskGenerator.samples`."""
    tasks = resolve_tasks(tasks)
    lengths = [int(n) for n in lengths]
    if not lengths:
        raise TaskError("no length given")
    if max_length is not None and max(lengths) > max_length:
        raise TaskError(
            f"length {max(lengths)} exceeds the model's maximum of {max_length} positions (prompt and answer must "
            "fit); use lengths up to that"
        )
    generator = TaskGenerator(tokenizer, seed=seed, use_chat_template=use_chat_template)
    samples = {}
    for task in tasks:
        for length in lengths:
            samples[task, length] = generator.samples(
                task,
                length,
                num_samples=num_samples,
                max_new_tokens=max_new_tokens,
                depths=depths if task.startswith("niah_single") else None,
            )
    return samples


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    lengths: Sequence[int] = (4096,),
    *,
    selectors: Sequence[str] = DEFAULT_SELECTORS,
    densities: Sequence[float] = (0.3, 0.1),
    thresholds: Sequence[float] = (),
    num_samples: int = 4,
    seed: int = 0,
    max_new_tokens: int | None = None,
    depths: Sequence[float] | None = None,
    use_chat_template: bool | None = None,
    decode: str = "dense",
    keep_predictions: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Accuracy of each selector on each task and length, at equal density.

    Args:
        model: a `SeerModel` whose active adapter holds the gates under test.
        tokenizer: the model's tokenizer (lengths are counted in its tokens).
        tasks: task names, aliases, ``"default"`` (`DEFAULT_TASKS`) or ``"all"``; a string may list several,
            comma-separated.
        lengths: prompt + answer budget in tokens, e.g. ``(4096, 8192)``; at most the model's maximum positions.
        selectors: any of ``dense``, ``gate`` (the active adapter), ``untrained``, ``moba``, ``oracle``, ``random``
            (see `seer_adapter.evaluation`). Default: all.
        densities: ``nz_ratio`` values every non-dense selector runs at (top-k per query-block row, so the
            selectors keep the same number of blocks; the measured density is reported). Default ``(0.3, 0.1)``.
        thresholds: extra runs of ``gate`` with ``sparsity_method="threshold"`` (default none).
        num_samples: samples per task and length (default 4). seed: generation seed (default 0).
        max_new_tokens: answer budget for every task (default: per task, longest answer + 16 tokens).
        depths: needle depths (0-1) for ``niah_single*`` (default: evenly spaced over the samples).
        use_chat_template: default: when the tokenizer has one.
        decode: ``"dense"`` (default; cached dense decode), ``"sparse"`` (cached decode through the adapter's decode
            gate and decode settings) or ``"recompute"`` (every answer token from a fresh sparse prefill: strict,
            one prefill per token). See the module docstring.
        keep_predictions: keep each sample's prediction in the row's ``samples`` list (default True).
        progress: show a progress bar (tqdm).

    Returns:
        One row per task, length and selector setting: ``{task, length, selector, sparsity_method, decode,
        nz_ratio | threshold, density, score, exact, num_samples, prompt_tokens, max_new_tokens, prefill_s,
        samples}`` where
        ``score`` is the mean recall and ``exact`` the mean exact match, both in percent (0-100), ``density`` the
        mean measured prefill density (1.0 for dense) and ``prefill_s`` the mean prefill time in seconds.
    """
    from tqdm.auto import tqdm

    check_selectors(selectors)
    if not selectors:
        raise ValueError("no selector given")
    for value in densities:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"densities are nz_ratio values in (0, 1], got {value!r}")
    for value in thresholds:
        if not 0.0 < value < 1.0:
            raise ValueError(f"thresholds are gate probabilities in (0, 1), got {value!r}")
    sparse_selectors = [s for s in selectors if s != "dense"]
    if sparse_selectors and not densities and not thresholds:
        raise ValueError(f"selectors {sparse_selectors} need at least one density (or a threshold for 'gate')")
    if thresholds and "gate" not in selectors:
        raise ValueError("thresholds are gate settings; add 'gate' to the selectors")
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    adapter_config = model.peft_config[model.active_adapter]
    if decode == "sparse" and (not adapter_config.decode_gate or adapter_config.decode_method == "dense"):
        raise ValueError(
            "decode='sparse' needs an adapter with a decode gate (decode_gate=True, trained with `seer-adapter "
            "distill --decode-gate`) and a sparse decode_method ('token_budget' or 'threshold'); got "
            f"decode_gate={adapter_config.decode_gate}, decode_method={adapter_config.decode_method!r}"
        )
    all_samples = build_task_samples(
        tokenizer,
        tasks,
        lengths,
        num_samples=num_samples,
        seed=seed,
        max_new_tokens=max_new_tokens,
        depths=depths,
        use_chat_template=use_chat_template,
        max_length=max_positions(model),
    )
    jobs: list[tuple[str, str, float | None]] = [("dense", "dense", None)] if "dense" in selectors else []
    jobs += [(s, "nz_ratio", d) for s in sparse_selectors for d in densities]
    jobs += [("gate", "threshold", t) for t in thresholds]
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    total = len(jobs) * sum(len(s) for s in all_samples.values())
    bar = tqdm(total=total, disable=not progress, desc="tasks", unit="prompt")
    rows = []
    with selector_session(model, selectors) as use:
        config = model.peft_config[model.active_adapter]
        for (task, length), samples in all_samples.items():
            for value in densities if sparse_selectors else ():
                if selector_free_blocks(config, min(s.prompt_tokens for s in samples), value) <= 0:
                    warnings.warn(
                        f"{task} at length {length}: nz_ratio={value} keeps only the forced sink and local blocks "
                        "per row, so every selector gives the same mask there; use a longer length or a larger "
                        "density to compare selectors",
                        stacklevel=2,
                    )
        for (task, length), samples in all_samples.items():
            for selector, method, value in jobs:
                records = []
                with use(selector, method, value):
                    if decode != "sparse" and selector != "dense":
                        model.set_sparsity(decode_method="dense")
                    for sample in samples:
                        ids = torch.tensor([sample.input_ids], device=device)
                        new_ids, stats, prefill_s = greedy_generate(model, ids, sample.max_new_tokens, eos, decode)
                        prediction = tokenizer.decode(new_ids, skip_special_tokens=True)
                        density = 1.0 if selector == "dense" else stats_density(stats)
                        records.append(
                            {
                                "index": sample.index,
                                "prediction": prediction,
                                "answers": sample.answers,
                                "density": density,
                                "prefill_s": prefill_s,
                                **score_answer(prediction, sample.answers),
                            }
                        )
                        bar.update(1)
                n = len(records)
                row = {
                    "task": task,
                    "length": length,
                    "selector": selector,
                    "sparsity_method": method,
                    "decode": decode,
                }
                if value is not None:
                    row[method] = value
                row.update(
                    density=sum(r["density"] for r in records) / n,
                    score=100.0 * sum(r["recall"] for r in records) / n,
                    exact=100.0 * sum(r["exact"] for r in records) / n,
                    num_samples=n,
                    prompt_tokens=sum(s.prompt_tokens for s in samples) / n,
                    max_new_tokens=max(s.max_new_tokens for s in samples),
                    prefill_s=sum(r["prefill_s"] for r in records) / n,
                )
                if keep_predictions:
                    row["samples"] = records
                rows.append(row)
    bar.close()
    return rows


def format_task_table(rows: list[dict[str, Any]]) -> str:
    """A text table of `evaluate_tasks` rows, then the mean score over tasks per length and selector setting."""
    header = f"{'task':<22} {'length':>6} {'selector':<10} {'setting':>12} {'density':>8} {'score':>7} {'exact':>7}"
    lines = [header]

    def setting(r: dict[str, Any]) -> str:
        if r["sparsity_method"] == "dense":
            return "-"
        value = r.get(r["sparsity_method"])
        return f"{'nz' if r['sparsity_method'] == 'nz_ratio' else 'thr'}={value:g}"

    for r in rows:
        lines.append(
            f"{r['task']:<22} {r['length']:>6} {r['selector']:<10} {setting(r):>12} {r['density']:>8.3f} "
            f"{r['score']:>7.1f} {r['exact']:>7.1f}"
        )
    groups: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["length"], r["selector"], setting(r)), []).append(r)
    if len({r["task"] for r in rows}) > 1:
        lines += [
            "",
            f"mean over tasks\n{'length':>6} {'selector':<10} {'setting':>12} {'density':>8} {'score':>7} "
            f"{'exact':>7} {'tasks':>5}",
        ]
        for (length, selector, label), group in sorted(groups.items(), key=lambda kv: kv[0][0]):
            n = len(group)
            lines.append(
                f"{length:>6} {selector:<10} {label:>12} {sum(r['density'] for r in group) / n:>8.3f} "
                f"{sum(r['score'] for r in group) / n:>7.1f} {sum(r['exact'] for r in group) / n:>7.1f} {n:>5}"
            )
    return "\n".join(lines)
