"""Perplexity of a wrapped model, and the baselines the gates are judged against at equal density.

Selectors (all choose blocks per query-block row; top-k methods keep the same number of blocks per row, so
their densities match by construction):

* ``dense`` — every block (the base model);
* ``gate`` — the active adapter's gates (``nz_ratio`` and ``threshold`` sweeps);
* ``untrained`` — freshly initialised gates (the mean-pooling prior, see `AttnGate`);
* ``moba`` — parameter-free MoBA-style scores: mean-pooled post-RoPE Q · mean-pooled post-RoPE K;
* ``oracle`` — the true pooled attention map of the layer (upper bound, needs the full attention);
* ``random`` — uniformly random scores.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from .attention import SeerAttentionMask, SeerLayerState
from .gate import pool_blocks
from .kernels.ground_truth import attention_with_block_ground_truth

# Logits post-processing some families apply after the LM head (config attribute -> function).
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": lambda logits, cap: cap * torch.tanh(logits / cap),
    "logit_scale": lambda logits, scale: logits * scale,
    "logits_scaling": lambda logits, scale: logits / scale,
}


def _lm_head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name, transform in _LOGIT_TRANSFORMS.items():
        value = getattr(config, name, None)
        if value is not None:
            logits = transform(logits, value)
    return logits


def _check_chunked_logits(model: nn.Module, ids: torch.Tensor) -> None:
    """The backbone + LM head path must reproduce the model's own logits (families may post-process them)."""
    probe = ids[:, : min(64, ids.shape[1])]
    want = model(input_ids=probe, use_cache=False).logits.float()
    hidden = model.base_model(input_ids=probe, use_cache=False).last_hidden_state
    got = _lm_head_logits(model, hidden).float()
    if not torch.allclose(got, want, atol=1e-3 * want.abs().max().item() + 1e-4):
        raise RuntimeError(
            f"{type(model).__name__}: computing logits in chunks (backbone + LM head) does not reproduce the model's "
            "logits; this family post-processes logits in a way seer_adapter does not know yet."
        )


@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor, loss_chunk: int = 4096) -> tuple[float, int]:
    """Summed next-token NLL of one window ``ids [1, S]``, the LM head applied ``loss_chunk`` positions at a time
    (logits of a 32k window over a 150k vocabulary would not fit in memory). Returns ``(nll_sum, n_tokens)``."""
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state  # [1, S, H]
    total, count = 0.0, 0
    for start in range(0, ids.shape[1] - 1, loss_chunk):
        stop = min(ids.shape[1] - 1, start + loss_chunk)
        logits = _lm_head_logits(model, hidden[:, start:stop]).float()
        targets = ids[:, start + 1 : stop + 1]
        total += nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    return total, count


@torch.no_grad()
def perplexity(
    model: nn.Module, token_ids: torch.Tensor, window: int, max_windows: int | None = None, loss_chunk: int = 4096
) -> float:
    """Perplexity of ``token_ids`` (1-D) scored in non-overlapping windows of ``window`` tokens.

    Each window is one forward pass from an empty context (so every window exercises the full prefill path);
    the last partial window is dropped. ``model`` may be a `SeerModel` or a plain transformers model.
    Returns ``exp(mean token NLL)``.
    """
    hf_model = getattr(model, "base_model", model) if hasattr(model, "runtime") else model
    n_windows = token_ids.numel() // window
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"need at least {window} tokens to score one window, got {token_ids.numel()}")
    device = next(hf_model.parameters()).device
    windows = [token_ids[i * window : (i + 1) * window].to(device)[None] for i in range(n_windows)]
    _check_chunked_logits(hf_model, windows[0])
    total, count = 0.0, 0
    for ids in windows:
        nll, n = window_nll(hf_model, ids, loss_chunk)
        total, count = total + nll, count + n
    return math.exp(total / count)


# ------------------------------------------------------------------------------------------------------
# parameter-free block scorers (installed on SeerRuntime.block_scorer)
# ------------------------------------------------------------------------------------------------------
def moba_scorer(module, layer: SeerLayerState, query, key, value, mask: SeerAttentionMask, scaling, allowed):
    """Mean-pooled post-RoPE Q · mean-pooled post-RoPE K per block (no parameters)."""
    block = layer.runtime.config.block_size
    padding = mask.key_padding_mask
    q_mean = pool_blocks(query.float(), block, ["avg"], padding)  # [B, Hq, nB, D]
    k_mean = pool_blocks(key.float(), block, ["avg"], padding)  # [B, Hkv, nB, D]
    k_mean = k_mean.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scores = q_mean @ k_mean.transpose(-1, -2)
    return scores.masked_fill(~allowed, float("-inf"))


def oracle_scorer(module, layer: SeerLayerState, query, key, value, mask: SeerAttentionMask, scaling, allowed):
    """The layer's true pooled attention map (an upper bound that needs the full attention)."""
    _, block_map = attention_with_block_ground_truth(
        query,
        key,
        value,
        block_size=layer.runtime.config.block_size,
        scale=scaling,
        key_padding_mask=mask.key_padding_mask,
    )
    return block_map.masked_fill(~allowed, float("-inf"))


