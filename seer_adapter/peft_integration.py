"""PEFT integration: after ``import seer_adapter``, ``peft`` itself loads, saves and switches seer adapters.

``register_with_peft()`` (run by ``seer_adapter/__init__.py`` when peft >= 0.21 is installed) registers the method
``"seer_attention"`` with ``peft.utils.register_peft_method``. From then on::

    from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
    import seer_adapter

    model = PeftModel.from_pretrained(base, "gates/")               # folder or Hub repo id
    model = AutoPeftModelForCausalLM.from_pretrained("gates/")      # loads the base named in adapter_config.json
    model = get_peft_model(base, seer_adapter.SeerAttentionConfig(sparsity_method="nz_ratio", nz_ratio=0.3))
    model.load_adapter("other-gates/", adapter_name="other"); model.set_adapter("other")
    model.save_pretrained("out/")

PeftModel and `SeerModel` read and write the same files (``adapter_config.json`` + ``adapter_model.safetensors``
with keys ``base_model.model.<module path>.seer_gate.<param>``), and the tuner below reuses `SeerModel`'s injection
code (`SeerAdapterMixin`), so both routes build identical models. The seer methods (``set_sparsity``,
``sparsity_stats``, ``gates``) are reachable through the PeftModel too, as PeftModel forwards unknown attributes.

Combining with other PEFT methods: one PeftModel holds adapters of one PEFT type, so loading a seer adapter into a
LoRA PeftModel (or the reverse) raises peft's "Cannot combine adapters with different peft types" error. Gates can
sit on top of LoRA layers, though: see `SeerAttentionTuner` and the README.
"""

from __future__ import annotations

import enum
import os
import warnings
from dataclasses import dataclass
from typing import Any

from torch import nn

from .attention import SeerRuntime
from .config import CONFIG_NAME, PEFT_TYPE, SeerAttentionConfig
from .model import (
    GATE_ATTR,
    KEY_PREFIX,
    AdapterMismatchError,
    SeerAdapterMixin,
    gate_checkpoint_key,
)

PEFT_METHOD_NAME = PEFT_TYPE.lower()  # "seer_attention", the name register_peft_method wants
MIN_PEFT_VERSION = "0.21"
_NO_MERGE = (
    "SeerAttention gates cannot be merged into the base weights: they choose which attention blocks are computed at "
    "run time. Keep the adapter, or call unload() to get the base model back."
)

try:
    import peft
    from packaging.version import Version
    from peft import PeftConfig
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils import PeftType

    PEFT_AVAILABLE = Version(peft.__version__) >= Version(MIN_PEFT_VERSION)
except ImportError:  # peft is an optional dependency: without it this module only reports its absence
    PEFT_AVAILABLE = False


def add_enum_member(enum_cls: type[enum.Enum], name: str, value: Any) -> enum.Enum:
    """Add the member ``name = value`` to an existing Enum class, as the enum machinery adds one at class creation.

    ``peft.utils.register_peft_method`` requires the method's name in ``peft.utils.PeftType``, an Enum, and Python
    offers no public way to extend an Enum (peft's maintainers list adding the member as the one manual step of
    registering a method). This does the bookkeeping ``EnumType.__new__`` does for a new canonical member
    (``_member_names_``, ``_member_map_``, ``_value2member_map_``, the class attribute), through
    ``EnumType._add_member_`` on Python >= 3.13. Nothing of peft itself is patched. Idempotent: returns the existing
    member when ``name`` is already bound to ``value``.

    Raises:
        ValueError: ``name`` is bound to another value, ``value`` belongs to another member, or ``name`` would
            shadow an attribute of the class.
    """
    existing = enum_cls.__members__.get(name)
    if existing is not None:
        if existing.value != value:
            raise ValueError(f"{enum_cls.__name__}.{name} already exists with value {existing.value!r}, not {value!r}.")
        return existing
    if value in enum_cls._value2member_map_:
        raise ValueError(f"value {value!r} already belongs to {enum_cls._value2member_map_[value]!r}.")
    if any(name in vars(base) for base in enum_cls.__mro__):
        raise ValueError(f"{name!r} would shadow an attribute of {enum_cls.__name__}.")
    member_type = enum_cls._member_type_
    member = object.__new__(enum_cls) if member_type is object else member_type.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_names_.append(name)
    if hasattr(enum_cls, "_add_member_"):  # Python >= 3.13
        enum_cls._add_member_(name, member)
    else:
        setattr(enum_cls, name, member)  # before _member_map_: EnumType.__setattr__ refuses to rebind members
        enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    return member


