"""SeerModel: a causal LM with one AttnGate per attention layer, in the manner of ``peft.PeftModel``.

Injection does three things to the base model, all undone by `SeerModel.unload`:

1. every targeted attention module gets a submodule ``seer_gate`` (an ``nn.ModuleDict`` keyed by adapter
   name, like LoRA's ``lora_A``) and a plain attribute ``seer_state``;
2. a forward pre-hook on each attention module captures the ``position_embeddings`` (cos, sin) it
   receives, so the attention function can invert RoPE (see `rope.py`);
3. the model's attention implementation is switched to ``"seer_attention"`` (see `attention.py`).

Files: ``adapter_config.json`` + ``adapter_model.safetensors`` (+ ``README.md``), with PEFT's key layout
``base_model.model.<module path>.seer_gate.<param>`` (adapter name removed).

`SeerAdapterMixin` holds this injection and the gate management; `SeerModel` and the PEFT tuner
(`seer_adapter.peft_integration.SeerAttentionTuner`) both use it, so the two routes build the same model.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .attention import ATTN_IMPLEMENTATION, SeerLayerState, SeerRuntime, register_attention
from .config import (
    BASE_MODEL_FIELDS,
    WEIGHTS_NAME,
    SeerAttentionConfig,
    SeerConfigError,
)
from .cuda_graphs import install_static_decoding, uninstall_static_decoding
from .gate import AttnGate, DecodeGate
from .rope import detect_rope_style

GATE_ATTR = "seer_gate"
STATE_ATTR = "seer_state"
HOOKS_ATTR = "_seer_hook_handles"
KEY_PREFIX = "base_model.model."
# Names under which attention modules of transformers receive the KV cache.
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")

# Families whose attention runs through transformers' AttentionInterface and that the test suite covers
# with a tiny random model (kept true by tests/test_families.py).
TESTED_FAMILIES = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "phi",
    "gpt_neox",
    "olmo",
    "olmo2",
    "starcoder2",
    "stablelm",
    "granite",
    "granitemoe",
    "cohere",
    "glm",
    "helium",
    "smollm3",
    "seed_oss",
    "arcee",
    "apertus",
    "ernie4_5",
    "opt",
    "gpt2",
    "gpt_bigcode",
    "biogpt",
)


class UnsupportedModelError(ValueError):
    """The base model cannot carry seer gates (its attention does not go through transformers' interface)."""


class AdapterMismatchError(ValueError):
    """An adapter was built for a different base model than the one it is loaded onto."""


# ------------------------------------------------------------------------------------------------------
# model inspection
# ------------------------------------------------------------------------------------------------------
def _text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def describe_base_model(model: nn.Module) -> dict[str, Any]:
    """The base-model fields recorded in the adapter config (model_type, layers, heads, head_dim)."""
    config = _text_config(model)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
    }