class RandomScorer:
    """Uniformly random block scores from a seeded generator (reproducible across runs)."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __call__(self, module, layer: SeerLayerState, query, key, value, mask, scaling, allowed):
        generator = torch.Generator(device=allowed.device).manual_seed(self.seed + layer.layer_idx)
        scores = torch.rand(allowed.shape, generator=generator, device=allowed.device)
        return scores.masked_fill(~allowed, float("-inf"))


SCORERS: dict[str, Any] = {"moba": moba_scorer, "oracle": oracle_scorer, "random": RandomScorer()}


# ------------------------------------------------------------------------------------------------------
# parameter-free decode-step scorers (installed on SeerRuntime.decode_block_scorer)
# ------------------------------------------------------------------------------------------------------
def moba_decode_scorer(
    module, layer: SeerLayerState, query, key, key_padding_mask, scaling, n_earlier, softcap, query_position=None
):
    """Mean post-RoPE query of the GQA group · mean-pooled post-RoPE K of each strictly earlier block (each block is
    pooled on its own, so a static step's blocks from the query's on need no care: the caller discards them)."""
    batch, hq, _, head_dim = query.shape
    hkv = key.shape[1]
    block = layer.runtime.config.effective_decode_block_size
    earlier = n_earlier * block
    padding = None if key_padding_mask is None else key_padding_mask[:, :earlier]
    k_mean = pool_blocks(key[:, :, :earlier].float(), block, ["avg"], padding)  # [B, Hkv, n_earlier, D]
    q_mean = query.float().view(batch, hkv, hq // hkv, head_dim).mean(dim=2)  # [B, Hkv, D]
    return torch.einsum("bhd,bhkd->bhk", q_mean, k_mean)  # [B, Hkv, n_earlier]


def oracle_decode_scorer(
    module,
    layer: SeerLayerState,
    query,
    key,
    key_padding_mask,
    scaling,
    n_earlier,
    softcap,
    query_position: torch.Tensor | None = None,
    target: str = "max",
) -> torch.Tensor:
    """A decode-gate distillation target at this step, as logits (an upper bound: needs the full attention).

    ``target="max"``: per strictly earlier block, the largest attention probability of any query head of the group
    (what the decode gate is trained to imitate by default); ``"mass"``: the group's probability mass per block
    (what a top-k budget keeps most of). Renormalised (`seer_adapter.kernels.decode_block_ground_truth` for the last
    cache slot, or for ``query_position`` in a static step); the log is returned, so the threshold method's softmax
    gives back the target itself."""
    from .kernels import decode_block_ground_truth

    batch, hq, _, head_dim = query.shape
    kv_len = key.shape[2]
    probs = decode_block_ground_truth(
        query.expand(batch, hq, kv_len, head_dim),  # only the last row is computed: the query is the last slot
        key,
        block_size=layer.runtime.config.effective_decode_block_size,
        scale=scaling,
        key_padding_mask=key_padding_mask,
        softcap=softcap,
        query_rows=torch.full((1,), kv_len - 1, dtype=torch.long, device=query.device)
        if query_position is None
        else query_position,
        target=target,
    )[:, :, 0, :n_earlier]  # [B, Hkv, n_earlier]
    return probs.clamp_min(torch.finfo(torch.float32).tiny).log()


DECODE_SCORERS: dict[str, Any] = {
    "moba": moba_decode_scorer,
    "oracle": oracle_decode_scorer,
    "oracle_mass": functools.partial(oracle_decode_scorer, target="mass"),
}
DECODE_SELECTORS = ("gate", *DECODE_SCORERS)


@contextmanager
def decode_block_scorer(model: Any, name: str | None) -> Iterator[None]:
    """Score decoding steps with a parameter-free scorer (``oracle``, ``oracle_mass``, ``moba``) instead of the
    decode gate."""
    if name is not None and name not in DECODE_SCORERS:
        raise ValueError(f"unknown decode selector {name!r}; expected one of {DECODE_SELECTORS}")
    previous = model.runtime.decode_block_scorer
    model.runtime.decode_block_scorer = DECODE_SCORERS[name] if name else None
    try:
        yield
    finally:
        model.runtime.decode_block_scorer = previous


@contextmanager
def block_scorer(model: Any, name: str | None) -> Iterator[None]:
    """Use a parameter-free scorer (``moba``, ``oracle``, ``random``) instead of the gates inside the block."""
    previous = model.runtime.block_scorer
    model.runtime.block_scorer = SCORERS[name] if name else None
    try:
        yield
    finally:
        model.runtime.block_scorer = previous


def stats_density(stats: list[dict[str, Any]]) -> float:
    """Kept fraction of the causal blocks summed over the ``"sparse"`` layers of ``sparsity_stats()`` rows (1.0 if
    none ran sparse)."""
    sparse = [s for s in stats if s["mode"] == "sparse"]
    causal = sum(s["causal_blocks"] for s in sparse)
    return sum(s["kept_blocks"] for s in sparse) / causal if causal else 1.0


def mean_density(model: Any) -> float:
    """`stats_density` of the model's last forward."""
    return stats_density(model.sparsity_stats())


SELECTORS = ("dense", "gate", "untrained", "moba", "oracle", "random")
_UNTRAINED_ADAPTER = "untrained"


def check_selectors(selectors: Sequence[str]) -> tuple[str, ...]:
    """``selectors`` as a tuple; raises ``ValueError`` naming the valid ones when one is unknown."""
    unknown = [s for s in selectors if s not in SELECTORS]
    if unknown:
        raise ValueError(f"unknown selector(s) {unknown}; choose from {', '.join(SELECTORS)}")
    return tuple(selectors)


