"""Describe a saved adapter without loading a model, and check that it fits a base model.

Used by ``seer-adapter inspect``; also handy from Python::

    info = inspect_adapter("gates/", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    info["parameters"], info["base_model_check"]["fits"]
"""

from __future__ import annotations

import math
import os
from typing import Any

from .config import CONFIG_NAME, WEIGHTS_NAME, SeerAttentionConfig, SeerConfigError
from .hub import resolve_adapter_files

GATE_MARKER = ".seer_gate."


def _layer_of(key: str) -> int | None:
    """Layer index of a gate tensor key: the last integer component of the attention module's path."""
    module_path = key.split(GATE_MARKER, 1)[0]
    numbers = [int(part) for part in module_path.split(".") if part.isdigit()]
    return numbers[-1] if numbers else None


def _decode_line(config: dict[str, Any]) -> str:
    """The decode-gate line of `format_report` (adapters saved before decode gates have no such keys)."""
    if not config.get("decode_gate"):
        return "Decode gate: none (decoding runs the base model's dense attention)"
    queries = config.get("decode_gate_queries", 1)  # adapters saved before the field: one merged query
    merge = f" ({config.get('decode_gate_query_merge', 'logsumexp')} merge)" if queries > 1 else ""
    return (
        f"Decode gate: {config['decode_method']} (token budget {config['decode_token_budget']}, threshold "
        f"{config['decode_threshold']}), K RMSNorm {config.get('decode_k_norm', False)}, "
        f"{config.get('decode_block_size') or config.get('block_size', 64)}-token blocks, "
        f"{queries} gate quer{'y' if queries == 1 else 'ies'} per KV head{merge}"
    )


def read_gate_tensors(weights_path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, dtype)}`` of a safetensors file, read from its header only (no tensor is loaded)."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(os.fspath(weights_path), framework="pt") as f:
        for key in f.keys():
            piece = f.get_slice(key)
            tensors[key] = (tuple(piece.get_shape()), str(piece.get_dtype()))
    return tensors


