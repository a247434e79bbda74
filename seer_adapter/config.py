"""`SeerAttentionConfig`: every knob of the adapter, validated, with a JSON round trip.

The layout follows PEFT's tuner configs: a dataclass whose fields carry their help text in
``metadata["help"]``, validation in ``__post_init__``, and ``save_pretrained`` / ``from_pretrained``
that read and write ``adapter_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .kernels.decode_scores import QUERY_MERGES

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TYPE = "SEER_ATTENTION"

SPARSITY_METHODS = ("threshold", "nz_ratio", "token_budget", "dense")
DECODE_METHODS = ("token_budget", "threshold", "dense")
POOLING_TYPES = ("avg", "max", "min")
# Fields a per-layer override may set (prefill selection, then decode selection); everything else is shared by all
# layers.
LAYER_OVERRIDABLE_FIELDS = (
    "sparsity_method",
    "threshold",
    "nz_ratio",
    "token_budget",
    "decode_method",
    "decode_token_budget",
    "decode_threshold",
)
# Fields that describe the base model the gates were built for; filled by `get_seer_model`.
BASE_MODEL_FIELDS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")


class SeerConfigError(ValueError):
    """An invalid value in a `SeerAttentionConfig`; the message names the field and what is allowed."""


@dataclass
class SeerAttentionConfig:
    """Configuration of a SeerAttention adapter (gates + sparse attention settings).

    The gate architecture fields (``block_size``, ``gate_dim``, poolings, ``use_q_proj``) fix the shape of
    the trained weights and cannot change after training. The sparsity fields (``sparsity_method``,
    ``threshold``, ``nz_ratio``, ``token_budget``, forced blocks, ``dense_*``, ``layer_overrides``) only
    decide which blocks are kept and may be changed at load time or at run time
    (`SeerModel.set_sparsity`).

    Example:
        >>> cfg = SeerAttentionConfig(sparsity_method="nz_ratio", nz_ratio=0.3)
        >>> SeerAttentionConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    # --- PEFT bookkeeping -------------------------------------------------------------------------
    peft_type: str = field(default=PEFT_TYPE, metadata={"help": "Adapter type tag; always 'SEER_ATTENTION'."})
    task_type: str = field(default="CAUSAL_LM", metadata={"help": "PEFT task type; only 'CAUSAL_LM' is supported."})
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Name or path of the base model; filled from the model when unset."}
    )
    revision: str | None = field(default=None, metadata={"help": "Revision of the base model on the Hub, if any."})
    inference_mode: bool = field(
        default=False, metadata={"help": "If True the gates are frozen (requires_grad=False) after loading."}
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names (full dotted names or name suffixes such as 'self_attn') of the attention modules that get "
            "a gate. Unset: every attention module of the model that uses transformers' attention interface "
            "and is not a sliding-window layer."
        },
    )

    # --- gate architecture (fixed once trained) ---------------------------------------------------
    block_size: int = field(default=64, metadata={"help": "Tokens per query/key block of the block mask."})
    gate_dim: int | None = field(
        default=None,
        metadata={"help": "Width of the gate's projected Q/K. Unset: the model's head_dim (required for RoPE models)."},
    )
    q_pooling: list[str] = field(
        default_factory=lambda: ["avg"],
        metadata={"help": "Poolings of Q over each block, concatenated along channels; any of 'avg', 'max', 'min'."},
    )
    k_pooling: list[str] = field(
        default_factory=lambda: ["max", "min", "avg"],
        metadata={"help": "Poolings of K over each block, concatenated along channels; any of 'avg', 'max', 'min'."},
    )
    use_q_proj: bool = field(
        default=False,
        metadata={
            "help": "Give the gate a per-head Q linear (pooled Q channels -> gate_dim). The released design has none, "
            "which needs q_pooling == ['avg'] and gate_dim == head_dim."
        },
    )
    gate_dtype: str = field(
        default="float32",
        metadata={"help": "Dtype of the gate weights and gate arithmetic ('float32', 'bfloat16', 'float16')."},
    )

    # --- sparsity (may change at load or run time) -------------------------------------------------
    sparsity_method: str = field(
        default="threshold",
        metadata={
            "help": "How gate probabilities become a block mask: 'threshold' (keep p > threshold), 'nz_ratio' (top-k "
            "per row so that about nz_ratio of the causal triangle is kept), 'token_budget' (top "
            "token_budget/block_size blocks per row) or 'dense' (keep every causal block; still runs the "
            "gate and the block-sparse kernel)."
        },
    )
    threshold: float = field(
        default=5e-4, metadata={"help": "Keep blocks whose gate probability exceeds this (0 < threshold < 1)."}
    )
    nz_ratio: float = field(
        default=0.5, metadata={"help": "Target kept fraction of the causal block triangle (0 < nz_ratio <= 1)."}
    )
    token_budget: int = field(
        default=2048, metadata={"help": "Tokens each query block may attend to (a multiple of block_size is exact)."}
    )
    force_sink_block: bool = field(
        default=True, metadata={"help": "Always keep the first non-padding key block (the attention sink)."}
    )
    force_local_block: bool = field(
        default=True, metadata={"help": "Always keep the diagonal (local) block of every query block."}
    )
    dense_last_query_blocks: int = field(
        default=0, metadata={"help": "Run this many final query-block rows dense (every causal block kept)."}
    )
    dense_layers: list[int] = field(
        default_factory=list,
        metadata={"help": "Layer indices that run the base model's own dense attention (their gates stay unused)."},
    )
    dense_below_length: int = field(
        default=1024,
        metadata={
            "help": "Prefill shorter than this many query tokens runs dense, where block sparsity cannot pay for "
            "the gate. 0 gates every prefill."
        },
    )
    layer_overrides: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "Per-layer sparsity settings: {layer_index: {field: value}} with fields among "
            f"{LAYER_OVERRIDABLE_FIELDS}, e.g. {{'0': {{'decode_method': 'dense'}}, '5': {{'decode_token_budget': "
            "4096}} for a layer whose decode selection costs the most (benchmarks/decode_layer_sensitivity.py)."
        },
    )

    # --- decode gate (SeerAttention-R): architecture fixed once trained, selection may change ----------
    decode_gate: bool = field(
        default=False,
        metadata={
            "help": "Give every gated layer a decode gate (`seer_adapter.gate.DecodeGate`): the query heads of a GQA "
            "group merged by a learned linear per KV head, scored against a K-compression cache, one block "
            "selection per KV head at every decoding step. Fixed once trained; adapters saved without it load as "
            "before."
        },
    )
    decode_k_norm: bool = field(
        default=False,
        metadata={
            "help": "RMS-normalise the decode gate's projected block keys (learned scale per KV head); fixed once "
            "trained."
        },
    )
    decode_gate_queries: int = field(
        default=1,
        metadata={
            "help": "Gate queries per KV head in the decode gate: 1 merges the GQA group's query heads into one "
            "(SeerAttention-R); m > 1 (a divisor of the group, Hq / Hkv) keeps m merged queries, each initialised "
            "to the mean of its share of the heads, merged per block by decode_gate_query_merge — closer to the "
            "distillation target's maximum over the group's heads. The compressed keys are the same, read once per "
            "step; the scoring does m dot products per block (H200, 8B shape at 64k x 8: 4 queries 15.2 ms per "
            "step against 14.1). CPU, SmolLM2 (group 3) after 960 tokens, 16-token blocks, three training seeds: 3 "
            "queries as a mixture cost +6.11 % perplexity at density 0.25 against +7.61 % with one (mean of six "
            "evaluations, better in each). Fixed once trained."
        },
    )
    decode_gate_query_merge: str = field(
        default="mixture",
        metadata={
            "help": "How the decode gate merges its m > 1 gate queries' scores of a block (unused with one query): "
            "'mixture' (the block's probability is the mean over the queries of each query's softmax over the "
            "earlier blocks, so every query counts alike) or 'logsumexp' (of the raw logits: a query with larger "
            "logits outweighs the others; the first form of decode_gate_queries). Fixed once trained."
        },
    )
    decode_block_size: int | None = field(
        default=16,
        metadata={
            "help": "Tokens per key block of the decode gate (a power of two; None: block_size). 16-token blocks "
            "select more finely under the same decode_token_budget than the prefill's 64 (trained gates, H200: "
            "Qwen2.5-Coder-0.5B after 16128 tokens, budget 4096 +0.13 % perplexity against +1.14 % with 64-token "
            "blocks, budget 2048 +2.35 % / +7.86 %; SmolLM2 after 7936 tokens, same windows, +1.60 % / +2.22 %). The "
            "sparse decode kernel runs them as fast as 64-token ones; the gate scores 4x the compressed keys per "
            "step (generate() at 64k x batch 8: 2.02-2.10x dense against 2.18x; 8-token blocks: 1.91x, and no "
            "better at budget 2048 on Qwen). Fixed once trained; adapter files saved before this field existed mean "
            "block_size."
        },
    )
    decode_method: str = field(
        default="token_budget",
        metadata={
            "help": "Block selection of the decode gate per step: 'token_budget' (top decode_token_budget/block "
            "blocks, first and current block included), 'threshold' (keep blocks whose gate probability exceeds "
            "decode_threshold) or 'dense' (decode with the base model's own attention). Unused without decode_gate."
        },
    )
    decode_token_budget: int = field(
        default=2048,
        metadata={"help": "Tokens each decoding step may attend to (rounded down to whole decode blocks; >= one)."},
    )
    decode_threshold: float = field(
        default=5e-3, metadata={"help": "Keep key blocks whose decode-gate probability exceeds this (0 < t < 1)."}
    )
    decode_key_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Dtype of the K-compression cache's compressed keys: None (default) the gate's (gate_dtype); "
            "'bfloat16' or 'float16' halve that cache and what every decoding step's scoring reads, the gate "
            "queries staying in gate_dtype (H200, 8B shape at 64k x 8: the scores read 2 MB of fp32 keys per row and "
            "KV head per layer). Taken when a generation's cache is created: a change applies to the next cache."
        },
    )

    # --- base model description (filled by get_seer_model; checked when loading) -------------------
    model_type: str | None = field(default=None, metadata={"help": "model_type of the base model's config."})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "Layer count of the base model."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Query heads per layer of the base model."})
    num_key_value_heads: int | None = field(default=None, metadata={"help": "Key/value heads per layer."})
    head_dim: int | None = field(default=None, metadata={"help": "Head dimension of the base model."})
    gated_layers: list[int] | None = field(
        default=None, metadata={"help": "Layer indices that carry a gate; filled by get_seer_model."}
    )

    # --- PEFT bookkeeping written by peft.PeftModel.save_pretrained (unused by seer_adapter) -----------
    auto_mapping: dict[str, str] | None = field(
        default=None, metadata={"help": "PEFT's base-model class mapping for custom models; unused by seer_adapter."}
    )
    peft_version: str | None = field(
        default=None, metadata={"help": "Version of peft that wrote the file, when peft wrote it; informational."}
    )

    def __post_init__(self) -> None:
        self.validate()

    # PEFT reads these two flags from every adapter config (`peft.get_peft_model`, `PeftModel`): a seer adapter is
    # neither a prompt-learning nor an adaption-prompt method.
    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field; raise `SeerConfigError` naming the first bad field."""
        if self.peft_type != PEFT_TYPE:
            raise SeerConfigError(
                f"peft_type must be {PEFT_TYPE!r}, got {self.peft_type!r}: this is not a seer adapter."
            )
        if self.task_type != "CAUSAL_LM":
            raise SeerConfigError(f"task_type must be 'CAUSAL_LM', got {self.task_type!r}.")
        _check_int("block_size", self.block_size, minimum=1)
        if self.block_size & (self.block_size - 1):
            raise SeerConfigError(f"block_size must be a power of two (16, 32, 64, 128, ...), got {self.block_size}.")
        if self.gate_dim is not None:
            _check_int("gate_dim", self.gate_dim, minimum=1)
        for name in ("q_pooling", "k_pooling"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
                setattr(self, name, value)
            if not value or any(p not in POOLING_TYPES for p in value) or len(set(value)) != len(value):
                raise SeerConfigError(
                    f"{name} must be a non-empty list of distinct poolings from {POOLING_TYPES}, got {value!r}."
                )
        if not self.use_q_proj and list(self.q_pooling) != ["avg"]:
            raise SeerConfigError(
                f"q_pooling={self.q_pooling!r} needs use_q_proj=True (without a Q linear the pooled Q must be a single "
                "'avg' pooling of width head_dim)."
            )
        if self.gate_dtype not in ("float32", "bfloat16", "float16"):
            raise SeerConfigError(f"gate_dtype must be 'float32', 'bfloat16' or 'float16', got {self.gate_dtype!r}.")
        if self.decode_key_dtype not in (None, "float32", "bfloat16", "float16"):
            raise SeerConfigError(
                f"decode_key_dtype must be None (the gate's dtype), 'float32', 'bfloat16' or 'float16', got "
                f"{self.decode_key_dtype!r}."
            )
        _check_sparsity_fields(self.__dict__, where="")
        _check_int("dense_last_query_blocks", self.dense_last_query_blocks, minimum=0)
        _check_int("dense_below_length", self.dense_below_length, minimum=0)
        if not isinstance(self.dense_layers, (list, tuple)) or any(
            not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.dense_layers
        ):
            raise SeerConfigError(
                f"dense_layers must be a list of non-negative layer indices, got {self.dense_layers!r}."
            )
        self.dense_layers = sorted(set(self.dense_layers))
        if not isinstance(self.layer_overrides, dict):
            raise SeerConfigError(
                f"layer_overrides must be a dict {{layer_index: {{field: value}}}}, got {self.layer_overrides!r}."
            )
        normalised: dict[str, dict[str, Any]] = {}
        for key, override in self.layer_overrides.items():
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise SeerConfigError(f"layer_overrides keys must be layer indices, got {key!r}.") from None
            if index < 0 or not isinstance(override, dict):
                raise SeerConfigError(
                    f"layer_overrides[{key!r}] must map a non-negative index to a dict, got {override!r}."
                )
            unknown = set(override) - set(LAYER_OVERRIDABLE_FIELDS)
            if unknown:
                raise SeerConfigError(
                    f"layer_overrides[{key!r}] has fields {sorted(unknown)} that cannot vary per layer; "
                    f"allowed: {LAYER_OVERRIDABLE_FIELDS}."
                )
            _check_sparsity_fields(override, where=f"layer_overrides[{key!r}].")
            normalised[str(index)] = dict(override)
        self.layer_overrides = normalised
        for index in [None, *normalised]:
            budget = self.sparsity_for_layer(int(index))["token_budget"] if index else self.token_budget
            if budget < self.block_size:
                where = f"layer_overrides[{index!r}]." if index else ""
                raise SeerConfigError(
                    f"{where}token_budget={budget} is below one block ({self.block_size} tokens); "
                    "use at least block_size."
                )
        for name in ("decode_gate", "decode_k_norm"):
            if not isinstance(getattr(self, name), bool):
                raise SeerConfigError(f"{name} must be a bool, got {getattr(self, name)!r}.")
        if self.decode_block_size is not None:
            _check_int("decode_block_size", self.decode_block_size, minimum=1)
            if self.decode_block_size & (self.decode_block_size - 1):
                raise SeerConfigError(
                    f"decode_block_size must be a power of two (16, 32, 64, ...) or None, got {self.decode_block_size}."
                )
        _check_int("decode_gate_queries", self.decode_gate_queries, minimum=1)
        if self.decode_gate_query_merge not in QUERY_MERGES:
            raise SeerConfigError(
                f"decode_gate_query_merge must be one of {QUERY_MERGES}, got {self.decode_gate_query_merge!r}."
            )
        decode_block = self.effective_decode_block_size
        for index in [None, *self.layer_overrides]:
            where = f"layer_overrides[{index!r}]." if index else ""
            budget = self.sparsity_for_layer(int(index))["decode_token_budget"] if index else self.decode_token_budget
            if budget < decode_block:
                raise SeerConfigError(
                    f"{where}decode_token_budget={budget} is below one block of the decode gate ({decode_block} "
                    "tokens); use at least one block (the current block alone takes one)."
                )
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise SeerConfigError(
                    f"target_modules must be a non-empty list of module names, got {self.target_modules!r}."
                )

    @property
    def effective_decode_block_size(self) -> int:
        """Tokens per key block of the decode gate: ``decode_block_size``, or ``block_size`` when that is None."""
        return self.decode_block_size or self.block_size

    # ------------------------------------------------------------------------------------------------
    def sparsity_for_layer(self, layer_idx: int) -> dict[str, Any]:
        """The sparsity fields in force for one layer (global values with that layer's overrides applied)."""
        settings = {name: getattr(self, name) for name in LAYER_OVERRIDABLE_FIELDS}
        settings.update(self.layer_overrides.get(str(layer_idx), {}))
        return settings

    def replace(self, **changes: Any) -> SeerAttentionConfig:
        """A validated copy with some fields changed; unknown field names raise `SeerConfigError`."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise SeerConfigError(f"Unknown SeerAttentionConfig field(s) {sorted(unknown)}; known: {_field_names()}.")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeerAttentionConfig:
        """Build from a dict such as the content of adapter_config.json; unknown keys raise `SeerConfigError`."""
        if data.get("peft_type", PEFT_TYPE) != PEFT_TYPE:
            raise SeerConfigError(
                f"This adapter_config.json has peft_type={data.get('peft_type')!r}, not {PEFT_TYPE!r}: it belongs to "
                "another adapter type. Load it with peft.PeftModel instead."
            )
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = set(data) - set(known)
        if unknown:
            raise SeerConfigError(
                f"Unknown key(s) {sorted(unknown)} in the adapter config. It may come from a newer seer_adapter "
                f"(upgrade it) or have been edited by hand; known keys: {known}."
            )
        if data.get("decode_gate") and "decode_block_size" not in data:
            # written before the field existed, when the decode gate's blocks were the prefill's: keep that meaning
            # (the default changed to 16 since; a gate trained on 64-token blocks is not one for 16-token blocks)
            data = {**data, "decode_block_size": None}
        if data.get("decode_gate_queries", 1) > 1 and "decode_gate_query_merge" not in data:
            # written before the field existed, when several gate queries were merged by logsumexp: keep that meaning
            data = {**data, "decode_gate_query_merge": "logsumexp"}
        return cls(**data)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> SeerAttentionConfig:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise SeerConfigError(f"{path} is not valid JSON ({exc}); re-save the adapter.") from None
        if not isinstance(data, dict):
            raise SeerConfigError(f"{path} must hold a JSON object, got {type(data).__name__}.")
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> SeerAttentionConfig:
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {CONFIG_NAME} in {directory!s}: is this a seer_adapter adapter folder?")
        return cls.from_json_file(path)


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(SeerAttentionConfig)]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SeerConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _check_sparsity_fields(values: dict[str, Any], where: str) -> None:
    method = values.get("sparsity_method")
    if method is not None and method not in SPARSITY_METHODS:
        raise SeerConfigError(f"{where}sparsity_method must be one of {SPARSITY_METHODS}, got {method!r}.")
    if "threshold" in values:
        t = values["threshold"]
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not (0.0 < t < 1.0) or math.isnan(t):
            raise SeerConfigError(f"{where}threshold must be a probability in (0, 1), got {t!r}.")
    if "nz_ratio" in values:
        r = values["nz_ratio"]
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not (0.0 < r <= 1.0):
            raise SeerConfigError(f"{where}nz_ratio must be in (0, 1], got {r!r}.")
    if "token_budget" in values:
        _check_int(f"{where}token_budget", values["token_budget"], minimum=1)
    method = values.get("decode_method")
    if method is not None and method not in DECODE_METHODS:
        raise SeerConfigError(f"{where}decode_method must be one of {DECODE_METHODS}, got {method!r}.")
    if "decode_token_budget" in values:
        _check_int(f"{where}decode_token_budget", values["decode_token_budget"], minimum=1)
    if "decode_threshold" in values:
        t = values["decode_threshold"]
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not (0.0 < t < 1.0) or math.isnan(t):
            raise SeerConfigError(f"{where}decode_threshold must be a probability in (0, 1), got {t!r}.")
