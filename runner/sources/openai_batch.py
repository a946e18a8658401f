"""OpenAI Batch API request files, read as they are.

Each line is `{"custom_id", "method", "url", "body"}`; an optional top-level
`tenant` picks the tenant (else the job's default tenant). Other top-level keys
are carried to the Parquet output. Checking the line's shape is validation's job.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from runner.sources import SourceBatch
from runner.sources.jsonl import read_objects

BATCH_KEYS = ("custom_id", "method", "url", "body", "tenant")


def read(path: Path, *, batch_rows: int, start_seq: int = 0) -> Iterator[SourceBatch]:
    return read_objects(path, _split, batch_rows=batch_rows, start_seq=start_seq)


def _split(obj: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    fields = {key: obj[key] for key in BATCH_KEYS if key in obj}
    fields["batch"] = True
    return fields, {key: value for key, value in obj.items() if key not in BATCH_KEYS}