@contextmanager
def selector_session(model: Any, selectors: Sequence[str]) -> Iterator[Callable[..., AbstractContextManager[None]]]:
    """Prepare a `SeerModel` to run under each of ``selectors`` (see `SELECTORS`) in turn.

    Yields ``use(selector, sparsity_method="nz_ratio", value=None)``, a context manager inside which the model's
    prefill picks blocks with ``selector``: ``"dense"`` runs the base model (adapter disabled; ``sparsity_method``
    and ``value`` are ignored), every other selector runs the gated prefill with ``sparsity_method`` set to
    ``value`` (an ``nz_ratio`` or a ``threshold``) and ``dense_below_length=0``, so prompts of any length are gated.
    Top-k (``nz_ratio``) selection keeps the same number of blocks per row whatever the selector, so selectors are
    compared at equal density. ``"untrained"`` uses fresh gates added for the session (the mean-pooling prior).

    On exit the active adapter and its settings are restored and the untrained gates removed.
    """
    from .config import SeerAttentionConfig

    if not hasattr(model, "runtime") or not hasattr(model, "set_sparsity"):
        raise TypeError(
            f"selectors run on a SeerModel (get_seer_model / SeerModel.from_pretrained), got {type(model).__name__}"
        )
    check_selectors(selectors)
    trained = model.active_adapter
    saved = model.peft_config[trained]
    added = None
    if "untrained" in selectors:
        added = _UNTRAINED_ADAPTER
        while added in model.peft_config:
            added = "_" + added
        fields = {k: v for k, v in saved.to_dict().items() if k not in ("gated_layers", "inference_mode")}
        model.add_adapter(added, SeerAttentionConfig(**fields))

    @contextmanager
    def use(selector: str, sparsity_method: str = "nz_ratio", value: float | None = None) -> Iterator[None]:
        check_selectors([selector])
        if selector == "dense":
            with model.disable_adapter():
                yield
            return
        if sparsity_method not in ("nz_ratio", "threshold") or value is None:
            raise ValueError(f"selector {selector!r} needs sparsity_method 'nz_ratio' or 'threshold' and a value")
        if selector == "untrained" and added is None:
            raise ValueError("'untrained' was not among the session's selectors")
        model.set_adapter(added if selector == "untrained" else trained)
        try:
            model.set_sparsity(sparsity_method=sparsity_method, dense_below_length=0, **{sparsity_method: value})
            with block_scorer(model, selector if selector in SCORERS else None):
                yield
        finally:
            model.set_adapter(trained)

    try:
        yield use
    finally:
        model.set_adapter(trained)
        model.peft_config[trained] = saved
        if added is not None:
            model.delete_adapter(added)


