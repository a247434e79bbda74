"""Adapter files on disk and on the Hugging Face Hub: locating them, pushing them, and the model card.

Everything Hub-related goes through ``huggingface_hub``, so its settings apply: ``HF_ENDPOINT``, ``HF_TOKEN`` /
``hf auth login``, the cache (``HF_HOME`` / ``HF_HUB_CACHE``) and ``HF_HUB_OFFLINE=1`` (cached files only).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .config import CONFIG_NAME, PEFT_TYPE, WEIGHTS_NAME, SeerAttentionConfig, SeerConfigError

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
CARD_TAGS = ("seer-attention", "sparse-attention", "block-sparse-attention", "seer_adapter")


def looks_like_repo_id(name: str) -> bool:
    """``"user/name"`` or ``"name"`` that is not an existing local path (``./x``, ``/x``, ``a/b/c`` are paths)."""
    return bool(REPO_ID_PATTERN.match(name)) and not os.path.exists(name)


# ------------------------------------------------------------------------------------------------------
# locating adapter files
# ------------------------------------------------------------------------------------------------------
def resolve_adapter_files(
    adapter_path: str | os.PathLike, revision: str | None = None, token: str | bool | None = None
) -> tuple[str, str]:
    """Paths of ``adapter_config.json`` and ``adapter_model.safetensors`` for a folder or a Hub repo id.

    A local folder is used as it is; anything else is treated as a Hub repo id and fetched through
    ``huggingface_hub`` (its cache, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` apply; ``revision`` is a branch, tag or
    commit). The config is fetched and checked to be a seer adapter's before the weights are downloaded.

    Raises:
        FileNotFoundError: no such folder, repo, revision or file, or (offline) not in the cache.
        PermissionError: the Hub refused the token.
        ConnectionError: the Hub could not be reached and the files are not cached.
        SeerConfigError: the adapter_config.json belongs to another adapter type.
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
        check_seer_adapter_config(config_path, source=path)
        return config_path, weights_path
    if os.path.exists(path) or not looks_like_repo_id(path):
        raise FileNotFoundError(f"{path} is not an adapter folder (and does not look like a Hub repo id 'user/name').")
    config_path = download_adapter_file(path, CONFIG_NAME, revision=revision, token=token)
    check_seer_adapter_config(config_path, source=path)
    return config_path, download_adapter_file(path, WEIGHTS_NAME, revision=revision, token=token)


def download_adapter_file(
    repo_id: str, filename: str, revision: str | None = None, token: str | bool | None = None
) -> str:
    """``hf_hub_download`` with errors that say what went wrong and what to do."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    try:
        return hf_hub_download(repo_id, filename, revision=revision, token=token)
    except RepositoryNotFoundError as exc:
        raise FileNotFoundError(
            f"no adapter repo {where} on the Hub at {constants.ENDPOINT} (and no local folder of that name). Check the "
            "name; if the repo is private, pass token=... or log in (hf auth login)."
        ) from exc
    except RevisionNotFoundError as exc:
        raise FileNotFoundError(f"the Hub repo {repo_id!r} has no revision {revision!r}.") from exc
    except EntryNotFoundError as exc:  # RemoteEntryNotFoundError in huggingface_hub >= 1.0
        if isinstance(exc, LocalEntryNotFoundError):
            _raise_for_unreachable(exc, where, filename)
        raise FileNotFoundError(
            f"the Hub repo {where} has no {filename}: it is not a seer_adapter adapter "
            "(push one with SeerModel.push_to_hub)."
        ) from exc
    except HfHubHTTPError as exc:
        _raise_for_http_error(exc, f"downloading {filename} of {where}")
        raise
    except (ValueError, OSError) as exc:  # e.g. "Force download failed due to the above error"
        if isinstance(exc.__cause__, HfHubHTTPError):
            _raise_for_http_error(exc.__cause__, f"downloading {filename} of {where}")
        raise


def _raise_for_unreachable(exc: Exception, where: str, filename: str) -> None:
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc.__cause__, HfHubHTTPError):
        _raise_for_http_error(exc.__cause__, f"downloading {filename} of {where}")
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"HF_HUB_OFFLINE is set and {filename} of {where} is not in the Hub cache ({constants.HF_HUB_CACHE}), "
            "nor is there a local folder of that name. Download it once while online, or pass an adapter folder."
        ) from exc
    raise ConnectionError(
        f"cannot reach the Hub at {constants.ENDPOINT} to fetch {filename} of {where}, and it is not in the cache "
        f"({constants.HF_HUB_CACHE}). Check the network (or HF_ENDPOINT), or pass a local adapter folder."
    ) from exc


def _raise_for_http_error(exc: Exception, action: str) -> None:
    """Turn a 401/403 from the Hub into a PermissionError that says what to do; other errors pass through."""
    from huggingface_hub import constants

    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status in (401, 403):
        reason = (getattr(response, "headers", None) or {}).get("X-Error-Message") or str(exc).splitlines()[0]
        raise PermissionError(
            f"the Hub at {constants.ENDPOINT} refused the token while {action} (HTTP {status}: {reason}). Pass a valid "
            "token with token=..., set HF_TOKEN, or run `hf auth login`; writing needs a token with write access to "
            "the repo's namespace."
        ) from exc


def check_seer_adapter_config(config_path: str | os.PathLike, source: str) -> None:
    """Refuse, with a clear message, an adapter_config.json that is not a seer adapter's (e.g. a LoRA's)."""
    try:
        with open(config_path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise SeerConfigError(f"{CONFIG_NAME} of {source} is not valid JSON ({exc}).") from None
    peft_type = data.get("peft_type") if isinstance(data, dict) else None
    if peft_type != PEFT_TYPE:
        raise SeerConfigError(
            f"{source} holds a {peft_type or 'non-PEFT'} adapter (peft_type={peft_type!r} in {CONFIG_NAME}), not a "
            f"SeerAttention adapter (peft_type={PEFT_TYPE!r}). Load it with peft.PeftModel.from_pretrained, or point "
            "to a seer_adapter repo or folder."
        )


# ------------------------------------------------------------------------------------------------------
# pushing
# ------------------------------------------------------------------------------------------------------
def push_folder_to_hub(
    write_folder: Callable[[str], None],
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload SeerAttention adapter",
    commit_description: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Create ``repo_id`` if needed and upload, in one commit, what ``write_folder(tmp_dir)`` writes.

    ``revision`` is a branch; it is created from ``main`` when it does not exist. A Hub commit is atomic: when
    the upload fails (network, token) the repo keeps its previous state, and pushing again is safe.

    Returns:
        huggingface_hub's ``CommitInfo`` (``.oid`` is the commit to pin with ``revision=`` when loading).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)  # created now, so HF_ENDPOINT / constants in force at call time apply
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != "main" and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="seer_adapter_push_") as folder:
            write_folder(folder)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=revision,
                commit_message=commit_message,
                commit_description=commit_description,
                create_pr=create_pr,
            )
    except HfHubHTTPError as exc:
        _raise_for_http_error(exc, f"pushing to {repo_id!r}")
        raise
    except _transport_errors() as exc:
        raise ConnectionError(
            f"the upload to {repo_id!r} on {api.endpoint} was interrupted ({type(exc).__name__}: {exc}). Hub commits "
            "are atomic, so the repo still holds its previous revision; push again."
        ) from exc


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network errors of the HTTP client huggingface_hub uses (httpx in >= 1.0, requests before)."""
    errors: list[type[BaseException]] = [OSError]  # requests' errors derive from OSError
    for module_name, attribute in (("httpx2", "TransportError"), ("httpx", "TransportError")):
        try:
            errors.append(getattr(importlib.import_module(module_name), attribute))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


# ------------------------------------------------------------------------------------------------------
# model card
# ------------------------------------------------------------------------------------------------------
CONFIG_TABLE_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "gated_layers",
    "block_size",
    "gate_dim",
    "q_pooling",
    "k_pooling",
    "use_q_proj",
    "gate_dtype",
    "sparsity_method",
    "threshold",
    "nz_ratio",
    "token_budget",
    "force_sink_block",
    "force_local_block",
    "dense_layers",
    "dense_below_length",
    "layer_overrides",
    "decode_gate",
    "decode_k_norm",
    "decode_gate_queries",
    "decode_gate_query_merge",
    "decode_block_size",
    "decode_method",
    "decode_token_budget",
    "decode_threshold",
)


def write_model_card(
    directory: str | os.PathLike,
    config: SeerAttentionConfig,
    stats: list[dict[str, Any]],
    *,
    training_data: str | Sequence[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    num_parameters: int | None = None,
) -> None:
    """Write ``README.md`` in the Hub's model-card format (YAML metadata + markdown).

    Args:
        directory: where to write it.
        config: the adapter's configuration (shown as a table; its base model goes to ``base_model``).
        stats: `SeerModel.sparsity_stats()` of a forward to report (per-layer mode and density), or ``[]``.
        training_data: what the gates were distilled on: Hub dataset ids (also listed under ``datasets:``) and/or
            free text. ``None``: reported as not recorded.
        metrics: measured numbers to report, e.g. ``{"perplexity (dense)": 41.75, "perplexity (sparse)": 43.7}``.
        repo_id: the Hub repo, used in the loading snippets.
        num_parameters: gate parameter count to report.
    """
    from huggingface_hub import ModelCard, ModelCardData

    base = config.base_model_name_or_path
    hub_base = base if base and looks_like_repo_id(base) else None
    sources = [training_data] if isinstance(training_data, str) else list(training_data or [])
    datasets = [s for s in sources if looks_like_repo_id(s) and "/" in s]
    tags = list(CARD_TAGS) + ([f"base_model:adapter:{hub_base}"] if hub_base else [])
    card_data = ModelCardData(
        base_model=hub_base,
        datasets=datasets or None,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=tags,
    )
    adapter = repo_id or "path/to/this/adapter"
    base_name = base or "<the base model>"
    gated = config.gated_layers if config.gated_layers is not None else "all full-attention layers"
    size = f" ({num_parameters:,d} gate parameters)" if num_parameters is not None else ""
    lines = [
        f"# SeerAttention gates for {base_name}",
        "",
        "Learned block-sparse attention gates (SeerAttention), one AttnGate per attention layer, made with "
        "[seer_adapter](https://pypi.org/project/seer-adapter/). Only the gate weights are stored here"
        f"{size}; the base model is unchanged. During long prefills each gate picks the "
        f"{config.block_size}x{config.block_size} attention blocks worth computing. Gated layers: {gated}.",
        "",
        "## How to load",
        "",
        "```python",
        "from seer_adapter import AutoSeerModelForCausalLM",
        "",
        f'model = AutoSeerModelForCausalLM.from_pretrained("{adapter}")  # also loads {base_name}',
        "```",
        "",
        "With a base model you already have, or through PEFT:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from seer_adapter import SeerModel",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_name}")',
        f'model = SeerModel.from_pretrained(base, "{adapter}", threshold=2e-3)  # sparsity settings may change',
        "",
        "import seer_adapter  # registers the method with peft",
        "from peft import PeftModel",
        "",
        f'model = PeftModel.from_pretrained(base, "{adapter}")',
        "```",
        "",
        "## Training data",
        "",
        (
            ", ".join(f"[{s}](https://huggingface.co/datasets/{s})" if s in datasets else s for s in sources)
            if sources
            else "Not recorded. Untrained gates rank blocks by mean-pooled Q·K (the mean-pooling prior)."
        ),
        "",
        "## Configuration",
        "",
        "| field | value |",
        "|---|---|",
        *(f"| {key} | {_cell(getattr(config, key))} |" for key in CONFIG_TABLE_FIELDS),
    ]
    if metrics:
        lines += ["", "## Measured", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {_cell(value)} |" for name, value in metrics.items()]
    measured = [s for s in stats if "density" in s]
    if measured:
        q_len = max(int(s.get("q_len", 0) or 0) for s in measured)
        mean = sum(s["density"] for s in measured) / len(measured)
        lines += [
            "",
            "## Measured sparsity",
            "",
            f"Per-layer density (kept / causal blocks) of the last forward before saving ({q_len} tokens, "
            f"{config.sparsity_method}); mean {mean:.3f}.",
            "",
            "| layer | mode | density |",
            "|---|---|---|",
        ]
        lines += [f"| {s['layer']} | {s.get('mode', '')} | {s['density']:.3f} |" for s in measured]
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    card.save(os.path.join(directory, "README.md"))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|")
