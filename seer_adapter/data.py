"""Distillation data: text sources through `datasets`, tokenised, joined with EOS and packed.

Sources (`load_text_dataset`):

* local files or folders: ``.txt`` (one document per file), ``.json`` / ``.jsonl`` (a ``text`` field);
* a Hub dataset by name (``"org/name"``, optionally ``"org/name:config"``), read with `datasets.load_dataset`;
* ``"default"``: the offline default corpus of `seer_adapter.assets.default_corpus` (``"default:heldout"`` for
  its held-out split).

`packed_sequences` turns documents into fixed-length token sequences (documents joined with the EOS token, no
padding); it streams, so sources larger than memory work with ``streaming=True``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".json", ".jsonl")


class DataError(ValueError):
    """Unusable training or evaluation data; the message says what to change."""


def _local_files(source: str) -> list[str]:
    path = Path(source)
    files = sorted(str(p) for p in path.rglob("*") if p.is_file()) if path.is_dir() else [str(path)]
    files = [f for f in files if f.endswith(TEXT_SUFFIXES + JSON_SUFFIXES)]
    if not files:
        raise DataError(f"{source}: no .txt/.json/.jsonl files found.")
    kinds = {f.endswith(JSON_SUFFIXES) for f in files}
    if len(kinds) > 1:
        raise DataError(f"{source}: mixes text and JSON files; point at one kind at a time.")
    for f in files:
        if os.path.getsize(f) == 0:
            raise DataError(f"{f} is empty; remove it or give a file with text.")
    return files


def load_text_dataset(
    source: str, split: str = "train", streaming: bool = False, shuffle_seed: int | None = None
) -> Any:
    """A `datasets` dataset with a ``text`` column, from a local path, a Hub name, or ``"default"``.

    Args:
        source: see the module docstring.
        split: split of a Hub dataset (local files are one ``train`` split).
        streaming: iterate lazily (data larger than memory).
        shuffle_seed: shuffle documents with this seed (a buffer shuffle when streaming).
    """
    import datasets

    if source.startswith("default"):
        from .assets import default_corpus

        corpus_split = source.partition(":")[2] or "train"
        if corpus_split not in ("train", "heldout"):
            raise DataError(f"unknown split {corpus_split!r} of the default corpus; use default or default:heldout.")
        source = str(default_corpus()[corpus_split])
    if os.path.exists(source):
        files = _local_files(source)
        if files[0].endswith(JSON_SUFFIXES):
            dataset = datasets.load_dataset("json", data_files=files, split="train", streaming=streaming)
        else:
            dataset = datasets.load_dataset(
                "text", data_files=files, split="train", streaming=streaming, sample_by="document"
            )
    else:
        name, _, config_name = source.partition(":")
        try:
            dataset = datasets.load_dataset(name, config_name or None, split=split, streaming=streaming)
        except Exception as exc:  # datasets raises many types; name the source and the cause
            raise DataError(f"cannot load dataset {source!r} (split {split!r}): {exc}") from exc
    columns = getattr(dataset, "column_names", None)
    if columns is not None and "text" not in columns:
        raise DataError(f"{source}: no 'text' column (columns: {columns}); give JSON objects with a 'text' field.")
    if shuffle_seed is not None:
        dataset = dataset.shuffle(seed=shuffle_seed, **({"buffer_size": 1000} if streaming else {}))
    return dataset


def packed_sequences(
    documents: Iterable[dict[str, Any]] | Iterable[str],
    tokenizer: Any,
    seq_len: int,
    *,
    vocab_size: int | None = None,
    min_seq_len: int = 1,
) -> Iterator[torch.Tensor]:
    """Tokenise documents, join them with the EOS token and cut the stream into ``seq_len``-token sequences.

    Args:
        documents: rows with a ``text`` field (or plain strings).
        tokenizer: a transformers tokenizer with an ``eos_token_id``.
        seq_len: tokens per yielded sequence.
        vocab_size: the model's vocabulary size; a token id beyond it means a tokenizer of another model.
        min_seq_len: smallest allowed ``seq_len`` (the block size: shorter sequences cannot train a gate).

    Yields:
        ``LongTensor [seq_len]``; the trailing partial sequence is dropped.
    """
    if seq_len < min_seq_len:
        raise DataError(f"seq_len={seq_len} is shorter than one block ({min_seq_len} tokens); use a longer seq_len.")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id to join documents with.")
    buffer: list[int] = []
    produced = 0
    for document in documents:
        text = document if isinstance(document, str) else document["text"]
        if not text:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if vocab_size is not None and ids and max(ids) >= vocab_size:
            raise DataError(
                f"token id {max(ids)} is outside the model's vocabulary ({vocab_size}): the tokenizer belongs to "
                "another model. Load the tokenizer of the model you distill."
            )
        buffer.extend(ids)
        buffer.append(eos)
        while len(buffer) >= seq_len:
            yield torch.tensor(buffer[:seq_len], dtype=torch.long)
            buffer = buffer[seq_len:]
            produced += 1
    if produced == 0:
        raise DataError(
            f"the data holds fewer than {seq_len} tokens ({len(buffer)}); give more text or a shorter seq_len."
        )