if PEFT_AVAILABLE:

    @dataclass
    class SeerPeftConfig(SeerAttentionConfig, PeftConfig):
        """`SeerAttentionConfig` as a ``peft.PeftConfig``: the config class registered with peft.

        It has exactly the fields of `SeerAttentionConfig` (PeftConfig's own fields are among them), reads and writes
        the same ``adapter_config.json``, and validates the same way. ``PeftModel.from_pretrained`` builds one from
        the file; ``get_peft_model`` accepts a plain `SeerAttentionConfig` too (it is converted on injection).
        """

        def __post_init__(self) -> None:
            PeftConfig.__post_init__(self)  # task-type check, peft_version
            SeerAttentionConfig.__post_init__(self)
            self.peft_type = PeftType.SEER_ATTENTION

        @classmethod
        def from_seer_config(cls, config: SeerAttentionConfig) -> SeerPeftConfig:
            """A `SeerPeftConfig` with the same values (the config itself when it already is one)."""
            return config if isinstance(config, cls) else cls.from_dict(config.to_dict())

        def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
            """Write ``adapter_config.json`` (PEFT passes ``auto_mapping_dict`` for custom base-model classes)."""
            auto_mapping = kwargs.get("auto_mapping_dict")
            config = self if auto_mapping is None else self.replace(auto_mapping=auto_mapping)
            SeerAttentionConfig.save_pretrained(config, save_directory)

        @classmethod
        def from_pretrained(
            cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
        ) -> SeerPeftConfig:
            """Read ``adapter_config.json`` from a folder or a Hub repo (as ``PeftConfig.from_pretrained``).

            ``kwargs`` of ``huggingface_hub.hf_hub_download`` (``revision``, ``token``, ``cache_dir``, ...) are used
            for the download; PeftModel's other loading kwargs are not config fields and are ignored, as peft does.
            Change sparsity settings after loading with ``model.set_sparsity(...)``.
            """
            from huggingface_hub import hf_hub_download

            path = os.fspath(pretrained_model_name_or_path)
            directory = os.path.join(path, subfolder) if subfolder is not None else path
            config_file = os.path.join(directory, CONFIG_NAME)
            if not os.path.isfile(config_file):
                hub_kwargs, _, _ = cls._split_kwargs(kwargs)
                try:
                    config_file = hf_hub_download(path, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
                except Exception as exc:
                    raise ValueError(
                        f"Can't find '{CONFIG_NAME}' at '{path}' (a folder or a Hub repo id): {exc}"
                    ) from exc
            return cls.from_json_file(config_file)

    class SeerGateLayer(nn.ModuleDict, BaseTunerLayer):
        """The ``seer_gate`` dict of one attention module (adapter name -> `AttnGate`) as a peft tuner layer.

        Only the PEFT route uses this class (`SeerModel` keeps a plain ``nn.ModuleDict``); the state-dict keys are
        the same. It lets peft's status tools (``get_layer_status``, ``get_model_status``, and through them
        ``PeftModel.disable_adapter``) see the gates; enabled/active state is read from the shared `SeerRuntime`,
        so there is one source of truth.
        """

        adapter_layer_names = ("gates_by_adapter",)
        runtime: SeerRuntime | None = None  # set by SeerAttentionTuner.inject_adapter

        @property
        def gates_by_adapter(self) -> nn.ModuleDict:
            return self

        @property
        def disable_adapters(self) -> bool:
            return self.runtime is not None and not self.runtime.adapter_enabled

        @property
        def active_adapter(self) -> str:
            return self.runtime.active_adapter if self.runtime is not None else ""

        def enable_adapters(self, enabled: bool) -> None:
            if self.runtime is not None:
                self.runtime.adapter_enabled = enabled

    class SeerAttentionTuner(SeerAdapterMixin, BaseTuner):
        """The PEFT tuner of SeerAttention gates (``PeftModel.base_model`` for seer adapters).

        Injection, switching, unloading and the weight layout are `SeerAdapterMixin`'s, shared with `SeerModel`.
        PEFT semantics kept: ``set_adapter(name)`` makes that adapter trainable unless ``inference_mode=True`` and
        freezes the others; a newly added adapter starts frozen; ``disable_adapter()`` runs the exact base model.
        What differs from LoRA: one adapter is active at a time (one set of gates decides the block mask), the only
        adapter cannot be deleted (``unload()`` removes the gates), and nothing can be merged into the weights.
        """

        prefix: str = GATE_ATTR
        tuner_layer_cls = SeerGateLayer
        gate_container_cls = SeerGateLayer

        def __init__(
            self,
            model: nn.Module,
            peft_config: SeerAttentionConfig | dict[str, SeerAttentionConfig],
            adapter_name: str = "default",
            low_cpu_mem_usage: bool = False,
            state_dict: dict[str, Any] | None = None,
        ) -> None:
            if isinstance(peft_config, SeerAttentionConfig):
                peft_config = {adapter_name: peft_config}
            super().__init__(
                model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict
            )

        @property
        def base_model(self) -> nn.Module:
            """The transformers model carrying the gates (what `SeerAdapterMixin` works on)."""
            return self.model

        # --- injection ------------------------------------------------------------------------------------
        def inject_adapter(
            self,
            model: nn.Module,
            adapter_name: str,
            autocast_adapter_dtype: bool = True,
            low_cpu_mem_usage: bool = False,
            state_dict: dict[str, Any] | None = None,
        ) -> None:
            """Attach the gates of ``self.peft_config[adapter_name]`` to every targeted attention module.

            The gates are small and built in ``gate_dtype`` on the attention module's device, so
            ``autocast_adapter_dtype`` and ``low_cpu_mem_usage`` change nothing; ``state_dict`` (used by peft to infer
            targets of configs without ``target_modules``) is not needed: targets come from the config.
            """
            config = SeerPeftConfig.from_seer_config(self.peft_config.pop(adapter_name))
            if "runtime" not in self.__dict__:  # first adapter: install the runtime and the attention switch
                self._install(model, config, adapter_name)
            else:
                self.add_adapter(adapter_name, config)
                self._set_gates_trainable(adapter_name, False)  # as peft: a new inactive adapter starts frozen
            for name, module in model.named_modules():
                gates = getattr(module, GATE_ATTR, None)
                if isinstance(gates, SeerGateLayer):
                    gates.runtime = self.runtime
                    if adapter_name in gates and name not in self.targeted_module_names:
                        self.targeted_module_names.append(name)

        def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
            """No-op: gates keep the config's ``gate_dtype`` (float32 by default), whatever the model's dtype."""

        def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:
            """Not used: gates are attached beside the attention modules by `inject_adapter`, no module is replaced."""
            raise NotImplementedError(
                "SeerAttentionTuner attaches gates with inject_adapter(); it never replaces modules one by one."
            )

        def _set_gates_trainable(self, adapter_name: str, trainable: bool) -> None:
            for gate in self.gates(adapter_name).values():
                gate.requires_grad_(trainable)

        # --- adapters -------------------------------------------------------------------------------------
        def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
            """Activate one adapter; it becomes trainable unless ``inference_mode``, the others are frozen."""
            names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
            if len(names) != 1:
                raise ValueError(
                    f"SeerAttention runs one set of gates at a time (it decides the block mask); got {names}. "
                    "Pass a single adapter name."
                )
            SeerAdapterMixin.set_adapter(self, names[0])
            self.active_adapter = names[0]
            for name in self.peft_config:
                self._set_gates_trainable(name, name == names[0] and not inference_mode)

        def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
            """Enable or disable gradients of the gates of the given adapter(s)."""
            for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
                if name not in self.peft_config:
                    raise ValueError(f"unknown adapter {name!r}; loaded: {list(self.peft_config)}.")
                self._set_gates_trainable(name, requires_grad)

        def delete_adapter(self, adapter_name: str) -> None:
            """Delete an adapter; when it was active, the first remaining one becomes active (as peft does)."""
            if adapter_name not in self.peft_config:
                raise ValueError(f"Adapter {adapter_name} does not exist; loaded: {list(self.peft_config)}.")
            remaining = [name for name in self.peft_config if name != adapter_name]
            if not remaining:
                raise ValueError(
                    f"{adapter_name!r} is the only seer adapter; call unload() to remove the gates instead."
                )
            if adapter_name == self.active_adapter:
                self.runtime.active_adapter = self.active_adapter = remaining[0]
            self._discard_adapter(adapter_name)

        def _enable_adapter_layers(self, enabled: bool = True) -> None:
            self._set_adapter_enabled(enabled)

        def disable_adapter_layers(self) -> None:
            """Run the base model's own attention (the exact base model) until `enable_adapter_layers`."""
            self._set_adapter_enabled(False)

        def enable_adapter_layers(self) -> None:
            self._set_adapter_enabled(True)

        # --- unloading ------------------------------------------------------------------------------------
        def unload(self) -> nn.Module:
            """Remove every gate, hook and state; returns the untouched base model."""
            model = SeerAdapterMixin.unload(self)
            if "peft_config" in vars(model):
                del model.peft_config
            return model

        def _unload_and_optionally_merge(self, merge: bool = True, *args: Any, **kwargs: Any) -> nn.Module:
            if merge:
                raise ValueError(_NO_MERGE)
            return self.unload()

        def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
            """Refused: there is nothing to merge (see `merge_adapter`)."""
            raise ValueError(_NO_MERGE)

        def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
            """Refused: gates choose which attention blocks are computed at run time, they change no weight."""
            raise ValueError(_NO_MERGE)

        # --- state dict (the hooks get_peft_model_state_dict / set_peft_model_state_dict call) ---------------
        @classmethod
        def _get_adapter_state_dict(
            cls,
            model: nn.Module,
            config: SeerAttentionConfig,
            adapter_name: str,
            state_dict: dict[str, Any],
            unwanted_adapter_names: list[str],
        ) -> dict[str, Any]:
            return {key: value for key, value in state_dict.items() if gate_checkpoint_key(key, adapter_name)}

        @classmethod
        def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
            return gate_checkpoint_key(key, adapter_name) or key

        @classmethod
        def _remap_adapter_state_dict_for_load(
            cls, model: nn.Module, config: SeerAttentionConfig, adapter_name: str, state_dict: dict[str, Any]
        ) -> dict[str, Any]:
            """File keys -> model keys, refusing (as `SeerModel` does) gate weights that do not fit the model.

            Keys are compared with PEFT's ``base_model.model.`` prefix, which files have and a bare model (gates
            injected with ``peft.inject_adapter_in_model``) lacks.
            """

            def prefixed(key: str) -> str:
                return key if key.startswith(KEY_PREFIX) else KEY_PREFIX + key

            model_state = model.state_dict()
            to_model_key: dict[str, str] = {}
            for model_key in model_state:
                checkpoint_key = gate_checkpoint_key(model_key, adapter_name)
                if checkpoint_key is not None:
                    to_model_key[prefixed(checkpoint_key)] = model_key
            gate_keys = {prefixed(key): key for key in state_dict if f".{GATE_ATTR}." in key}
            missing = sorted(set(to_model_key) - set(gate_keys))
            unexpected = sorted(set(gate_keys) - set(to_model_key))
            if missing or unexpected:
                raise AdapterMismatchError(
                    f"gate weights do not fit this model: {len(missing)} missing (e.g. {missing[:2]}), "
                    f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}). Was the adapter saved for another base "
                    "model?"
                )
            for key, file_key in gate_keys.items():
                expected = model_state[to_model_key[key]].shape
                if state_dict[file_key].shape != expected:
                    raise AdapterMismatchError(
                        f"{file_key}: saved shape {tuple(state_dict[file_key].shape)} != expected {tuple(expected)}."
                    )
            return {
                (to_model_key[prefixed(key)] if f".{GATE_ATTR}." in key else key): value
                for key, value in state_dict.items()
            }


