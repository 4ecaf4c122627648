"""Text in, fixed-length token sequences out, through Hugging Face `datasets`.

The sequence convention is SAELens's: documents are tokenized, joined with BOS between them (GPT-2's
BOS and EOS are the same token), cut into pieces of context_size - 1 tokens, and every sequence
starts with BOS. The stream is deterministic, so a resumed build can skip what it already cached.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# local file suffix -> datasets builder
LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TOKENIZE_DOCS = 256  # documents tokenized per call (the fast tokenizer batches them in Rust)


class DatasetError(Exception):
    """The dataset cannot give what the build needs; the message says what."""


@dataclass(frozen=True)
class DatasetSpec:
    path: str                 # hub name ("Skylion007/openwebtext") or local file / directory
    split: str = "train"
    text_column: str = "text"
    token_column: str = ""    # a column of pre-tokenized ids; overrides text_column


def load_streaming(spec: DatasetSpec):
    """An iterable over the dataset's rows: local files by suffix, anything else from the hub."""
    import datasets

    local = Path(spec.path)
    if local.exists():
        files = sorted(str(p) for p in local.rglob("*") if p.suffix in LOCAL_BUILDERS) if local.is_dir() else [str(local)]
        builders = {LOCAL_BUILDERS.get(Path(f).suffix) for f in files}
        if not files or None in builders or len(builders) != 1:
            raise DatasetError(
                f"{spec.path}: expected .txt, .jsonl/.json or .parquet files of one kind, found {files[:5] or 'none'}"
            )
        return datasets.load_dataset(builders.pop(), data_files=files, split="train", streaming=True)
    try:
        return datasets.load_dataset(spec.path, split=spec.split, streaming=True)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, bad split: all end here
        raise DatasetError(f"cannot load dataset {spec.path!r} [{spec.split}]: {type(e).__name__}: {e}") from e


def iter_documents(spec: DatasetSpec, tokenizer) -> Iterator[list[int]]:
    """Token ids of each document, in dataset order."""
    column = spec.token_column or spec.text_column
    batch: list[str] = []
    for i, row in enumerate(load_streaming(spec)):
        if column not in row:
            raise DatasetError(f"dataset {spec.path!r} has no column {column!r}; its columns: {sorted(row)}")
        if spec.token_column:
            yield list(row[column])
            continue
        batch.append(row[column])
        if len(batch) == TOKENIZE_DOCS:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
            batch = []
    if batch:
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


def iter_sequences(
    documents: Iterator[list[int]], context_size: int, bos_token_id: int, prepend_bos: bool = True
) -> Iterator[np.ndarray]:
    """Cut the BOS-joined document stream into int32 sequences of exactly context_size tokens."""
    body = context_size - 1 if prepend_bos else context_size
    pending = np.empty(0, dtype=np.int32)
    for i, doc in enumerate(documents):
        piece = np.asarray(doc, dtype=np.int32)
        if i > 0:
            piece = np.concatenate([np.array([bos_token_id], dtype=np.int32), piece])
        pending = np.concatenate([pending, piece]) if len(pending) else piece
        while len(pending) >= body:
            chunk, pending = pending[:body], pending[body:]
            yield np.concatenate([[bos_token_id], chunk]).astype(np.int32) if prepend_bos else chunk