def inspect_adapter(
    adapter: str | os.PathLike,
    *,
    base_model: str | os.PathLike | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> dict[str, Any]:
    """Everything about an adapter folder or Hub repo: config, files, parameter count, per-layer settings.

    Args:
        adapter: adapter folder or Hub repo id.
        base_model: a base model folder or Hub id to check the adapter against (only its config is read; the
            model is built on the meta device, so no weights are loaded).
        revision, token: for Hub repos.

    Returns:
        A JSON-serialisable dict with keys ``adapter``, ``files`` (name -> bytes), ``config``, ``parameters``,
        ``dtypes``, ``layers`` (one row per layer of the base model) and, with ``base_model``,
        ``base_model_check`` (``{"base_model", "fits", "problems"}``).
    """
    config_path, weights_path = resolve_adapter_files(adapter, revision=revision, token=token)
    config = SeerAttentionConfig.from_json_file(config_path)
    tensors = read_gate_tensors(weights_path)
    per_layer: dict[int | None, int] = {}
    for key, (shape, _) in tensors.items():
        layer = _layer_of(key)
        per_layer[layer] = per_layer.get(layer, 0) + math.prod(shape)
    gated = set(config.gated_layers if config.gated_layers is not None else (k for k in per_layer if k is not None))
    count = config.num_hidden_layers or (max(gated) + 1 if gated else 0)
    layers = []
    for index in range(count):
        if index not in gated:
            mode = "no gate"
        elif index in config.dense_layers:
            mode = "dense layer"
        else:
            mode = "gated"
        layers.append(
            {"layer": index, "mode": mode, "parameters": per_layer.get(index, 0), **config.sparsity_for_layer(index)}
        )
    info: dict[str, Any] = {
        "adapter": os.fspath(adapter),
        "revision": revision,
        "files": {CONFIG_NAME: os.path.getsize(config_path), WEIGHTS_NAME: os.path.getsize(weights_path)},
        "config": config.to_dict(),
        "parameters": sum(per_layer.values()),
        "dtypes": sorted({dtype for _, dtype in tensors.values()}),
        "layers": layers,
    }
    if base_model is not None:
        info["base_model_check"] = check_fits_base_model(config, tensors, base_model, token=token)
    return info


def check_fits_base_model(
    config: SeerAttentionConfig,
    tensors: dict[str, tuple[tuple[int, ...], str]],
    base_model: str | os.PathLike,
    token: str | bool | None = None,
) -> dict[str, Any]:
    """Would ``SeerModel.from_pretrained(base_model, adapter)`` work? Builds the model on the meta device.

    Returns ``{"base_model", "fits", "problems"}``; ``problems`` lists every mismatch found (base-model fields,
    unsupported family, missing / unexpected / misshaped gate tensors).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model import KEY_PREFIX, AdapterMismatchError, SeerModel, UnsupportedModelError

    name = os.fspath(base_model)
    result: dict[str, Any] = {"base_model": name, "fits": False, "problems": []}
    try:
        model_config = AutoConfig.from_pretrained(name, token=token)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
        seer = SeerModel(model, config.replace(inference_mode=True))
    except (AdapterMismatchError, UnsupportedModelError, SeerConfigError, OSError, ValueError) as exc:
        result["problems"].append(f"{type(exc).__name__}: {exc}")
        return result
    expected = {key: tuple(t.shape) for key, t in seer.get_adapter_state_dict().items()}
    saved = {key if key.startswith(KEY_PREFIX) else KEY_PREFIX + key: shape for key, (shape, _) in tensors.items()}
    for key in sorted(set(expected) - set(saved)):
        result["problems"].append(f"missing gate tensor {key} (shape {expected[key]})")
    for key in sorted(set(saved) - set(expected)):
        result["problems"].append(f"unexpected gate tensor {key}: no such gate in this model")
    for key in sorted(set(saved) & set(expected)):
        if saved[key] != expected[key]:
            result["problems"].append(f"{key}: saved shape {saved[key]} != expected {expected[key]}")
    result["fits"] = not result["problems"]
    return result


def format_size(num_bytes: int) -> str:
    """``1536`` -> ``"1.5 kB"`` (decimal units, as the Hub shows them)."""
    size = float(num_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def format_report(info: dict[str, Any]) -> str:
    """The human-readable text ``seer-adapter inspect`` prints."""
    config = info["config"]
    base = config.get("base_model_name_or_path") or "unknown"
    heads = f"{config.get('num_attention_heads')} query / {config.get('num_key_value_heads')} KV heads"
    lines = [
        f"Adapter: {info['adapter']}" + (f" (revision {info['revision']})" if info.get("revision") else ""),
        f"Base model: {base} ({config.get('model_type')}, {config.get('num_hidden_layers')} layers, {heads}, "
        f"head_dim {config.get('head_dim')})",
        "Files: " + ", ".join(f"{name} {format_size(size)}" for name, size in info["files"].items()),
        f"Parameters: {info['parameters']:,d} ({', '.join(info['dtypes'])})",
        f"Gate: block_size {config['block_size']}, gate_dim {config['gate_dim'] or 'head_dim'}, "
        f"q_pooling {config['q_pooling']}, k_pooling {config['k_pooling']}, use_q_proj {config['use_q_proj']}",
        f"Sparsity: {config['sparsity_method']} (threshold {config['threshold']}, nz_ratio {config['nz_ratio']}, "
        f"token_budget {config['token_budget']}); sink block {config['force_sink_block']}, local block "
        f"{config['force_local_block']}, dense below {config['dense_below_length']} tokens, last "
        f"{config['dense_last_query_blocks']} query-block rows dense",
        _decode_line(config),
        "",
        f"{'layer':>5}  {'mode':<11} {'params':>10}  {'method':<12} {'setting':<10}"
        + (f"  {'decode':<12} setting" if config.get("decode_gate") else ""),
    ]
    for row in info["layers"]:
        setting = {"threshold": row["threshold"], "nz_ratio": row["nz_ratio"], "token_budget": row["token_budget"]}
        shown = setting.get(row["sparsity_method"], "")
        line = f"{row['layer']:>5}  {row['mode']:<11} {row['parameters']:>10,d}  {row['sparsity_method']:<12} "
        line += f"{shown!s:<10}"
        if config.get("decode_gate"):
            decode = {"threshold": row["decode_threshold"], "token_budget": row["decode_token_budget"]}
            line += f"  {row['decode_method']:<12} {decode.get(row['decode_method'], '')}"
        lines.append(line.rstrip())
    check = info.get("base_model_check")
    if check is not None:
        lines.append("")
        if check["fits"]:
            lines.append(f"Fits {check['base_model']}: yes")
        else:
            lines.append(f"Fits {check['base_model']}: NO")
            lines += [f"  - {problem}" for problem in check["problems"]]
    return "\n".join(lines)
