"""Outputs written from the store when a run ends: the Parquet result table and,
for OpenAI-batch input, the OpenAI-format output and error JSONL files.

Every file is written to a temporary name beside its target, flushed to disk,
then renamed over it: a crash leaves the previous complete file or none, never
half of one. Rows stream from the store one input batch at a time, in input
order, joined with that batch's carried columns.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from runner import carried_columns
from runner.pricing import micros_to_usd
from runner.store import RESULT_COLUMNS, Store

RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("tenant", pa.string()),
        ("model", pa.string()),
        ("status", pa.string()),
        ("response", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("cached_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("reasoning_tokens", pa.int64()),
        ("cost_usd", pa.float64()),
        ("attempts", pa.int64()),
        ("resends", pa.int64()),
        ("latency_ms", pa.int64()),
        ("error", pa.string()),
    ]
)
_COLUMN = {name: index for index, name in enumerate(RESULT_COLUMNS)}
_CARRIED_PREFIX = "input_"


def write_parquet(store: Store, run_id: str, path: Path) -> int:
    """The result table: carried columns, then `RESULT_SCHEMA`; returns the row count."""
    schemas = [carried_columns.decode_schema(blob) for blob in store.carried_schemas(run_id)]
    carried_fields = _carried_fields(schemas)
    schema = pa.schema([field for field, _ in carried_fields] + list(RESULT_SCHEMA))
    rows = 0
    with _replace_atomically(path, "wb") as handle, pq.ParquetWriter(handle, schema) as writer:
        for first_seq, data in store.carried_batches(run_id):
            carried = carried_columns.decode(data)
            results = store.results(run_id, first_seq, carried.num_rows)
            arrays = [_conform(carried, source, field) for field, source in carried_fields]
            arrays += _result_arrays(results)
            writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
            rows += len(results)
    return rows


def write_batch_jsonl(store: Store, run_id: str, output: Path, errors: Path) -> None:
    """OpenAI-batch files: `output` has one line per `custom_id` (with `response`
    or `error`), `errors` repeats the lines that have an error."""
    with _replace_atomically(output, "w") as out, _replace_atomically(errors, "w") as err:
        for line, ok in _batch_lines(store, run_id):
            out.write(line)
            if not ok:
                err.write(line)


def _batch_lines(store: Store, run_id: str) -> Iterator[tuple[str, bool]]:
    for row in store.iter_results(run_id):
        result = dict(zip(RESULT_COLUMNS, row, strict=True))
        record: dict[str, Any] = {
            "id": f"batch_req_{result['seq']:08d}",
            "custom_id": result["row_id"],
            "response": None,
            "error": None,
        }
        if result["status"] == "done" and result["raw_body"] is not None:
            body = json.loads(result["raw_body"])
            record["response"] = {"status_code": 200, "request_id": body.get("id"), "body": body}
        else:
            record["error"] = {"code": result["status"], "message": result["error"]}
        yield json.dumps(record, ensure_ascii=False) + "\n", record["error"] is None


def _result_arrays(results: list[tuple[Any, ...]]) -> list[pa.Array]:
    columns = list(zip(*results, strict=True)) if results else [()] * len(RESULT_COLUMNS)

    def column(name: str) -> tuple[Any, ...]:
        return columns[_COLUMN[name]]

    values: dict[str, Any] = {
        "id": column("row_id"),
        "cost_usd": [
            None if micros is None else micros_to_usd(micros) for micros in column("cost_micros")
        ],
    }
    return [
        pa.array(values[field.name] if field.name in values else column(field.name), field.type)
        for field in RESULT_SCHEMA
    ]


def _carried_fields(schemas: list[pa.Schema]) -> list[tuple[pa.Field, str]]:
    """(output field, input column) for the carried columns of every batch: a
    column typed alike everywhere keeps its type, types that promote are promoted
    (int -> double), a column with no common type is written as JSON text, and a
    column named like a result column gets the prefix `input_` (repeated until
    the name is free)."""
    seen: dict[str, list[pa.DataType]] = {}
    for schema in schemas:
        for field in schema:
            seen.setdefault(field.name, [])
            if field.type != pa.null():
                seen[field.name].append(field.type)
    taken = set(RESULT_SCHEMA.names) | set(seen)
    fields = []
    for name, types in seen.items():
        output_name = name
        if name in RESULT_SCHEMA.names:
            while output_name in taken:
                output_name = _CARRIED_PREFIX + output_name
            taken.add(output_name)
        fields.append((pa.field(output_name, _common_type(types)), name))
    return fields


def _common_type(types: list[pa.DataType]) -> pa.DataType:
    distinct = list(dict.fromkeys(types))
    if not distinct:
        return pa.null()
    if len(distinct) == 1:
        return distinct[0]
    try:
        unified = pa.unify_schemas(
            [pa.schema([("value", kind)]) for kind in distinct], promote_options="permissive"
        )
        return unified.field("value").type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return pa.string()


def _conform(batch: pa.RecordBatch, source: str, field: pa.Field) -> pa.Array:
    """The batch's `source` column cast to `field`'s common type (nulls if absent)."""
    if source not in batch.schema.names:
        return pa.nulls(batch.num_rows, field.type)
    array = batch.column(source)
    if array.type == field.type:
        return array
    if field.type == pa.string() and not pa.types.is_string(array.type):
        texts = [
            None if v is None else json.dumps(v, ensure_ascii=False, default=str)
            for v in array.to_pylist()
        ]
        return pa.array(texts, pa.string())
    return array.cast(field.type)


@contextlib.contextmanager
def _replace_atomically(path: Path, mode: str) -> Iterator[IO[Any]]:
    """A file at a temporary name that replaces `path` only once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed writer
        stale.unlink(missing_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open(mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