def find_attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Attention modules of a transformers model: ``{dotted name: module}`` in layer order.

    An attention module is one whose class name ends in ``Attention`` and that has a ``layer_idx``; nested
    matches (an attention inside another) are skipped.
    """
    if not hasattr(model, "config"):
        raise UnsupportedModelError(f"{type(model).__name__} is not a transformers PreTrainedModel.")
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={getattr(model.config, 'model_type', '?')!r}) does not route its "
            "attention "
            "through transformers' AttentionInterface, so seer gates cannot be attached. Families tested: "
            f"{', '.join(TESTED_FAMILIES)} (most families of transformers 5 work)."
        )
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not type(module).__name__.endswith("Attention") or not hasattr(module, "layer_idx"):
            continue
        if any(name.startswith(parent + ".") for parent in found):
            continue
        found[name] = module
    if not found:
        raise UnsupportedModelError(
            f"No attention modules found in {type(model).__name__}; tested families: {', '.join(TESTED_FAMILIES)}."
        )
    return found


def _is_sliding_window_layer(model: nn.Module, module: nn.Module) -> bool:
    config = _text_config(model)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and module.layer_idx < len(layer_types):
        kind = str(layer_types[module.layer_idx])
        if "sliding" in kind or "chunked" in kind or "local" in kind:
            return True
    return getattr(module, "sliding_window", None) is not None


def _matches_target(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) or re.fullmatch(t, name) for t in targets)


def select_target_modules(model: nn.Module, config: SeerAttentionConfig) -> dict[str, nn.Module]:
    """The attention modules that get a gate under ``config.target_modules`` (see its help)."""
    modules = find_attention_modules(model)
    if config.target_modules is None:
        targets = {n: m for n, m in modules.items() if not _is_sliding_window_layer(model, m)}
        if not targets:
            raise UnsupportedModelError(
                "every attention layer of this model is a sliding-window layer; nothing to gate."
            )
        return targets
    targets = {n: m for n, m in modules.items() if _matches_target(n, config.target_modules)}
    if not targets:
        raise SeerConfigError(
            f"target_modules={config.target_modules} matches no attention module; examples of names: "
            f"{list(modules)[:3]}."
        )
    return targets


# ------------------------------------------------------------------------------------------------------
# injection
# ------------------------------------------------------------------------------------------------------
def _capture_position_embeddings(module: nn.Module, args: tuple, kwargs: dict) -> None:
    state: SeerLayerState = getattr(module, STATE_ATTR)
    embeddings = kwargs.get("position_embeddings")
    if embeddings is None and len(args) > 1:
        parameters = list(inspect.signature(module.forward).parameters)
        if "position_embeddings" in parameters:
            index = parameters.index("position_embeddings")
            embeddings = args[index] if index < len(args) else None
    state.position_embeddings = embeddings if isinstance(embeddings, (tuple, list)) else None
    # The KV cache (for the decode gate's K-compression cache); named ``cache`` in recent transformers.
    cache = next((kwargs[name] for name in CACHE_ARGUMENT_NAMES if kwargs.get(name) is not None), None)
    if cache is None and len(args) > 1:
        parameters = list(inspect.signature(module.forward).parameters)
        for name in CACHE_ARGUMENT_NAMES:
            if name in parameters and parameters.index(name) < len(args):
                cache = args[parameters.index(name)]
                break
    state.cache = cache


def _release_position_embeddings(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    state = getattr(module, STATE_ATTR)
    state.position_embeddings = state.cache = state.compressed_keys = None


def _attach_gates(
    model: nn.Module,
    config: SeerAttentionConfig,
    adapter_name: str,
    runtime: SeerRuntime,
    container_cls: type[nn.ModuleDict] = nn.ModuleDict,
) -> list[int]:
    """Add ``seer_gate[adapter_name]`` to every targeted attention module; returns the gated layer indices.

    ``container_cls`` is the class of the ``seer_gate`` dict made on first injection (the PEFT tuner uses a
    subclass that peft recognises as an adapter layer).
    """
    info = describe_base_model(model)
    head_dim = info["head_dim"]
    gate_dim = config.gate_dim or head_dim
    dtype = getattr(torch, config.gate_dtype)
    targets = select_target_modules(model, config)
    all_modules = find_attention_modules(model)
    gated_layers = []
    for name, module in all_modules.items():
        if not hasattr(module, STATE_ATTR):
            style = detect_rope_style(module, head_dim)
            if style is None and "position_embeddings" in inspect.signature(module.forward).parameters:
                raise UnsupportedModelError(
                    f"{type(module).__name__} (model_type={info['model_type']!r}) applies rotary embeddings in a way "
                    "seer_adapter cannot invert (the gate needs pre-RoPE Q/K). Families tested: "
                    f"{', '.join(TESTED_FAMILIES)}."
                )
            setattr(module, STATE_ATTR, SeerLayerState(module.layer_idx, runtime, style))
            setattr(module, GATE_ATTR, container_cls())
            setattr(
                module,
                HOOKS_ATTR,
                (
                    module.register_forward_pre_hook(_capture_position_embeddings, with_kwargs=True),
                    module.register_forward_hook(_release_position_embeddings, with_kwargs=True),
                ),
            )
        if name not in targets:
            continue
        state: SeerLayerState = getattr(module, STATE_ATTR)
        if gate_dim != head_dim and (state.rope_style is not None or not config.use_q_proj):
            raise SeerConfigError(
                f"gate_dim={gate_dim} differs from head_dim={head_dim}: that needs use_q_proj=True and a model without "
                "RoPE (block RoPE reuses the model's rotary tables). Leave gate_dim unset."
            )
        group = info["num_attention_heads"] // info["num_key_value_heads"]
        if config.decode_gate and group % config.decode_gate_queries:
            raise SeerConfigError(
                f"decode_gate_queries={config.decode_gate_queries} must divide this model's GQA group of {group} query "
                f"heads per KV head (num_attention_heads {info['num_attention_heads']} / num_key_value_heads "
                f"{info['num_key_value_heads']}): use 1 or a divisor of {group}."
            )
        reference = next(module.parameters())
        gate = AttnGate(
            info["num_attention_heads"],
            info["num_key_value_heads"],
            head_dim,
            gate_dim,
            config.block_size,
            config.q_pooling,
            config.k_pooling,
            use_q_proj=config.use_q_proj,
            dtype=dtype,
        ).to(reference.device)
        if config.decode_gate:
            gate.decode = DecodeGate(
                info["num_attention_heads"],
                info["num_key_value_heads"],
                head_dim,
                gate_dim,
                config.effective_decode_block_size,
                config.k_pooling,
                k_norm=config.decode_k_norm,
                dtype=dtype,
                num_queries=config.decode_gate_queries,
                query_merge=config.decode_gate_query_merge,
            ).to(reference.device)
        getattr(module, GATE_ATTR)[adapter_name] = gate
        gated_layers.append(module.layer_idx)
    return gated_layers


def gate_checkpoint_key(model_key: str, adapter_name: str) -> str | None:
    """The adapter-file key of one gate tensor of ``adapter_name``, or ``None`` for any other state-dict key.

    ``...self_attn.seer_gate.<adapter_name>.k_proj.weight`` becomes ``...self_attn.seer_gate.k_proj.weight``
    (PEFT's convention: files do not carry the adapter name). Works on transformers-model keys and on
    ``base_model.model.``-prefixed PeftModel keys alike.
    """
    marker = f".{GATE_ATTR}.{adapter_name}."
    return model_key.replace(marker, f".{GATE_ATTR}.") if marker in model_key else None


class SeerAdapterMixin:
    """Gate management shared by `SeerModel` and the PEFT tuner (`seer_adapter.peft_integration.SeerAttentionModel`).

    One implementation serves both routes, so they inject, switch, save and load gates identically. The class
    using it provides ``base_model`` (the transformers model that carries the gates), ``peft_config``
    (``{adapter_name: SeerAttentionConfig}``, shared with the runtime) and ``active_adapter``; `_install` creates
    ``runtime``.
    """

    base_model: nn.Module
    peft_config: dict[str, SeerAttentionConfig]
    runtime: SeerRuntime
    active_adapter: str
    gate_container_cls: type[nn.ModuleDict] = nn.ModuleDict  # class of each module's ``seer_gate`` dict

    def _install(self, model: nn.Module, config: SeerAttentionConfig, adapter_name: str) -> None:
        """First injection into ``model`` (== ``self.base_model``): runtime, frozen base, gates, attention switch."""
        register_attention()
        if type(model).__module__.startswith("peft."):
            raise UnsupportedModelError(
                f"got a peft {type(model).__name__}; seer gates attach to the transformers model inside it. Pass "
                "model.get_base_model() (its LoRA/other adapter layers stay active under the gates) or "
                "model.merge_and_unload(). To load a seer adapter through peft, use PeftModel.from_pretrained on the "
                "plain base model (one PeftModel holds one adapter type)."
            )
        if getattr(model.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION or hasattr(
            model, "_seer_runtime"
        ):
            raise ValueError("this model already carries seer gates; call unload() on its SeerModel first.")
        original = model.config._attn_implementation or "eager"
        self.runtime = SeerRuntime(original_attn_implementation=original, configs=self.peft_config)
        model._seer_runtime = self.runtime
        trainable = [param for param in model.parameters() if param.requires_grad]
        for param in trainable:
            param.requires_grad_(False)
        try:
            self.add_adapter(adapter_name, config)
        except Exception:  # leave the model as it was given
            self.unload()
            for param in trainable:
                param.requires_grad_(True)
            raise
        self.runtime.active_adapter = adapter_name
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            self.unload()
            raise UnsupportedModelError(f"{type(model).__name__} refused attn_implementation={ATTN_IMPLEMENTATION!r}.")
        install_static_decoding(model)  # single-token steps on a SeerStaticCache (CUDA graphs)

    def _set_adapter_enabled(self, enabled: bool) -> None:
        """Switch between the gated attention and the base model's own attention implementation."""
        self.runtime.adapter_enabled = enabled
        implementation = ATTN_IMPLEMENTATION if enabled else self.runtime.original_attn_implementation
        self.base_model.set_attn_implementation(implementation)

    def add_adapter(self, adapter_name: str, config: SeerAttentionConfig) -> None:
        """Attach a new, freshly initialised set of gates under ``adapter_name``."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; pick another name or delete_adapter() it.")
        _check_matches_base(config, self.base_model)
        config = _with_base_model_fields(config, self.base_model)
        self.peft_config[adapter_name] = config
        try:
            gated = _attach_gates(self.base_model, config, adapter_name, self.runtime, self.gate_container_cls)
        except Exception:
            del self.peft_config[adapter_name]
            raise
        config.gated_layers = gated
        if config.inference_mode:
            for gate in self.gates(adapter_name).values():
                gate.requires_grad_(False)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; loaded: {list(self.peft_config)}.")
        self.runtime.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name == self.active_adapter:
            raise ValueError("cannot delete the active adapter; set_adapter() another one first.")
        for module in self._attention_modules():
            _drop_gate(module, adapter_name)
        del self.peft_config[adapter_name]

    def _attention_modules(self) -> Iterator[nn.Module]:
        for module in self.base_model.modules():
            if hasattr(module, STATE_ATTR):
                yield module

    def gates(self, adapter_name: str | None = None) -> dict[int, AttnGate]:
        """``{layer_idx: AttnGate}`` of an adapter (default: the active one)."""
        name = adapter_name or self.active_adapter
        return {
            getattr(m, STATE_ATTR).layer_idx: getattr(m, GATE_ATTR)[name]
            for m in self._attention_modules()
            if name in getattr(m, GATE_ATTR)
        }

    def set_sparsity(self, **settings: Any) -> SeerAttentionConfig:
        """Change sparsity settings of the active adapter at run time, e.g. ``set_sparsity(threshold=2e-3)``.

        Only fields that do not change the gate's weights may change (see `SeerAttentionConfig`).
        Returns the new config.
        """
        fixed = {
            "block_size",
            "gate_dim",
            "q_pooling",
            "k_pooling",
            "use_q_proj",
            "gate_dtype",
            "decode_gate",
            "decode_k_norm",
            "decode_gate_queries",
            "decode_gate_query_merge",
            "decode_block_size",
            "target_modules",
            *BASE_MODEL_FIELDS,
            "gated_layers",
            "peft_type",
            "task_type",
        }
        refused = sorted(set(settings) & fixed)
        if refused:
            raise SeerConfigError(f"{refused} fix the shape of the trained gates and cannot change at run time.")
        new = self.peft_config[self.active_adapter].replace(**settings)
        self.peft_config[self.active_adapter] = new
        return new

    def sparsity_stats(self) -> list[dict[str, Any]]:
        """Per-layer statistics of the last forward: ``[{layer, mode, density, q_len, ...}]`` in layer order."""
        rows = []
        for idx, stats in sorted(self.runtime.stats.items()):
            row = {"layer": idx, **stats}
            if stats["mode"] == "sparse":
                # the layer's per-row block counts (tensors: summed here, not in the forward, which stays launch-lean)
                kept, causal = int(stats["kept_blocks"].sum()), int(stats["causal_blocks"].sum())
                row.update(kept_blocks=kept, causal_blocks=causal, density=kept / causal if causal else 1.0)
            rows.append(row)
        return rows

    def unload(self) -> nn.Module:
        """Remove every gate, hook and state and restore the original attention implementation.

        Returns the base model, identical in behaviour to the one passed to `get_seer_model`.
        """
        model = self.base_model
        for module in list(self._attention_modules()):
            for handle in getattr(module, HOOKS_ATTR):
                handle.remove()
            delattr(module, HOOKS_ATTR)
            delattr(module, STATE_ATTR)
            delattr(module, GATE_ATTR)
        model.set_attn_implementation(self.runtime.original_attn_implementation)
        uninstall_static_decoding(model)
        if hasattr(model, "_seer_runtime"):
            del model._seer_runtime
        self.runtime.stats.clear()
        return model

    def get_adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Gate weights of one adapter with PEFT's key layout (adapter name removed)."""
        name = adapter_name or self.active_adapter
        state = {}
        for key, tensor in self.base_model.state_dict().items():
            checkpoint_key = gate_checkpoint_key(key, name)
            if checkpoint_key is not None:
                state[KEY_PREFIX + checkpoint_key] = tensor
        return state

    def _discard_adapter(self, adapter_name: str) -> None:
        for module in self._attention_modules():
            _drop_gate(module, adapter_name)
        self.peft_config.pop(adapter_name, None)

    def _load_adapter_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
        expected = self.get_adapter_state_dict(adapter_name)
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            self._discard_adapter(adapter_name)
            raise AdapterMismatchError(
                f"gate weights in {source} do not fit this model: {len(missing)} missing (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}). Was the adapter saved for another base model?"
            )
        marker = f".{GATE_ATTR}."
        modules = dict(self.base_model.named_modules())
        with torch.no_grad():
            for key, tensor in tensors.items():
                if tensor.shape != expected[key].shape:
                    self._discard_adapter(adapter_name)
                    raise AdapterMismatchError(
                        f"{key}: saved shape {tuple(tensor.shape)} != expected {tuple(expected[key].shape)} "
                        f"in {source}."
                    )
                path = key[len(KEY_PREFIX) :]
                module_path, param_path = path.split(marker, 1)
                gate = getattr(modules[module_path], GATE_ATTR)[adapter_name]
                gate.get_parameter(param_path).copy_(tensor)


class SeerModel(SeerAdapterMixin, nn.Module):
    """A causal LM wrapped with SeerAttention gates. Create it with `get_seer_model` or `SeerModel.from_pretrained`.

    Attributes:
        base_model: the wrapped transformers model (its weights are frozen).
        peft_config: ``{adapter_name: SeerAttentionConfig}``.
        active_adapter: the adapter whose gates and settings are in use.
    """

    def __init__(self, model: nn.Module, config: SeerAttentionConfig, adapter_name: str = "default"):
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, SeerAttentionConfig] = {}
        self._install(model, config, adapter_name)

    @property
    def active_adapter(self) -> str:
        return self.runtime.active_adapter

    @property
    def config(self) -> Any:
        """The base model's config (as ``PeftModel.config``)."""
        return self.base_model.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (still carrying the gates)."""
        return self.base_model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the exact base model (its original attention implementation) inside the ``with`` block."""
        self._set_adapter_enabled(False)
        try:
            yield
        finally:
            self._set_adapter_enabled(True)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        *,
        training_data: str | list[str] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        """Write ``adapter_config.json``, ``adapter_model.safetensors`` and ``README.md``.

        The active/default adapter goes to ``save_directory``; other adapters (when selected) to
        ``save_directory/<adapter_name>`` as PEFT does. ``training_data`` and ``metrics`` go to the model card
        (see `seer_adapter.hub.write_model_card`).
        """
        for name in selected_adapters or list(self.peft_config):
            directory = (
                save_directory
                if name == "default" or len(self.peft_config) == 1
                else os.path.join(save_directory, name)
            )
            self._save_adapter(name, directory, training_data=training_data, metrics=metrics)

    def _save_adapter(self, adapter_name: str, directory: str | os.PathLike, **card_kwargs: Any) -> None:
        from .hub import write_model_card

        os.makedirs(directory, exist_ok=True)
        self.peft_config[adapter_name].save_pretrained(directory)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.get_adapter_state_dict(adapter_name).items()}
        save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
        parameters = sum(t.numel() for t in tensors.values())
        write_model_card(
            directory, self.peft_config[adapter_name], self.sparsity_stats(), num_parameters=parameters, **card_kwargs
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload SeerAttention adapter",
        commit_description: str | None = None,
        create_pr: bool = False,
        adapter_name: str | None = None,
        training_data: str | list[str] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> Any:
        """Upload one adapter (default: the active one) to the Hub as ``repo_id``, in one commit.

        The repo gets what `save_pretrained` writes (config, weights, model card naming the repo) at its root, so
        ``SeerModel.from_pretrained(base, repo_id)``, ``AutoSeerModelForCausalLM.from_pretrained(repo_id)`` and
        ``PeftModel.from_pretrained(base, repo_id)`` load it. The repo is created when missing (``private`` applies
        then); ``revision`` is a branch, created from ``main`` when missing. Hub commits are atomic: a failed
        upload leaves the repo as it was.

        Returns:
            huggingface_hub's ``CommitInfo``; ``.oid`` is the commit to pin with ``revision=`` when loading.

        Raises:
            PermissionError: the Hub refused the token. ConnectionError: the upload was interrupted.
        """
        from .hub import push_folder_to_hub

        name = adapter_name or self.active_adapter
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; loaded: {list(self.peft_config)}.")

        def write(folder: str) -> None:
            self._save_adapter(name, folder, training_data=training_data, metrics=metrics, repo_id=repo_id)

        return push_folder_to_hub(
            write,
            repo_id,
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message,
            commit_description=commit_description,
            create_pr=create_pr,
        )

    def load_adapter(
        self,
        adapter_path: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        **config_overrides: Any,
    ) -> None:
        """Load gates saved by `save_pretrained` (a folder or a Hub repo id) as another adapter."""
        config, tensors = _read_adapter(adapter_path, self.base_model, is_trainable, revision, token, config_overrides)
        self.add_adapter(adapter_name, config)
        self._load_adapter_tensors(adapter_name, tensors, source=str(adapter_path))

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        adapter_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        **config_overrides: Any,
    ) -> SeerModel:
        """Wrap ``model`` with gates loaded from ``adapter_path`` (folder or Hub repo id).

        ``config_overrides`` change config fields at load, e.g. ``threshold=2e-3, sparsity_method="threshold"``.
        ``is_trainable=False`` (default) freezes the gates, as PEFT does. ``revision`` (branch, tag or commit) and
        ``token`` apply to Hub repos; the Hub cache and ``HF_HUB_OFFLINE`` are respected.
        """
        config, tensors = _read_adapter(adapter_path, model, is_trainable, revision, token, config_overrides)
        seer = cls(model, config, adapter_name=adapter_name)
        try:
            seer._load_adapter_tensors(adapter_name, tensors, source=str(adapter_path))
        except Exception:
            seer.unload()
            raise
        return seer


