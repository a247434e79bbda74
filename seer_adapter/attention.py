"""THE attention function of seer_adapter, registered with transformers' attention interfaces.

transformers calls ``seer_attention_forward(module, q, k, v, attention_mask, ...)`` from every attention
layer of a model whose ``config._attn_implementation`` is ``"seer_attention"``, with post-RoPE
``q [B, Hq, S, D]`` and ``k, v [B, Hkv, Sk, D]`` (GQA not expanded, cache already appended). Here we decide,
per call, between:

* **sparse prefill** — ``S > 1``, no past (``Sk == S``), plain causal mask, ``S >= dense_below_length``:
  invert RoPE, run the layer's gate, select blocks, call the block-sparse kernel dispatch;
* **decode** — ``S == 1``: sparse when the layer has a decode gate and its ``decode_method`` (``layer_overrides``
  applied) is not ``"dense"`` (`_decode_attention`, `seer_adapter.decode`), else dense. Every call of a layer with a
  decode gate and a `DynamicCache` first updates the layer's K-compression cache, whatever path the call then takes;
* **distillation** — when a `DistillationHook` is installed on the runtime, it computes the ground truth
  and the output (the distillation module provides it);
* **dense** — everything else (dense layers, non-gated layers, sliding-window or other non-causal mask
  patterns, prefill with a past cache, short prompts, adapter disabled): the model's *original* attention
  implementation with its own mask, so the result is exactly the base model's.

The mask function registered beside it returns a lazy `SeerAttentionMask`: it keeps the arguments of the
mask call and materialises the original implementation's mask only when a dense path needs it, so long
sparse prefills never build an ``[S, S]`` mask.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import AttentionInterface
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    causal_mask_function,
    eager_mask,
    prepare_padding_mask,
    sdpa_mask,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .decode import (
    CompressedKeys,
    DecodeCacheError,
    SeerStaticCache,
    StaticStepBlocks,
    as_seer_cache,
    select_scored_blocks,
    static_step_blocks,
    update_compressed_keys,
    update_compressed_keys_static,
    with_current_block,
)
from .gate import block_has_tokens
from .kernels import (
    BlockLists,
    block_sparse_attention,
    decode_gate_scores,
    select_block_lists,
    sparse_decode_attention,
)
from .kernels.gate_pooling import pool_pre_rope_blocks
from .rope import apply_rope

if TYPE_CHECKING:
    from .config import SeerAttentionConfig

ATTN_IMPLEMENTATION = "seer_attention"


# ------------------------------------------------------------------------------------------------------
# mask function
# ------------------------------------------------------------------------------------------------------
def eager_mask_without_host_copy(**mask_kwargs: Any) -> torch.Tensor | None:
    """transformers' ``eager_mask`` (its ``sdpa_mask``, cast to 0 / dtype minimum) with the 0 made on the device.

    Some transformers 5.x releases (5.17 on our GPU machine) make that 0 with ``torch.tensor(0.0, device=...)``, a
    copy from pageable host memory that CUDA-graph capture refuses; static decoding steps of eager-attention models
    (Gemma-2's default) build their masks inside the capture, so they use this while capturing.
    Returns the same float mask ``[B, 1, q, kv]`` (or None when ``sdpa_mask`` may skip it).
    """
    kwargs = dict(mask_kwargs)
    dtype = kwargs.pop("dtype", torch.float32)
    kwargs.pop("allow_is_causal_skip", None)
    mask = sdpa_mask(**kwargs, allow_is_causal_skip=False)
    if mask is None:
        return None
    return torch.where(mask, torch.zeros((), device=mask.device, dtype=dtype), torch.finfo(dtype).min)


class SeerAttentionMask:
    """What the ``seer_attention`` mask function returns: the mask call's arguments, materialised lazily.

    Attributes:
        q_length, kv_length: query and key lengths the mask was made for.
        key_padding_mask: bool ``[B, kv_length]`` (True = real token) or ``None`` when nothing is padded (for a
            single-token query, the model's mask is kept even when nothing is padded: no host synchronisation).
        is_plain_causal: the pattern is causal + padding only (no sliding window, packing or custom parts),
            the only pattern the sparse path implements.
    """

    def __init__(self, mask_kwargs: dict[str, Any]):
        self.mask_kwargs = mask_kwargs
        self.q_length: int = int(mask_kwargs["q_length"])
        self.kv_length: int = int(mask_kwargs["kv_length"])
        kv_offset = int(mask_kwargs.get("kv_offset", 0) or 0)
        padding = prepare_padding_mask(mask_kwargs.get("attention_mask"), self.kv_length, kv_offset)
        if padding is not None:
            padding = padding[:, kv_offset : kv_offset + self.kv_length].to(torch.bool)
            # Dropping an all-true mask lets prefill take its unpadded paths, but the check waits for the GPU; a
            # decoding step keeps the mask instead (its kernels read it cheaply), so host and GPU overlap.
            if self.q_length > 1 and bool(padding.all()):
                padding = None
        self.key_padding_mask: torch.Tensor | None = padding
        self.is_plain_causal = (
            mask_kwargs.get("mask_function", causal_mask_function) is causal_mask_function
            and mask_kwargs.get("local_size") is None
        )
        self._materialised: dict[str, Any] = {}
        self._per_forward: dict[Any, Any] = {}  # sink blocks and static-step blocks per block size, once per forward

    def materialize(self, attn_implementation: str) -> Any:
        """The mask ``attn_implementation``'s own mask function makes from the same arguments (cached)."""
        if attn_implementation not in self._materialised:
            mask_fn = ALL_MASK_ATTENTION_FUNCTIONS[attn_implementation]
            if mask_fn is eager_mask and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                mask_fn = eager_mask_without_host_copy
            self._materialised[attn_implementation] = mask_fn(**self.mask_kwargs)
        return self._materialised[attn_implementation]

    def first_real_block(self, block_size: int) -> torch.Tensor:
        """long ``[B]``: the key block of each row's first real token (the sink block), computed once per forward
        and block size (every layer of a forward shares this mask)."""
        if block_size not in self._per_forward:
            padding = self.key_padding_mask
            if padding is None:
                raise ValueError("no padding mask: every row's first real token is in block 0")
            self._per_forward[block_size] = padding.to(torch.int8).argmax(dim=-1) // block_size
        return self._per_forward[block_size]

    def static_step_blocks(self, slot: torch.Tensor, block_size: int) -> StaticStepBlocks:
        """`seer_adapter.decode.StaticStepBlocks` of a static decoding step at ``slot`` (computed once per forward and
        block size: every layer of the step shares them)."""
        key = ("static", block_size)
        if key not in self._per_forward:
            if self.key_padding_mask is None:
                raise DecodeCacheError("a static decoding step needs the [B, max_cache_len] padding mask of its runner")
            self._per_forward[key] = static_step_blocks(slot, self.key_padding_mask, block_size)
        return self._per_forward[key]

    def _not_a_tensor(self) -> TypeError:
        return TypeError(
            "a SeerAttentionMask (the lazy mask seer_adapter's attention builds inside the model) was handed back to "
            "the model as its attention_mask: transformers prepares masks outside the forward for static caches and "
            "compiled generation (generate(cache_implementation='static'), StaticCache), which seer_adapter does not "
            "support. Generate with the default dynamic cache (seer_adapter.SeerDynamicCache for sparse decoding), or "
            "pass past_key_values=seer_adapter.SeerStaticCache(config=..., max_cache_len=...) for fixed-capacity "
            "decoding replayed as a CUDA graph."
        )

    @property
    def ndim(self) -> int:
        """Not a tensor: transformers asks for ``ndim`` only when this mask is fed back as an input (static caches)."""
        raise self._not_a_tensor()

    @property
    def shape(self) -> torch.Size:
        """Not a tensor (see `ndim`)."""
        raise self._not_a_tensor()

    def __repr__(self) -> str:
        padded = "none" if self.key_padding_mask is None else f"{int((~self.key_padding_mask).sum())} tokens"
        return (
            f"SeerAttentionMask(q_length={self.q_length}, kv_length={self.kv_length}, padding={padded}, "
            f"plain_causal={self.is_plain_causal})"
        )


def seer_attention_mask(**mask_kwargs: Any) -> SeerAttentionMask:
    """Mask function registered with `AttentionMaskInterface` under ``"seer_attention"``."""
    return SeerAttentionMask(mask_kwargs)


# ------------------------------------------------------------------------------------------------------
# per-layer and per-model state
# ------------------------------------------------------------------------------------------------------
class DistillationHook(Protocol):
    """Installed on `SeerRuntime.distillation` by `seer_adapter.distill`: computes the attention output (which the
    frozen model continues with) and records the layer's gate loss against the ground truth."""

    def __call__(
        self,
        module: torch.nn.Module,
        layer: SeerLayerState,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: SeerAttentionMask,
        scaling: float | None,
        **kwargs: Any,
    ) -> torch.Tensor: ...


class BlockScorer(Protocol):
    """Replaces the gate's block probabilities (evaluation baselines: MoBA-style, oracle, random).

    Returns scores ``[B, Hq, nQ, nK]``; only their order within a row matters for top-k methods.
    """

    def __call__(
        self,
        module: torch.nn.Module,
        layer: SeerLayerState,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: SeerAttentionMask,
        scaling: float | None,
        allowed: torch.Tensor,
    ) -> torch.Tensor: ...


class DecodeBlockScorer(Protocol):
    """Replaces the decode gate's logits in a sparse decoding step (evaluation baselines: oracle, MoBA-style).

    Returns logits ``[B, Hkv, n_earlier]`` of the strictly earlier key blocks, one row per KV head: top-k reads their
    order, the threshold method their softmax. In a shape-static step (`SeerStaticCache`) ``key`` is the whole
    buffer, ``n_earlier`` every block but the last and ``query_position`` the new token's slot (long ``[1]`` on the
    device; None in dynamic steps, where the query is the last key): the columns from the query's block on are
    discarded by the caller.
    """

    def __call__(
        self,
        module: torch.nn.Module,
        layer: SeerLayerState,
        query: torch.Tensor,
        key: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        scaling: float | None,
        n_earlier: int,
        softcap: float | None,
        query_position: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


@dataclass
class SeerRuntime:
    """State shared by every layer of one wrapped model (owned by `SeerModel`)."""

    original_attn_implementation: str
    configs: dict[str, SeerAttentionConfig]
    active_adapter: str = "default"
    adapter_enabled: bool = True
    distillation: DistillationHook | None = None
    # when set, replaces the gate's probabilities in sparse prefill (evaluation baselines)
    block_scorer: BlockScorer | None = None
    # when set, replaces the decode gate's logits in sparse decoding steps (evaluation baselines)
    decode_block_scorer: DecodeBlockScorer | None = None
    record_gate_outputs: bool = False
    # layer_idx -> statistics of the layer's last call (sparse calls: "kept_blocks" and "causal_blocks" are the per-row
    # int32 count tensors, summed by SeerModel.sparsity_stats)
    stats: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def config(self) -> SeerAttentionConfig:
        return self.configs[self.active_adapter]


@dataclass
class SeerLayerState:
    """Plain (non-module) state attached to an attention module as ``module.seer_state``."""

    layer_idx: int
    runtime: SeerRuntime
    rope_style: str | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    # the KV cache object the attention module received in this call (captured like position_embeddings)
    cache: Any = None
    # the layer's K-compression cache after this call's update (None without a decode gate or a DynamicCache)
    compressed_keys: CompressedKeys | None = None
    # filled when runtime.record_gate_outputs: gate probabilities and kept blocks of the last sparse call
    last_gate_probs: torch.Tensor | None = None
    last_block_mask: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------------------
# the attention function
# ------------------------------------------------------------------------------------------------------
def seer_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention function registered with `AttentionInterface` under ``"seer_attention"``.

    Args:
        module: the attention module (carries ``seer_state`` and ``seer_gate`` when gated).
        query: ``[B, Hq, S, D]`` post-RoPE; key, value: ``[B, Hkv, Sk, D]``.
        attention_mask: a `SeerAttentionMask` (or whatever the model passed when it built its own mask).
        scaling: softmax scale; dropout: attention dropout probability.

    Returns:
        ``(out [B, S, Hq, D], None)`` as every transformers attention function.
    """
    state: SeerLayerState | None = getattr(module, "seer_state", None)
    if state is None:
        raise RuntimeError(
            f"{type(module).__name__} runs attn_implementation={ATTN_IMPLEMENTATION!r} but has no seer gate state; "
            "wrap the model with seer_adapter.get_seer_model instead of setting the implementation by hand."
        )
    runtime = state.runtime
    if not runtime.adapter_enabled:
        return _dense_attention(module, query, key, value, attention_mask, scaling, dropout, state, None, **kwargs)
    if runtime.active_adapter not in module.seer_gate:  # adapters may target different layers
        return _dense_attention(module, query, key, value, attention_mask, scaling, dropout, state, "no gate", **kwargs)
    config = runtime.config
    if runtime.distillation is not None:  # every gated layer is trained, dense_layers included
        reason = _why_not_sparse(query, key, attention_mask, dropout, None, kwargs)
        if reason is not None:
            raise RuntimeError(f"layer {state.layer_idx}: distillation needs a gated prefill, but {reason}.")
        out = runtime.distillation(module, state, query, key, value, attention_mask, scaling, **kwargs)
        return out.transpose(1, 2).contiguous(), None
    if state.layer_idx in config.dense_layers:
        return _dense_attention(
            module, query, key, value, attention_mask, scaling, dropout, state, "dense layer", **kwargs
        )
    decode_gate = module.seer_gate[runtime.active_adapter].decode
    state.compressed_keys = None
    if decode_gate is not None and state.cache is not None:
        _track_compressed_keys(module, state, decode_gate, query, key, attention_mask)
    if query.shape[2] == 1:
        return _decode_attention(module, query, key, value, attention_mask, scaling, dropout, state, **kwargs)

    reason = _why_not_sparse(query, key, attention_mask, dropout, config, kwargs)
    if reason is not None:
        return _dense_attention(module, query, key, value, attention_mask, scaling, dropout, state, reason, **kwargs)
    return _sparse_prefill(module, query, key, value, attention_mask, scaling, state, **kwargs)


def _why_not_sparse(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: Any,
    dropout: float,
    config: SeerAttentionConfig | None,
    kwargs: dict[str, Any],
) -> str | None:
    """Why this prefill call must run dense, or ``None`` when the sparse path applies.

    ``config=None`` skips the length check (distillation gates every length)."""
    if not isinstance(mask, SeerAttentionMask):
        return "the model passed a mask of its own making"
    if not mask.is_plain_causal:
        return "the mask is not plain causal (sliding window or custom pattern)"
    if key.shape[2] != query.shape[2]:
        return "prefill continues a past cache (not gated yet)"
    if query.shape[2] == 1:
        return "a single query token"
    if config is not None and query.shape[2] < config.dense_below_length:
        return f"prefill shorter than dense_below_length={config.dense_below_length}"
    if dropout > 0.0:
        return "attention dropout is on (module in training mode)"
    if kwargs.get("s_aux") is not None:
        return "the layer uses attention sinks (s_aux)"
    return None


def gate_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over key blocks in fp32; rows without any allowed block give zeros instead of NaN."""
    return torch.softmax(logits.float(), dim=-1).nan_to_num(0.0)


def _rope_tables(module: torch.nn.Module, state: SeerLayerState, need: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's RoPE tables ``(cos, sin)``; refuses a rotary convention we could not identify (``need`` says why
    the gate must undo RoPE)."""
    if state.rope_style is None:
        raise RuntimeError(
            f"{type(module).__name__} uses rotary embeddings of a convention seer_adapter could not identify; "
            f"{need}. Please report the model family."
        )
    return state.position_embeddings


def compute_gate_logits(
    state: SeerLayerState,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Run the layer's active gate on post-RoPE ``query [B, Hq, S, D]`` / ``key [B, Hkv, S, D]``.

    Pools pre-RoPE Q / K per block straight from the post-RoPE tensors with the fused `pool_pre_rope_blocks`
    (inverse RoPE with the ``position_embeddings`` the module received; fp32, nothing of size ``[.., S, D]`` is
    materialised), takes the RoPE tables at each block's first token for block RoPE, and returns
    `AttnGate.logits_from_pooled`: logits ``[B, Hq, nB, nB]`` in the gate dtype (``-inf`` where not allowed),
    differentiable in the gate's weights (``query`` / ``key`` get no gradient; pass them detached under grad mode).
    """
    gate = module.seer_gate[state.runtime.active_adapter]
    if query.shape[1] != gate.num_q_heads or key.shape[1] != gate.num_kv_heads or query.shape[-1] != gate.head_dim:
        raise RuntimeError(
            f"layer {state.layer_idx}: the gate was built for {gate.num_q_heads} query / {gate.num_kv_heads} KV "
            "heads of "
            f"dim {gate.head_dim}, but the layer computes {query.shape[1]} / {key.shape[1]} of dim {query.shape[-1]}; "
            "the model config's head counts do not describe this layer."
        )
    block_size = gate.block_size
    cos = sin = block_cos = block_sin = None
    style = state.rope_style or "half"
    if state.position_embeddings is not None:
        cos, sin = _rope_tables(module, state, "the gate needs pre-RoPE Q/K")
        block_cos, block_sin = cos[..., ::block_size, :], sin[..., ::block_size, :]
    pooling = {"rope_style": style, "block_size": block_size, "token_valid": key_padding_mask}
    q_pooled = pool_pre_rope_blocks(query, cos, sin, poolings=gate.q_pooling, **pooling)  # [B, Hq, nB, Pq·D] fp32
    k_pooled = pool_pre_rope_blocks(key, cos, sin, poolings=gate.k_pooling, **pooling)  # [B, Hkv, nB, Pk·D] fp32
    return gate.logits_from_pooled(
        q_pooled,
        k_pooled,
        block_cos=block_cos,
        block_sin=block_sin,
        rope_style=style,
        block_valid=block_has_tokens(key_padding_mask, block_size),
    )


def compute_decode_gate_logits(
    state: SeerLayerState,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    query_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode-gate logits of every token of a prefill against its strictly earlier key blocks (for distillation).

    Same computation as a decoding step (`_decode_attention` with `seer_adapter.decode`): each token's pre-RoPE query
    heads merged per KV head and rotated at the token's position; keys pooled per block of slots, projected and
    rotated at the block's first slot.

    Args:
        query: post-RoPE ``[B, Hq, S, D]``; key: post-RoPE ``[B, Hkv, S, D]`` (prefill without a past).
        key_padding_mask: optional bool ``[B, S]``.
        query_rows: optional long ``[R]``: the token positions to score (default all ``S``; the keys are always
            every block).

    Returns:
        ``[B, Hkv, R, nK]`` (``R = S`` by default) in the gate dtype, ``-inf`` on blocks not strictly earlier than
        the token's block and on blocks without a real token; differentiable in the decode gate's weights.
    """
    gate = module.seer_gate[state.runtime.active_adapter].decode
    if gate is None:
        raise RuntimeError(f"layer {state.layer_idx}: the active adapter has no decode gate (decode_gate=False)")
    block_size = gate.block_size
    cos = sin = block_cos = block_sin = None
    style = state.rope_style or "half"
    length = query.shape[2]
    if query_rows is None:
        rows, q_pre = torch.arange(length, device=query.device), query.float()  # [B, Hq, S, D]
    else:
        rows = query_rows.to(query.device)
        q_pre = query[:, :, rows].float()  # [B, Hq, R, D]
    q_cos = q_sin = None
    if state.position_embeddings is not None:
        cos, sin = _rope_tables(module, state, "the decode gate needs pre-RoPE Q/K")
        block_cos, block_sin = cos[..., ::block_size, :], sin[..., ::block_size, :]
        q_cos, q_sin = (cos, sin) if query_rows is None else (cos[..., rows, :], sin[..., rows, :])
        q_pre = apply_rope(q_pre, q_cos, q_sin, style, inverse=True)
    k_pooled = pool_pre_rope_blocks(
        key, cos, sin, rope_style=style, block_size=block_size, poolings=gate.k_pooling, token_valid=key_padding_mask
    )  # [B, Hkv, nK, Pk·D] fp32
    q_gate = gate.query(q_pre, q_cos, q_sin, style)  # [B, Hkv, R, G]
    k_gate = gate.keys(k_pooled, block_cos, block_sin, style)  # [B, Hkv, nK, G]
    n_blocks = k_gate.shape[2]
    token_block = rows // block_size
    allowed = torch.arange(n_blocks, device=query.device)[None, :] < token_block[:, None]  # [R, nK]
    valid = block_has_tokens(key_padding_mask, block_size)
    allowed = (allowed[None] if valid is None else allowed[None] & valid[:, None, :])[:, None]  # [B or 1, 1, R, nK]
    logits = gate.logits(q_gate, k_gate, allowed)  # [B, Hkv, R, nK]
    return logits.masked_fill(~allowed, float("-inf"))


def _sparse_prefill(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: SeerAttentionMask,
    scaling: float | None,
    state: SeerLayerState,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    config = state.runtime.config
    block_size = config.block_size
    padding = mask.key_padding_mask  # [B, S] or None
    q_len = query.shape[2]
    with torch.no_grad():  # the gate is trained by distillation, never through the sparse path
        logits = compute_gate_logits(state, module, query, key, padding)  # [B, Hq, nB, nB]
        scores, apply_softmax = logits, True
        if state.runtime.block_scorer is not None:
            allowed = torch.isfinite(logits)
            scores = state.runtime.block_scorer(module, state, query, key, value, mask, scaling, allowed)
            apply_softmax = False  # scorers return probabilities (or any monotone score) per block
        sink = None
        if config.force_sink_block:
            sink = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
            if padding is not None:
                sink = padding.to(torch.int8).argmax(dim=-1) // block_size
        # Scores -> sorted kept-block lists in one fused kernel on CUDA (no boolean mask, no host sync).
        lists, allowed_counts = select_block_lists(
            scores,
            block_size=block_size,
            q_len=q_len,
            kv_len=key.shape[2],
            block_valid=block_has_tokens(padding, block_size),
            apply_softmax=apply_softmax,
            sink_block=sink,
            force_local_block=config.force_local_block,
            dense_last_query_blocks=config.dense_last_query_blocks,
            **_method_kwargs(config.sparsity_for_layer(state.layer_idx)),
        )
    out = block_sparse_attention(
        query,
        key,
        value,
        lists,
        block_size=block_size,
        scale=scaling,
        key_padding_mask=padding,
        softcap=kwargs.get("softcap"),
    )  # [B, Hq, S, D]
    # Per-row counts stay on the device, unsummed: reading them (SeerModel.sparsity_stats) sums and synchronises.
    state.runtime.stats[state.layer_idx] = {
        "mode": "sparse",
        "q_len": q_len,
        "kept_blocks": lists.counts,
        "causal_blocks": allowed_counts,
    }
    if state.runtime.record_gate_outputs:
        probs = gate_probabilities(logits) if apply_softmax else scores
        state.last_gate_probs, state.last_block_mask = probs, lists.to_mask()
    return out.transpose(1, 2).contiguous(), None


def _method_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": settings["sparsity_method"],
        "threshold": settings["threshold"],
        "nz_ratio": settings["nz_ratio"],
        "token_budget": settings["token_budget"],
    }


def _track_compressed_keys(
    module: torch.nn.Module,
    state: SeerLayerState,
    decode_gate: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    mask: Any,
) -> None:
    """Append this call's new slots to the layer's K-compression cache (`seer_adapter.decode`).

    Needs a `DynamicCache` (converted in place to `SeerDynamicCache`) and a plain causal `SeerAttentionMask` (for the
    padding); otherwise the layer's compression state is dropped, and a later sparse decoding step raises.
    """
    cache = as_seer_cache(state.cache)
    if cache is None:
        return
    if not isinstance(mask, SeerAttentionMask) or not mask.is_plain_causal:
        cache.seer_keys.pop(state.layer_idx, None)
        return
    cos = sin = None
    if state.position_embeddings is not None:
        cos, sin = _rope_tables(module, state, "the decode gate needs pre-RoPE keys")
    if _static_step(state) is not None:
        _track_compressed_keys_static(state, cache, decode_gate, key, mask, cos, sin)
        return
    try:
        with torch.no_grad():
            state.compressed_keys = update_compressed_keys(
                cache,
                state.layer_idx,
                decode_gate,
                key,
                query.shape[2],
                mask.key_padding_mask,
                cos,
                sin,
                state.rope_style or "half",
                state.runtime.active_adapter,
                _decode_key_dtype(state),
            )
    except DecodeCacheError:
        if _layer_decode_settings(state)["decode_method"] != "dense":
            raise
        # Dense decoding does not need the compressed keys: forget them; switching to a sparse decode_method later
        # in this generation raises then.
        cache.seer_keys.pop(state.layer_idx, None)


def _decode_key_dtype(state: SeerLayerState) -> torch.dtype | None:
    """The compressed keys' dtype a new K-compression cache takes (``decode_key_dtype``; ``None``: the gate's)."""
    name = state.runtime.config.decode_key_dtype
    return None if name is None else getattr(torch, name)


def _layer_decode_settings(state: SeerLayerState) -> dict[str, Any]:
    """The decode selection fields in force for this layer (``layer_overrides`` applied)."""
    return state.runtime.config.sparsity_for_layer(state.layer_idx)


def _static_step(state: SeerLayerState) -> SeerStaticCache | None:
    """The layer's cache when this call is a shape-static decoding step (`SeerStaticCache.begin_static_step`)."""
    cache = state.cache
    return cache if isinstance(cache, SeerStaticCache) and cache.static_slot is not None else None


def _track_compressed_keys_static(
    state: SeerLayerState,
    cache: SeerStaticCache,
    decode_gate: torch.nn.Module,
    key: torch.Tensor,
    mask: SeerAttentionMask,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> None:
    """`_track_compressed_keys` for a static step: recompress the current block in place (no host sync)."""
    layer_idx = state.layer_idx
    compressed = cache.seer_keys.get(layer_idx)
    adapter = state.runtime.active_adapter
    problem = None
    if compressed is None:
        problem = "has no compressed keys (the prompt was not prefilled with this decode gate on)"
    elif compressed.adapter_name != adapter:
        problem = f"holds compressed keys of adapter {compressed.adapter_name!r}, not the active {adapter!r}"
    elif compressed.n_slots != cache.get_seq_length():
        problem = f"holds compressed keys of {compressed.n_slots} slots, the KV cache {cache.get_seq_length()}"
    if problem is not None:
        cache.seer_keys.pop(layer_idx, None)
        if _layer_decode_settings(state)["decode_method"] != "dense":
            raise DecodeCacheError(f"layer {layer_idx}: this SeerStaticCache {problem}; start from an empty cache.")
        return
    with torch.no_grad():
        update_compressed_keys_static(
            compressed,
            decode_gate,
            key,
            cache.static_slot,
            mask.static_step_blocks(cache.static_slot, decode_gate.block_size),
            cos,  # a static step is one token: the model's tables, the same objects for every layer
            sin,
            state.rope_style or "half",
        )
    cache.mark_static_updates((layer_idx,))
    state.compressed_keys = compressed


def _decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None,
    dropout: float,
    state: SeerLayerState,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One new token per sequence: sparse with the layer's decode gate, else the base model's dense attention.

    Sparse decoding scores the strictly earlier blocks of the K-compression cache with the merged query of each GQA
    group (`decode_gate_scores`, or an evaluation scorer), selects blocks per KV head (`select_scored_blocks`; the new
    token's block and the sink block always) and attends through `sparse_decode_attention`. On a `SeerStaticCache`
    step the same path runs shape-static: whole buffers, the current block read from the device.
    """
    settings = _layer_decode_settings(state)
    decode_gate = module.seer_gate[state.runtime.active_adapter].decode
    args = (module, query, key, value, attention_mask, scaling, dropout, state)
    if decode_gate is None:
        return _dense_attention(*args, "decode", **kwargs)
    if settings["decode_method"] == "dense":
        return _dense_attention(*args, "decode_method='dense'", **kwargs)
    if not isinstance(attention_mask, SeerAttentionMask):
        return _dense_attention(*args, "the model passed a mask of its own making", **kwargs)
    if not attention_mask.is_plain_causal:
        return _dense_attention(*args, "the mask is not plain causal (sliding window or custom pattern)", **kwargs)
    if dropout > 0.0:
        return _dense_attention(*args, "attention dropout is on (module in training mode)", **kwargs)
    if kwargs.get("s_aux") is not None:
        return _dense_attention(*args, "the layer uses attention sinks (s_aux)", **kwargs)
    compressed = state.compressed_keys
    if compressed is None:
        raise DecodeCacheError(
            f"layer {state.layer_idx}: sparse decoding needs the K-compression cache, which lives in a "
            f"seer_adapter.SeerDynamicCache (a transformers DynamicCache is converted when first filled); got "
            f"{type(state.cache).__name__}. Pass past_key_values=SeerDynamicCache(config=model.config), or set "
            "decode_method='dense'."
        )
    block_size = decode_gate.block_size
    padding = attention_mask.key_padding_mask  # [B, Sk] or None
    batch, kv_len = query.shape[0], key.shape[2]
    n_blocks = -(-kv_len // block_size)
    static_cache = _static_step(state)
    if static_cache is None:  # the cache's own length: the current block is the last one
        keys, valid = compressed.keys, compressed.block_valid_through(n_blocks)  # [B, Hkv, nB - 1, G], [B, nB]
        n_earlier: int | torch.Tensor = n_blocks - 1
        current = None
    else:
        # A shape-static step (CUDA graphs): whole buffers of the capacity, the current block read from the device;
        # blocks after it are not written yet and not allowed, so the kept blocks equal the dynamic step's.
        if state.runtime.record_gate_outputs:
            raise NotImplementedError(
                "record_gate_outputs reads host-side lengths, which a static decoding step does not have: record with "
                "a SeerDynamicCache."
            )
        keys, valid, _, _ = compressed.static_buffers()
        keys, valid = keys[:, :, :n_blocks], valid[:, :n_blocks]
        current = attention_mask.static_step_blocks(static_cache.static_slot, block_size).block  # long [1]
        n_earlier = current
    with torch.no_grad():
        scorer = state.runtime.decode_block_scorer
        if scorer is None:  # one fused kernel on CUDA: inverse RoPE, group merge, RoPE, dot products
            cos = sin = None
            if state.position_embeddings is not None:
                cos, sin = (table[:, -1] if table.dim() == 3 else table[-1:] for table in state.position_embeddings)
            scores = decode_gate_scores(
                query[:, :, 0],
                cos,
                sin,
                decode_gate.q_proj.weight,
                keys,
                n_earlier,
                rope_style=state.rope_style or "half",
                scale=1.0 / math.sqrt(decode_gate.gate_dim),
                num_queries=decode_gate.num_queries,
                query_merge=decode_gate.query_merge,
                block_valid=valid,
            )  # [B, Hkv, 1, nB], the lowest float from the current block on
        else:
            position = None if static_cache is None else static_cache.static_slot
            logits = scorer(module, state, query, key, padding, scaling, n_blocks - 1, kwargs.get("softcap"), position)
            scores = with_current_block(logits)  # [B, Hkv, 1, nB]
            if current is not None:  # static: the buffer's blocks from the current one on are not earlier
                later = torch.arange(n_blocks, device=scores.device) >= current
                scores = scores.masked_fill(later, torch.finfo(torch.float32).min)
        # the sink block [B]: from the padding mask, once per forward (the layers share the mask); 0 without padding
        if padding is None:
            sink = query.new_zeros(batch, dtype=torch.long)
        else:
            sink = attention_mask.first_real_block(block_size)
        indices, counts, allowed = select_scored_blocks(
            scores,
            valid,
            sink,
            method=settings["decode_method"],
            block_size=block_size,
            token_budget=settings["decode_token_budget"],
            threshold=settings["decode_threshold"],
            current_block=current,
        )
    out = sparse_decode_attention(
        query[:, :, 0],
        key,
        value,
        indices,
        counts,
        block_size=block_size,
        scale=scaling,
        key_padding_mask=padding,
        softcap=kwargs.get("softcap"),
    )  # [B, Hq, D]
    state.runtime.stats[state.layer_idx] = {
        "mode": "sparse",
        "phase": "decode",
        "q_len": 1,
        "kept_blocks": counts,
        # blocks holding a real token (the current one included): the density denominator
        "causal_blocks": allowed,
    }
    if state.runtime.record_gate_outputs:
        padding_only = ~valid[:, None, :-1]
        logits = scores[:, :, 0, :-1]  # [B, Hkv, nB - 1]
        state.last_gate_probs = torch.softmax(logits.masked_fill(padding_only, float("-inf")), dim=-1)
        state.last_gate_probs = state.last_gate_probs.nan_to_num(0.0)
        state.last_block_mask = BlockLists(indices[:, :, None], counts[:, :, None], n_blocks).to_mask()[:, :, 0]
    return out[:, None].contiguous(), None


def _dense_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None,
    dropout: float,
    state: SeerLayerState,
    reason: str | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's original attention implementation with its own mask: exactly the base model."""
    implementation = state.runtime.original_attn_implementation
    if isinstance(attention_mask, SeerAttentionMask):
        attention_mask = attention_mask.materialize(implementation)
    if reason is not None:
        state.runtime.stats[state.layer_idx] = {
            "mode": "dense",
            "reason": reason,
            "q_len": query.shape[2],
            "density": 1.0,
        }
    return original_attention_function(module, implementation)(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


def original_attention_function(module: torch.nn.Module, implementation: str) -> Callable[..., Any]:
    """The function transformers would call for ``implementation`` in ``module``'s model family."""
    if implementation == "eager":
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise RuntimeError(f"cannot find eager_attention_forward for {type(module).__name__}")
        return eager
    return ALL_ATTENTION_FUNCTIONS[implementation]


def register_attention() -> None:
    """Register the attention and mask functions under ``"seer_attention"`` (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, seer_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, seer_attention_mask)
