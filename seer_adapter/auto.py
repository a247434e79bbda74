"""`AutoSeerModelForCausalLM`: load an adapter and the base model its ``adapter_config.json`` names, in one call."""

from __future__ import annotations

import os
from typing import Any

from .config import SeerAttentionConfig, SeerConfigError
from .hub import resolve_adapter_files
from .model import SeerModel


class AutoSeerModelForCausalLM:
    """Load seer gates together with their base model, like ``peft.AutoPeftModelForCausalLM``.

    Example:
        >>> model = AutoSeerModelForCausalLM.from_pretrained("user/smollm2-seer-gates", dtype=torch.bfloat16)
    """

    def __init__(self) -> None:
        raise OSError(
            "AutoSeerModelForCausalLM is not meant to be instantiated; use AutoSeerModelForCausalLM.from_pretrained()."
        )

    @classmethod
    def from_pretrained(
        cls,
        adapter_name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config_overrides: dict[str, Any] | None = None,
        base_model_name_or_path: str | os.PathLike | None = None,
        **base_model_kwargs: Any,
    ) -> SeerModel:
        """Load the adapter at ``adapter_name_or_path`` (folder or Hub repo) onto the base model it was made for.

        Args:
            adapter_name_or_path: adapter folder or Hub repo id.
            revision: branch, tag or commit of the adapter repo. The base model's revision is the one recorded in
                the adapter config (``revision`` field), unless ``base_model_kwargs`` has its own ``revision``
                (pass it as ``base_revision``).
            token: Hub token, used for the adapter and the base model.
            adapter_name, is_trainable: as `SeerModel.from_pretrained`.
            config_overrides: sparsity settings to change at load, e.g. ``{"threshold": 2e-3}``.
            base_model_name_or_path: load this base model instead of the one the config names (e.g. a local copy).
            base_model_kwargs: passed to ``transformers.AutoModelForCausalLM.from_pretrained`` (``dtype``,
                ``device_map``, ``attn_implementation``, ...; ``base_revision`` becomes its ``revision``).

        Raises:
            SeerConfigError: the adapter names no base model and none was given.
        """
        from transformers import AutoModelForCausalLM

        config_path, _ = resolve_adapter_files(adapter_name_or_path, revision=revision, token=token)
        config = SeerAttentionConfig.from_json_file(config_path)
        base_name = base_model_name_or_path or config.base_model_name_or_path
        if not base_name:
            raise SeerConfigError(
                f"the adapter config of {adapter_name_or_path!s} names no base model (base_model_name_or_path is "
                "unset). Pass base_model_name_or_path=..., or load the base yourself and call "
                "SeerModel.from_pretrained(base, adapter)."
            )
        if "base_revision" in base_model_kwargs:
            base_model_kwargs["revision"] = base_model_kwargs.pop("base_revision")
        elif base_model_name_or_path is None and config.revision is not None:
            base_model_kwargs["revision"] = config.revision
        if token is not None:
            base_model_kwargs.setdefault("token", token)
        base = AutoModelForCausalLM.from_pretrained(os.fspath(base_name), **base_model_kwargs)
        return SeerModel.from_pretrained(
            base,
            adapter_name_or_path,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            revision=revision,
            token=token,
            **(config_overrides or {}),
        )