def evaluate_selectors(
    model: Any,
    token_ids: torch.Tensor,
    window: int,
    *,
    max_windows: int | None = None,
    nz_ratios: tuple[float, ...] = (0.5, 0.3, 0.1),
    thresholds: tuple[float, ...] = (),
    selectors: tuple[str, ...] = ("gate", "untrained", "moba", "oracle", "random"),
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Perplexity of every selector at every ``nz_ratio`` (plus gate ``threshold`` sweeps) and of dense.

    ``model`` is a `SeerModel` whose active adapter holds the gates under test. Returns rows
    ``{selector, sparsity_method, nz_ratio | threshold, density (measured), ppl}``; the dense row always comes
    first (``"dense"`` in ``selectors`` is allowed and changes nothing).
    """
    from tqdm.auto import tqdm

    selectors = tuple(s for s in check_selectors(selectors) if s != "dense")
    jobs: list[tuple[str, str, float]] = [("dense", "dense", 1.0)]
    jobs += [(sel, "nz_ratio", nz) for sel in selectors for nz in nz_ratios]
    jobs += [("gate", "threshold", t) for t in thresholds]
    rows = []
    with selector_session(model, selectors) as use:
        for selector, method, value in tqdm(jobs, disable=not progress, desc="evaluate", unit="run"):
            with use(selector, method, value):
                ppl = perplexity(model, token_ids, window, max_windows)
            if selector == "dense":
                rows.append({"selector": "dense", "sparsity_method": "dense", "density": 1.0, "ppl": ppl})
            else:
                rows.append(
                    {
                        "selector": selector,
                        "sparsity_method": method,
                        method: value,
                        "density": mean_density(model),
                        "ppl": ppl,
                    }
                )
    return rows


def environment_meta(device: torch.device, **fields: Any) -> dict[str, Any]:
    """The ``meta`` object of a results file: ``fields`` plus device, versions and date."""
    import datetime

    import transformers

    return {
        **fields,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
    }


def write_results(path: str | os.PathLike, meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Write ``{"meta": meta, "rows": rows}`` as JSON to ``path`` (folders created). Returns the path written."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return path


def format_selector_table(rows: list[dict[str, Any]]) -> str:
    """A text table of `evaluate_selectors` rows, with the perplexity change against the dense row."""
    dense = next(r["ppl"] for r in rows if r["selector"] == "dense")
    lines = [f"{'selector':<10} {'method':<10} {'setting':>8} {'density':>8} {'ppl':>9} {'vs dense':>9}"]
    for r in rows:
        setting = r.get("nz_ratio", r.get("threshold", ""))
        lines.append(
            f"{r['selector']:<10} {r['sparsity_method']:<10} {setting!s:>8} {r['density']:>8.3f} {r['ppl']:>9.3f} "
            f"{100 * (r['ppl'] / dense - 1):>+8.2f}%"
        )
    return "\n".join(lines)


def cache_argument(model: Any) -> str:
    """Name of the KV-cache argument of ``model.forward``: ``"cache"`` in recent transformers 5.x, else
    ``"past_key_values"``."""
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"


# ------------------------------------------------------------------------------------------------------
# sparse decoding: held-out continuation decoded token by token, against dense decoding
# ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def decode_continuation(
    model: Any, token_ids: torch.Tensor, prompt_len: int, greedy_tokens: int = 0, *, cache: str = "dynamic"
) -> dict[str, Any] | list[dict[str, Any]]:
    """Decode the continuation of one prompt (or of a batch of equal-length windows) token by token with the model's
    current decode settings.

    The prompt ``token_ids[..., :prompt_len]`` is prefilled once into a `SeerDynamicCache` (``cache="dynamic"``) or a
    `SeerStaticCache` of the window's length (``cache="static"``: shape-static steps, replayed from one CUDA graph on a
    GPU — the same logits, without the eager step's host time; sliding-window layers keep every token there, their
    masks still apply the window); then every continuation token is fed one at a time (teacher forcing) and the
    model's prediction for the next one is scored. Only predictions made by **decoding steps** are scored (the
    prompt's last prediction comes from the prefill and is the same under every decode setting), so ``count =
    window - prompt_len - 1``. With ``greedy_tokens > 0`` the cache is then brought back to the prompt and continued
    greedily (free running) for that many tokens. The rows of a 2-D ``token_ids`` are independent windows decoded
    as one batch (no padding).

    Args:
        model: a `SeerModel` (or a plain transformers causal LM: dense decoding).
        token_ids: ``[prompt_len + N]`` ids, or ``[W, prompt_len + N]`` for W windows; N >= 2.
        prompt_len: tokens prefilled at once.
        greedy_tokens: tokens of free-running greedy continuation to return (0: none).
        cache: ``"dynamic"`` or ``"static"`` (see above).

    Returns:
        ``{nll, count, top1 [count] (argmax ids of the scored predictions), greedy [greedy_tokens] ids,
        decode_density}`` where ``decode_density`` is the kept fraction of the real-token blocks over every sparse
        decoding step and layer (1.0 when every step ran dense); a list of them, one per row, for 2-D ``token_ids``.
    """
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from .decode import SeerDynamicCache, SeerStaticCache

    if cache not in ("dynamic", "static"):
        raise ValueError(f"cache must be 'dynamic' or 'static', got {cache!r}")
    hf_model = getattr(model, "base_model", model) if hasattr(model, "runtime") else model
    cache_name = cache_argument(hf_model)
    forward_parameters = inspect.signature(hf_model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters else {}
    runtime = getattr(model, "runtime", None)
    if token_ids.dim() not in (1, 2) or not 0 < prompt_len <= token_ids.shape[-1] - 2:
        raise ValueError(
            f"need 1-D or 2-D token_ids with at least prompt_len + 2 tokens per row, got shape "
            f"{tuple(token_ids.shape)} and prompt_len={prompt_len}"
        )
    device = next(hf_model.parameters()).device
    ids = token_ids.to(device).view(-1, token_ids.shape[-1])  # [W, P + N]
    rows = ids.shape[0]
    kept = torch.zeros(rows, dtype=torch.float64, device=device)
    causal = torch.zeros(rows, dtype=torch.float64, device=device)

    def step(input_ids: torch.Tensor, kv_cache: SeerDynamicCache | SeerStaticCache) -> torch.Tensor:
        nonlocal kept, causal
        if runtime is not None:
            runtime.stats.clear()
        logits = hf_model(input_ids=input_ids, use_cache=True, **extra, **{cache_name: kv_cache}).logits
        if runtime is not None and input_ids.shape[1] == 1:
            for stats in runtime.stats.values():
                if stats.get("phase") == "decode" and stats["mode"] == "sparse":  # per-row counts [W, Hkv]
                    kept = kept + stats["kept_blocks"].reshape(rows, -1).sum(-1)
                    causal = causal + stats["causal_blocks"].reshape(rows, -1).sum(-1)
        return logits[:, -1].float()  # [W, V]

    def new_cache() -> SeerDynamicCache | SeerStaticCache:
        if cache == "static":
            capacity = max(ids.shape[1], prompt_len + greedy_tokens)
            return SeerStaticCache(config=hf_model.config, max_cache_len=capacity, full_sliding_layers=True)
        return SeerDynamicCache(config=hf_model.config)

    kv_cache = new_cache()
    prefill_logits = step(ids[:, :prompt_len], kv_cache)
    nll = torch.zeros(rows, dtype=torch.float64, device=device)
    top1 = []
    for t in range(prompt_len, ids.shape[1] - 1):
        logits = step(ids[:, t : t + 1], kv_cache)
        nll = nll - torch.log_softmax(logits, dim=-1).gather(1, ids[:, t + 1, None])[:, 0].double()
        top1.append(logits.argmax(-1))
    greedy = []
    if greedy_tokens > 0:
        # back to the prompt (the same prefill), greedy from there; a dynamic sliding-window layer keeps only its
        # window and cannot be cropped back past it, so such caches are prefilled again instead
        if any(isinstance(layer, DynamicSlidingWindowLayer) for layer in kv_cache.layers):
            kv_cache = new_cache()
            step(ids[:, :prompt_len], kv_cache)
        else:
            kv_cache.crop(prompt_len - kv_cache.get_seq_length())
        next_ids = prefill_logits.argmax(-1)  # [W]
        for _ in range(greedy_tokens):
            greedy.append(next_ids)
            if len(greedy) < greedy_tokens:
                next_ids = step(next_ids[:, None], kv_cache).argmax(-1)
    count = ids.shape[1] - prompt_len - 1
    top1_ids = torch.stack(top1, dim=1).cpu()  # [W, count]
    greedy_ids = torch.stack(greedy, dim=1).cpu() if greedy else torch.empty(rows, 0, dtype=torch.long)
    results = [
        {
            "nll": float(nll[r]),
            "count": count,
            "top1": top1_ids[r],
            "greedy": greedy_ids[r],
            "decode_density": float(kept[r] / causal[r]) if float(causal[r]) > 0 else 1.0,
        }
        for r in range(rows)
    ]
    return results[0] if token_ids.dim() == 1 else results


def _check_decode_run(model: Any, caller: str, continuation: int, batch_size: int, cache: str) -> Any:
    """The checks every token-by-token decoding evaluation shares; returns the active adapter's config."""
    if not hasattr(model, "runtime") or not hasattr(model, "set_sparsity"):
        raise TypeError(f"{caller} runs on a SeerModel, got {type(model).__name__}")
    config = model.peft_config[model.active_adapter]
    if not config.decode_gate:
        raise ValueError(
            "the active adapter has no decode gate (decode_gate=False); train one with `seer-adapter distill "
            "--decode-gate` or get_seer_model(..., SeerAttentionConfig(decode_gate=True)) and train_gates"
        )
    if continuation < 2:
        raise ValueError(f"continuation must be at least 2 tokens, got {continuation}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if cache not in ("auto", "dynamic", "static"):
        raise ValueError(f"cache must be 'auto', 'dynamic' or 'static', got {cache!r}")
    return config


def evaluate_decode(
    model: Any,
    token_ids: torch.Tensor,
    prompt_len: int,
    continuation: int,
    *,
    max_windows: int | None = 1,
    budgets: Sequence[int] = (2048, 4096),
    thresholds: Sequence[float] = (),
    greedy_tokens: int = 128,
    prefill: str = "dense",
    selectors: Sequence[str] = ("gate",),
    progress: bool = True,
    cache: str = "auto",
    batch_size: int = 1,
) -> list[dict[str, Any]]:
    """Perplexity of a held-out continuation decoded token by token: sparse decode gate against dense decoding.

    ``token_ids`` (1-D) is cut into non-overlapping windows of ``prompt_len + continuation`` tokens; each window's
    prompt is prefilled once, then its continuation is decoded token by token (`decode_continuation`) under every
    setting: ``dense`` (``decode_method="dense"``: the base model's attention over the whole cache), then the decode
    gate at every token budget in ``budgets`` and every threshold in ``thresholds``. The prefill is the same under
    every setting: ``prefill="dense"`` (default: the base model's attention, the decode gate's compressed keys are
    still built) or ``"gate"`` (the adapter's prefill settings as they are). ``selectors`` picks who scores the
    blocks of the sparse settings: ``"gate"`` (the decode gate), ``"oracle"`` (the gate's distillation target from
    the full attention: what a perfect gate would select), ``"oracle_mass"`` (the blocks holding the most attention
    mass of the group) and ``"moba"`` (parameter-free mean-pooled scores); every sparse setting runs once per
    selector.

    ``cache`` is the KV cache the continuations decode into (`decode_continuation`): ``"dynamic"`` (a
    `SeerDynamicCache`), ``"static"`` (a `SeerStaticCache`: CUDA-graph steps on a GPU, many times faster than eager
    steps) or ``"auto"`` (default: static on CUDA, for every selector, dynamic elsewhere); each row names its
    ``cache``.
    ``batch_size`` windows decode together as one batch (default 1; one decoding step serves them all, for
    ``batch_size`` times the KV cache).

    Returns one row per setting: ``{decode_method, selector, cache, token_budget | threshold, decode_density, ppl,
    ppl_delta_pct (against dense), top1_agreement (teacher-forced argmax equal to dense's, percent),
    greedy_agreement (free-running greedy tokens equal to dense's at the same position, percent), greedy_prefix
    (tokens before the first difference, mean over windows), tokens (scored per setting)}``; the dense row comes
    first (selector ``"dense"``).
    """
    from tqdm.auto import tqdm

    config = _check_decode_run(model, "evaluate_decode", continuation, batch_size, cache)
    if prefill not in ("dense", "gate"):
        raise ValueError(f"prefill must be 'dense' or 'gate', got {prefill!r}")
    for budget in budgets:
        if budget < config.effective_decode_block_size:
            raise ValueError(
                f"token budget {budget} is below one block of the decode gate ({config.effective_decode_block_size} "
                "tokens)"
            )
    window = prompt_len + continuation
    n_windows = token_ids.numel() // window
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"need at least {window} tokens (prompt_len + continuation), got {token_ids.numel()}")
    unknown = [name for name in selectors if name not in DECODE_SELECTORS]
    if unknown or not selectors:
        raise ValueError(f"decode selectors must be among {DECODE_SELECTORS}, got {list(selectors)}")
    on_cuda = next(model.base_model.parameters()).device.type == "cuda"
    default_cache = "static" if on_cuda else "dynamic"
    sparse = [{"decode_method": "token_budget", "decode_token_budget": int(b)} for b in budgets]
    sparse += [{"decode_method": "threshold", "decode_threshold": float(t)} for t in thresholds]
    settings: list[dict[str, Any]] = [{"decode_method": "dense", "selector": "dense"}]
    settings += [{**setting, "selector": name} for name in selectors for setting in sparse]
    for setting in settings:
        setting["cache"] = default_cache if cache == "auto" else cache
    prefill_settings = {"dense_below_length": window + 1} if prefill == "dense" else {}
    saved = model.peft_config[model.active_adapter]
    results: list[list[dict[str, Any]]] = [[] for _ in settings]
    try:
        bar = tqdm(total=n_windows * len(settings), disable=not progress, desc="decode", unit="window")
        windows = token_ids[: n_windows * window].reshape(n_windows, window)  # [W, window]
        for first in range(0, n_windows, batch_size):
            ids = windows[first : first + batch_size]
            for i, setting in enumerate(settings):
                decode_settings = {k: v for k, v in setting.items() if k not in ("selector", "cache")}
                model.peft_config[model.active_adapter] = saved.replace(**prefill_settings, **decode_settings)
                scorer = setting["selector"] if setting["selector"] in DECODE_SCORERS else None
                with decode_block_scorer(model, scorer):
                    results[i] += decode_continuation(model, ids, prompt_len, greedy_tokens, cache=setting["cache"])
                bar.update(ids.shape[0])
        bar.close()
    finally:
        model.peft_config[model.active_adapter] = saved
    dense = results[0]
    dense_ppl = math.exp(sum(r["nll"] for r in dense) / sum(r["count"] for r in dense))
    rows = []
    for setting, runs in zip(settings, results, strict=True):
        ppl = math.exp(sum(r["nll"] for r in runs) / sum(r["count"] for r in runs))
        top1 = torch.cat([r["top1"] for r in runs]) == torch.cat([r["top1"] for r in dense])
        row: dict[str, Any] = {
            "decode_method": setting["decode_method"],
            "selector": setting["selector"],
            "cache": setting["cache"],
        }
        if "decode_token_budget" in setting:
            row["token_budget"] = setting["decode_token_budget"]
        if "decode_threshold" in setting:
            row["threshold"] = setting["decode_threshold"]
        row.update(
            decode_density=sum(r["decode_density"] for r in runs) / len(runs),
            ppl=ppl,
            ppl_delta_pct=100.0 * (ppl / dense_ppl - 1.0),
            top1_agreement=100.0 * top1.double().mean().item(),
            tokens=sum(r["count"] for r in runs),
            windows=len(runs),
        )
        if greedy_tokens > 0:
            same = [r["greedy"] == d["greedy"] for r, d in zip(runs, dense, strict=True)]
            row["greedy_agreement"] = 100.0 * torch.cat(same).double().mean().item()
            row["greedy_prefix"] = sum(int(s.numel() if s.all() else (~s).nonzero()[0, 0]) for s in same) / len(same)
        rows.append(row)
    return rows


