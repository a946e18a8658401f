"""JSON Lines: one object per line, read line by line.

Shared by the table reader here and the OpenAI-batch reader: `json_lines` yields
(line number, object or problem) and skips blank lines; a UTF-8 BOM and CRLF line
endings are accepted. A line that is not UTF-8, not JSON, or not a JSON object is
a row problem, not a file error, so the rest of the file still runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from runner.config import InputMapping
from runner.errors import InputError
from runner.records import InputRow
from runner.sources import SourceBatch


def json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, object, problem) for every non-blank line."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise InputError(f"{path}: cannot read the input file: {exc.strerror}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.removeprefix(b"\xef\xbb\xbf") if number == 1 else raw
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, None, f"not valid UTF-8 (byte {exc.start})"
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                ending = "" if raw.endswith(b"\n") else " (the last line looks truncated)"
                yield number, None, f"not valid JSON: {exc.msg} at column {exc.colno}{ending}"
                continue
            if not isinstance(value, dict):
                yield number, None, f"a JSON {type(value).__name__}, expected an object"
                continue
            yield number, value, None


Split = Callable[[dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]


def read(
    path: Path, mapping: InputMapping, *, batch_rows: int, start_seq: int = 0
) -> Iterator[SourceBatch]:
    """A JSONL table: mapped keys become request fields, the others are carried."""
    columns = mapping.columns()
    consumed = set(columns.values())

    def split(obj: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        # A null counts as absent, as in Parquet, so the job's defaults apply.
        fields = {
            name: obj[column] for name, column in columns.items() if obj.get(column) is not None
        }
        return fields, {key: value for key, value in obj.items() if key not in consumed}

    return read_objects(path, split, batch_rows=batch_rows, start_seq=start_seq)


def read_objects(
    path: Path, split: Split, *, batch_rows: int, start_seq: int = 0
) -> Iterator[SourceBatch]:
    """Batches of rows from a JSONL file, `split` parting each object into
    request fields and carried values."""
    rows: list[InputRow] = []
    carried: list[dict[str, Any]] = []
    seq, parsed = start_seq, 0
    first_problem = ""
    for number, obj, problem in json_lines(path):
        fields, carry = split(obj) if obj is not None else ({}, {})
        rows.append(InputRow(seq, f"{path}:{number}", fields, problem))
        carried.append(carry)
        seq += 1
        parsed += obj is not None
        if problem and not first_problem:
            first_problem = f"line {number}: {problem}"
        if len(rows) >= batch_rows:
            yield SourceBatch(rows, carried_batch(carried))
            rows, carried = [], []
    if rows:
        yield SourceBatch(rows, carried_batch(carried))
    if seq == start_seq:
        raise InputError(f"{path}: the input file has no rows (only blank lines)")
    if parsed == 0:
        raise InputError(f"{path}: no line is a JSON object; is it JSON Lines? ({first_problem})")


def carried_batch(records: list[dict[str, Any]]) -> pa.RecordBatch:
    """Carried values as typed Arrow columns; a column whose values have no
    common type (an int here, a string there) is carried as JSON text."""
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    arrays = []
    for name in names:
        values = [record.get(name) for record in records]
        try:
            arrays.append(pa.array(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays.append(pa.array([_as_json(value) for value in values], pa.string()))
    if not arrays:
        return _empty(len(records))
    return pa.RecordBatch.from_arrays(arrays, names=list(names))


def _as_json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _empty(num_rows: int) -> pa.RecordBatch:
    """A batch with rows but no columns (pyarrow needs a schema to know the length)."""
    return pa.RecordBatch.from_struct_array(pa.array([{}] * num_rows, pa.struct([])))
