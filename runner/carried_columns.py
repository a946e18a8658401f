"""Carried columns (an input's columns that are not request fields) to and from
the bytes the state database keeps (`CarriedColumns`): one Arrow IPC stream per
input batch, so that Parquet types survive to the output exactly."""

from __future__ import annotations

import pyarrow as pa

from runner.records import CarriedColumns


def encode(batch: pa.RecordBatch) -> CarriedColumns:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    schema = batch.schema.serialize().to_pybytes()
    return CarriedColumns(batch.num_rows, schema, sink.getvalue().to_pybytes())


def decode(data: bytes) -> pa.RecordBatch:
    return pa.ipc.open_stream(data).read_next_batch()


def decode_schema(schema: bytes) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(schema))
