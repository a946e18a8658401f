"""Streaming readers: an input file -> batches of `InputRow`s plus carried columns.

A reader never loads the whole file: it yields `SourceBatch`es of a few thousand
rows. Each batch carries, beside its rows, an Arrow record batch of the columns
that pass through to the output untouched, so that Parquet types survive exactly.
A row that cannot be parsed is still yielded (with `problem` set) so that it ends
as a `rejected` output row; a file that cannot be read at all, or of which no
row parses, raises `InputError`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from runner.config import InputFormat, InputMapping
from runner.errors import InputError
from runner.records import InputRow

BATCH_ROWS = 2048


@dataclass(frozen=True, slots=True)
class SourceBatch:
    """Rows in input order, and their carried columns (`carried.num_rows == len(rows)`)."""

    rows: list[InputRow]
    carried: pa.RecordBatch


def file_hash(path: Path) -> str:
    """sha256 of the file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the input file: {exc.strerror}") from None
    return digest.hexdigest()


def open_source(
    path: Path, mapping: InputMapping, *, batch_rows: int = BATCH_ROWS, start_seq: int = 0
) -> Iterator[SourceBatch]:
    """Stream `path` in the format the mapping names, or the one it looks like;
    rows are numbered from `start_seq` (a run over several files counts on)."""
    from runner.sources import jsonl, openai_batch, parquet

    kind = detect_format(path) if mapping.format == "auto" else mapping.format
    if kind == "parquet":
        return parquet.read(path, mapping, batch_rows=batch_rows, start_seq=start_seq)
    if kind == "openai_batch":
        return openai_batch.read(path, batch_rows=batch_rows, start_seq=start_seq)
    return jsonl.read(path, mapping, batch_rows=batch_rows, start_seq=start_seq)


def release_memory() -> None:
    """Give the blocks the Arrow memory pool keeps for reuse back to the system,
    once the input is read: a run's registering process then idles beside its
    lane processes (100,000 rows of long prompts left it 35 MB more)."""
    pa.default_memory_pool().release_unused()


PARQUET_SUFFIXES = frozenset({".parquet", ".pq"})
JSONL_SUFFIXES = frozenset({".jsonl", ".json", ".ndjson", ".jsonlines"})


def detect_format(path: Path) -> InputFormat:
    """By the file's name: Parquet (.parquet), or JSON Lines (.jsonl, .json,
    .ndjson), where a first record with `custom_id` and `body` makes it
    OpenAI-batch input. Any other name is refused rather than guessed at."""
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an input file")
    if not path.exists():
        raise InputError(f"{path}: no such input file")
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix not in JSONL_SUFFIXES:
        raise InputError(
            f"{path}: cannot tell the input format from its name; runner reads Parquet "
            "(.parquet) and JSON Lines (.jsonl); set [input] format if the name misleads"
        )
    with path.open("rb") as handle:
        for raw in handle:
            line = raw.strip().removeprefix(b"\xef\xbb\xbf")
            if line:
                is_batch = b'"custom_id"' in line and b'"body"' in line
                return "openai_batch" if is_batch else "jsonl"
    raise InputError(f"{path}: the input file is empty")