def register_with_peft(strict: bool = True) -> bool:
    """Register ``"seer_attention"`` with peft (idempotent). Returns False when peft >= 0.21 is not installed.

    ``strict=False`` (what ``import seer_adapter`` uses) turns a failure, e.g. from a peft release whose internals
    changed, into a warning: the PEFT route is then unavailable, `SeerModel` works as before.
    """
    if not PEFT_AVAILABLE:
        return False
    try:
        _register()
    except Exception as exc:
        if strict:
            raise
        warnings.warn(
            f"seer_adapter could not register with peft {peft.__version__} ({type(exc).__name__}: {exc}); "
            "PeftModel will not load seer adapters, SeerModel.from_pretrained still does. Please report this.",
            stacklevel=2,
        )
        return False
    return True


def _register() -> None:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    peft_type = add_enum_member(PeftType, PEFT_TYPE, PEFT_TYPE)
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is SeerAttentionTuner:
        return
    if registered is not None:  # seer_adapter re-imported (importlib.reload): replace the stale registration
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

        if registered.__module__ != __name__:
            warnings.warn(f"replacing {registered} registered with peft as {PEFT_TYPE!r}", stacklevel=3)
        for mapping in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
            mapping.pop(peft_type, None)
    register_peft_method(
        name=PEFT_METHOD_NAME, config_cls=SeerPeftConfig, model_cls=SeerAttentionTuner, prefix=GATE_ATTR
    )


__all__ = ["PEFT_AVAILABLE", "add_enum_member", "register_with_peft"]
if PEFT_AVAILABLE:
    __all__ += ["SeerAttentionTuner", "SeerPeftConfig"]
