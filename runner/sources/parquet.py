"""Parquet tables, read in record batches; carried columns keep their Arrow types."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from runner.config import InputMapping
from runner.errors import InputError
from runner.records import InputRow
from runner.sources import SourceBatch


def streaming(path: Path) -> pq.ParquetFile:
    """A Parquet file to read in batches with memory that stays at one batch."""
    # pre_buffer (the default) keeps what it read ahead for the file's lifetime:
    # memory would grow with the file.
    return pq.ParquetFile(path, pre_buffer=False)


def read(
    path: Path, mapping: InputMapping, *, batch_rows: int, start_seq: int = 0
) -> Iterator[SourceBatch]:
    try:
        parquet = streaming(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: not a readable Parquet file: {exc}") from None
    present = set(parquet.schema_arrow.names)
    missing = sorted(mapping.required_columns() - present)
    if missing:
        raise InputError(
            f"{path}: the job maps column(s) {missing} but the file has none of that name; "
            f"its columns are {sorted(present)}"
        )
    if parquet.metadata.num_rows == 0:
        raise InputError(f"{path}: the input file has no rows")
    mapped = {name: column for name, column in mapping.columns().items() if column in present}
    carried_names = [name for name in parquet.schema_arrow.names if name not in mapped.values()]
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows):
            values = {name: batch.column(column).to_pylist() for name, column in mapped.items()}
            rows = []
            for index in range(batch.num_rows):
                fields = {name: column_values[index] for name, column_values in values.items()}
                fields = {name: value for name, value in fields.items() if value is not None}
                rows.append(InputRow(start_seq + row, f"{path}: row {row + 1}", fields))
                row += 1
            yield SourceBatch(rows, batch.select(carried_names))
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: cannot read row {row + 1} onwards: {exc}") from None