def budget_keeping_average(budget: int, layer_budget: int, chosen: int, layers: int, block_size: int) -> int:
    """The decode budget of the ``layers - chosen`` other layers when ``chosen`` layers get ``layer_budget`` and the
    mean per-layer budget must stay at most ``budget``: rounded down to whole ``block_size`` blocks.

    E.g. 24 layers, 5 of them at 4096, mean 2048: the other 19 get 1504 (mean 2044). Raises ValueError when that
    leaves the others less than one block (or when every layer is chosen and ``layer_budget`` exceeds ``budget``).
    """
    others = layers - chosen
    spare = budget * layers - layer_budget * chosen
    if others == 0:
        if spare < 0:
            raise ValueError(f"all {layers} layers at layer_budget={layer_budget} exceed the mean budget {budget}")
        return budget
    rest = spare // others // block_size * block_size
    if rest < block_size:
        raise ValueError(
            f"{chosen} of {layers} layers at {layer_budget} tokens leave the other {others} less than one "
            f"{block_size}-token block under a mean budget of {budget}; choose fewer layers or a smaller layer_budget"
        )
    return rest


def decode_layer_sensitivity(
    model: Any,
    token_ids: torch.Tensor,
    prompt_len: int,
    continuation: int,
    *,
    budget: int,
    layer_budget: int | None = None,
    max_windows: int | None = 4,
    first_window: int = 0,
    top: Sequence[int] | None = None,
    layer_sets: Sequence[Sequence[int]] | None = None,
    uniform_budgets: Sequence[int] = (),
    keep_average: bool = False,
    selector: str = "gate",
    batch_size: int = 1,
    cache: str = "auto",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Which layers' decode selection costs the perplexity, and what giving them more context buys.

    The continuation of each window (``prompt_len + continuation`` tokens, cut from the 1-D ``token_ids`` after
    skipping ``first_window`` windows) is decoded token by token (`decode_continuation`, dense prefill) once densely,
    once with every gated layer at ``decode_token_budget=budget``, then — unless ``layer_sets`` is given — once per
    gated layer with only that layer overridden: dense decoding (``layer_budget=None``) or ``layer_budget`` tokens.
    The ``top`` costliest layers (those whose override lowered the perplexity most) are then overridden together;
    ``layer_sets`` evaluates given sets instead (chosen on other windows: the honest check of a choice). Every
    ``uniform_budgets`` entry runs every layer at that budget, to compare with the overrides at an equal attended
    fraction. With ``keep_average`` the chosen sets cost no more than the uniform budget: the layers outside a set
    drop to the largest whole-block budget that keeps the mean per-layer budget at or below ``budget``
    (`budget_keeping_average`), so a set trades context between layers instead of adding it. The model's settings
    are restored afterwards; overrides the adapter already has stay under the sweep's.

    Args:
        model: a `SeerModel` whose active adapter has a decode gate.
        budget: decode token budget of every layer not overridden (>= one decode block).
        layer_budget: the overridden layers' budget; ``None`` (default) decodes them dense.
        max_windows: windows to decode (default 4; ``None``: all that fit).
        top: sizes of the costliest-layer sets to evaluate after the per-layer sweep (each <= the gated layers;
            default 1, 2 and 4, those below the number of gated layers).
        layer_sets: layer sets to evaluate instead of the per-layer sweep.
        uniform_budgets: budgets to run every layer at as well (default none).
        keep_average: run the chosen sets with the other layers' budget lowered so the mean per-layer budget stays
            at most ``budget`` (needs ``layer_budget``; default False: the other layers keep ``budget``).
        selector: who scores the blocks (`DECODE_SELECTORS`; ``"gate"``, the decode gate, by default).
        batch_size, cache: as in `evaluate_decode`.

    Returns:
        One row per run: ``{run, layers_overridden, layer_overrides (the JSON a user passes to
        SeerAttentionConfig.layer_overrides, on top of decode_token_budget=budget: the row's budget, lowered for the
        sets under keep_average), budget, mean_budget (per layer, sparse runs; the sweep's budgets, not the
        adapter's own overrides), ppl, ppl_delta_pct,
        tokens, sparse_density (kept fraction of the sparse layers' blocks), attended_fraction (over every gated
        layer, dense ones whole), recovered (share of the all-sparse perplexity gap given back)}``; ``dense`` first,
        ``all sparse`` second.
    """
    from tqdm.auto import tqdm

    saved = _check_decode_run(model, "decode_layer_sensitivity", continuation, batch_size, cache)
    decode_block = saved.effective_decode_block_size
    for name, value in [
        ("budget", budget),
        ("layer_budget", layer_budget),
        *(("uniform_budgets", b) for b in uniform_budgets),
    ]:
        if value is not None and (not isinstance(value, int) or value < decode_block):
            raise ValueError(f"{name}={value!r} is below one block of the decode gate ({decode_block} tokens)")
    if selector not in DECODE_SELECTORS:
        raise ValueError(f"selector must be one of {DECODE_SELECTORS}, got {selector!r}")
    if keep_average and layer_budget is None:
        raise ValueError(
            "keep_average needs a layer_budget: dense layers attend the whole context, which no budget elsewhere "
            "can balance"
        )
    layers = sorted(model.gates())
    if layer_sets is not None:
        layer_sets = [sorted({int(layer) for layer in chosen}) for chosen in layer_sets]
        unknown = sorted({layer for chosen in layer_sets for layer in chosen} - set(layers))
        if unknown or not layer_sets or not all(layer_sets):
            raise ValueError(f"layer_sets must be non-empty sets of gated layers {layers}; got {unknown or layer_sets}")
    elif top is None:
        top = [k for k in (1, 2, 4) if k < len(layers)]
    elif any(not isinstance(k, int) or not 1 <= k <= len(layers) for k in top):
        raise ValueError(f"top sizes must lie in 1..{len(layers)} (the gated layers), got {list(top)}")
    if not isinstance(first_window, int) or first_window < 0:
        raise ValueError(f"first_window must be a non-negative int, got {first_window!r}")
    window = prompt_len + continuation
    n_windows = token_ids.numel() // window - first_window
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(
            f"need {first_window + 1} windows of {window} tokens (prompt_len + continuation), got "
            f"{token_ids.numel()} tokens"
        )
    windows = token_ids[first_window * window : (first_window + n_windows) * window].reshape(n_windows, window)
    if cache == "auto":
        cache = "static" if next(model.base_model.parameters()).is_cuda else "dynamic"
    override = {"decode_method": "dense"} if layer_budget is None else {"decode_token_budget": layer_budget}
    scorer = selector if selector in DECODE_SCORERS else None
    runs_total = 2 + (len(layers) if layer_sets is None else 0) + len(layer_sets or top) + len(uniform_budgets)
    bar = tqdm(total=runs_total, disable=not progress, desc="decode layers", unit="run")

    def overrides_of(overridden: list[int]) -> dict[str, dict[str, Any]]:
        return {str(layer): dict(override) for layer in overridden}

    def run(label: str, overridden: list[int], run_budget: int | None) -> dict[str, Any]:
        """One decoding of every window; ``run_budget=None``: every layer dense."""
        merged = {key: dict(value) for key, value in saved.layer_overrides.items()}
        for key, value in overrides_of(overridden).items():
            merged[key] = {**merged.get(key, {}), **value}
        method = {"decode_method": "dense"} if run_budget is None else {"decode_method": "token_budget"}
        model.peft_config[model.active_adapter] = saved.replace(
            dense_below_length=window + 1,  # dense prefill: only the decoding steps differ between runs
            decode_token_budget=budget if run_budget is None else run_budget,
            layer_overrides=merged,
            **method,
        )
        nll, count, densities = 0.0, 0, []
        with decode_block_scorer(model, scorer):
            for first in range(0, n_windows, batch_size):
                for result in decode_continuation(model, windows[first : first + batch_size], prompt_len, cache=cache):
                    nll, count = nll + result["nll"], count + result["count"]
                    densities.append(result["decode_density"])
        density = sum(densities) / len(densities)
        # over every gated layer: with dense overrides the sparse layers' density and the dense layers whole; with a
        # layer budget every layer is sparse and the density already counts them all
        dense_layers = len(layers) if run_budget is None else (len(overridden) if layer_budget is None else 0)
        attended = (
            density if run_budget is None else ((len(layers) - dense_layers) * density + dense_layers) / len(layers)
        )
        bar.update(1)
        return {
            "run": label,
            "layers_overridden": overridden,
            "layer_overrides": overrides_of(overridden),
            "budget": run_budget,
            "ppl": math.exp(nll / count),
            "tokens": count,
            "sparse_density": density,
            "attended_fraction": attended,
        }

    def rest_budget(n_chosen: int) -> int:
        """The budget of the layers outside a set of ``n_chosen``: ``budget``, or under keep_average what keeps the
        mean."""
        if not keep_average:
            return budget
        return budget_keeping_average(budget, layer_budget, n_chosen, len(layers), decode_block)

    # refuse a set too large to balance before any decoding
    for n_chosen in [len(chosen) for chosen in layer_sets or []] + list(top or []):
        rest_budget(n_chosen)
    try:
        dense = run("dense", [], None)
        sparse = run("all sparse", [], budget)
        rows = [dense, sparse]
        if layer_sets is None:
            per_layer = [run(f"layer {layer} overridden", [layer], budget) for layer in layers]
            rows += per_layer
            ranked = [row["layers_overridden"][0] for row in sorted(per_layer, key=lambda row: row["ppl"])]
            chosen_sets = [(f"top {k} overridden", sorted(ranked[:k])) for k in top]
        else:
            chosen_sets = [(f"{len(chosen)} given overridden", chosen) for chosen in layer_sets]
        rows += [run(label, chosen, rest_budget(len(chosen))) for label, chosen in chosen_sets]
        rows += [run(f"all sparse at {b}", [], b) for b in uniform_budgets]
    finally:
        bar.close()
        model.peft_config[model.active_adapter] = saved
    gap = sparse["ppl"] - dense["ppl"]
    for row in rows:
        row["ppl_delta_pct"] = 100.0 * (row["ppl"] / dense["ppl"] - 1.0)
        if row["budget"] is not None and (layer_budget is not None or not row["layers_overridden"]):
            overridden = len(row["layers_overridden"])
            row["mean_budget"] = (row["budget"] * (len(layers) - overridden) + (layer_budget or 0) * overridden) / len(
                layers
            )
        if row is not dense and row is not sparse:
            row["recovered"] = (sparse["ppl"] - row["ppl"]) / gap if gap else float("nan")
    return rows


def format_layer_sensitivity_table(rows: list[dict[str, Any]], single_layers: int = 8) -> str:
    """A text table of `decode_layer_sensitivity` rows (the ``single_layers`` best single-layer overrides only),
    then each chosen set as the ``layer_overrides`` JSON to paste into a config or ``--layer-overrides``."""
    single = [r for r in rows[2:] if r["run"].startswith("layer ")]
    chosen = [r for r in rows[2:] if not r["run"].startswith(("layer ", "all sparse at"))]
    shown = [*rows[:2], *sorted(single, key=lambda r: r["ppl"])[:single_layers]]
    shown += [r for r in rows[2:] if not r["run"].startswith("layer ")]
    lines = [f"{'run':<22} {'Δ% ppl':>8} {'recovered':>9} {'attended':>8} {'mean budget':>11}"]
    for r in shown:
        recovered = f"{r['recovered']:>9.2f}" if "recovered" in r else f"{'-':>9}"
        mean_budget = f"{r['mean_budget']:>11.0f}" if "mean_budget" in r else f"{'-':>11}"
        lines.append(
            f"{r['run']:<22} {r['ppl_delta_pct']:>+8.2f} {recovered} {r['attended_fraction']:>8.3f} {mean_budget}"
        )
    if chosen:
        lines.append("\nthe chosen sets as settings (decode_token_budget of every other layer, then layer_overrides):")
        lines += [
            f"{r['run']:<22} decode_token_budget={r['budget']} {json.dumps(r['layer_overrides'])}" for r in chosen
        ]
    return "\n".join(lines)


def format_decode_table(rows: list[dict[str, Any]]) -> str:
    """A text table of `evaluate_decode` rows."""
    lines = [
        f"{'decode':<13} {'selector':<11} {'setting':>10} {'density':>8} {'ppl':>9} {'Δ%':>7} {'top1%':>6} "
        f"{'greedy%':>8}"
    ]
    for r in rows:
        setting = r.get("token_budget", r.get("threshold", "-"))
        greedy = f"{r['greedy_agreement']:>8.1f}" if "greedy_agreement" in r else f"{'-':>8}"
        lines.append(
            f"{r['decode_method']:<13} {r.get('selector', 'gate'):<11} {setting!s:>10} {r['decode_density']:>8.3f} "
            f"{r['ppl']:>9.3f} "
            f"{r['ppl_delta_pct']:>+7.2f} {r['top1_agreement']:>6.1f} {greedy}"
        )
    return "\n".join(lines)
