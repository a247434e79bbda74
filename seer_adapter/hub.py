"""Adapter files on disk and on the Hub: locating them and writing the model card."""

from __future__ import annotations

import os
from typing import Any

from .config import CONFIG_NAME, WEIGHTS_NAME, SeerAttentionConfig


def resolve_adapter_files(adapter_path: str | os.PathLike, revision: str | None = None) -> tuple[str, str]:
    """Paths of ``adapter_config.json`` and ``adapter_model.safetensors`` for a folder or a Hub repo id.

    A local folder is used as it is; anything else is treated as a Hub repo id and fetched through
    ``huggingface_hub`` (its cache and ``HF_HUB_OFFLINE`` apply).
    """
    path = os.fspath(adapter_path)
    if os.path.isdir(path):
        config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
        for required in (config_path, weights_path):
            if not os.path.isfile(required):
                raise FileNotFoundError(
                    f"{required} is missing: {path} is not a complete seer_adapter adapter folder "
                    f"(expected {CONFIG_NAME} and {WEIGHTS_NAME}; save one with SeerModel.save_pretrained)."
                )
        return config_path, weights_path
    if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") > 1:
        raise FileNotFoundError(f"{path} is not an adapter folder (and does not look like a Hub repo id 'user/name').")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return (
            hf_hub_download(path, CONFIG_NAME, revision=revision),
            hf_hub_download(path, WEIGHTS_NAME, revision=revision),
        )
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise FileNotFoundError(f"cannot load adapter {path!r} (revision {revision!r}) from the Hub: {exc}") from exc


def write_model_card(directory: str | os.PathLike, config: SeerAttentionConfig, stats: list[dict[str, Any]]) -> None:
    """Write ``README.md``: Hub card metadata, what the adapter is, how to load it, its settings."""
    base = config.base_model_name_or_path or "unknown"
    lines = [
        "---",
        "library_name: seer_adapter",
        *(["base_model: " + base] if config.base_model_name_or_path else []),
        "tags:",
        "- seer-attention",
        "- sparse-attention",
        "- peft",
        "---",
        "",
        f"# SeerAttention gates for {base}",
        "",
        "Learned block-sparse attention gates (one AttnGate per attention layer) made with "
        "[seer_adapter](https://pypi.org/project/seer-adapter/). Only the gate weights are stored here.",
        "",
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from seer_adapter import SeerModel",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        'model = SeerModel.from_pretrained(base, "<this folder or repo id>")',
        "```",
        "",
        "## Configuration",
        "",
        "| field | value |",
        "|---|---|",
    ]
    for key in (
        "model_type",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "block_size",
        "gate_dim",
        "q_pooling",
        "k_pooling",
        "sparsity_method",
        "threshold",
        "nz_ratio",
        "token_budget",
        "dense_layers",
        "dense_below_length",
    ):
        lines.append(f"| {key} | {getattr(config, key)} |")
    sparse = [s for s in stats if s.get("mode") == "sparse"]
    if sparse:
        lines += ["", "## Density of the last forward before saving", "", "| layer | density |", "|---|---|"]
        lines += [f"| {s['layer']} | {s['density']:.3f} |" for s in sparse]
    with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