def _read_adapter(
    adapter_path: str | os.PathLike,
    model: nn.Module,
    is_trainable: bool,
    revision: str | None,
    token: str | bool | None,
    config_overrides: dict[str, Any],
) -> tuple[SeerAttentionConfig, dict[str, torch.Tensor]]:
    """Config (overrides applied, checked against ``model``) and gate tensors of a saved adapter, read before any
    gate is attached so a bad file leaves the model untouched."""
    from .hub import resolve_adapter_files

    config_path, weights_path = resolve_adapter_files(adapter_path, revision=revision, token=token)
    config = SeerAttentionConfig.from_json_file(config_path)
    config = config.replace(inference_mode=not is_trainable, **config_overrides)
    _check_matches_base(config, model, source=str(adapter_path))
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as exc:
        raise ValueError(
            f"cannot read the gate weights {weights_path!s} ({exc}); the file is corrupted or incomplete, "
            "download or save the adapter again."
        ) from None
    return config, tensors


def _drop_gate(module: nn.Module, adapter_name: str) -> None:
    gates = getattr(module, GATE_ATTR)
    if adapter_name in gates:
        del gates[adapter_name]


def _with_base_model_fields(config: SeerAttentionConfig, model: nn.Module) -> SeerAttentionConfig:
    """Fill the base-model description fields that are unset."""
    changes = {k: v for k, v in describe_base_model(model).items() if getattr(config, k) is None}
    if config.base_model_name_or_path is None:
        name = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
        if name:
            changes["base_model_name_or_path"] = str(name)
    return config.replace(**changes) if changes else config


def _check_matches_base(config: SeerAttentionConfig, model: nn.Module, source: str = "the config") -> None:
    actual = describe_base_model(model)
    differences = [
        f"{k}: adapter {getattr(config, k)!r} vs model {actual[k]!r}"
        for k in BASE_MODEL_FIELDS
        if getattr(config, k) is not None and getattr(config, k) != actual[k]
    ]
    if differences:
        raise AdapterMismatchError(
            f"the adapter from {source} was built for base model {config.base_model_name_or_path!r} "
            f"({config.model_type}), not for {getattr(model.config, '_name_or_path', '?')!r} "
            f"({actual['model_type']}): " + "; ".join(differences) + ". Load it onto the base model it was trained on."
        )


def get_seer_model(model: nn.Module, config: SeerAttentionConfig, adapter_name: str = "default") -> SeerModel:
    """Wrap a transformers causal LM with fresh (trainable) SeerAttention gates.

    Args:
        model: any causal LM whose attention runs through transformers' AttentionInterface.
        config: the adapter configuration.
        adapter_name: name of this set of gates (default ``"default"``).

    Returns:
        A `SeerModel`; the base weights are frozen, the gates are trainable.
    """
    return SeerModel(model, config, adapter_name=adapter_name)
