"""Outputs: carried columns unified across batches, atomic replacement."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner import carried_columns
from runner.records import Outcome, Request, Status, Usage
from runner.sinks import RESULT_SCHEMA, write_batch_jsonl, write_parquet
from runner.store import Store
from tests.conftest import new_run


def register(store: Store, batches: list[pa.RecordBatch]) -> None:
    new_run(store)
    seq = 0
    for batch in batches:
        requests = []
        for _ in range(batch.num_rows):
            body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
            requests.append(Request(seq, f"id{seq}", "acme", "m", "in:1", body, 5, 5))
            seq += 1
        carried = carried_columns.encode(batch)
        store.register("r", requests, [], carried, first_seq=seq - batch.num_rows)


def test_carried_columns_keep_promote_or_fall_back_to_json_across_batches(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    register(
        store,
        [
            pa.record_batch(
                {
                    "a": [1, 2],
                    "b": [None, None],
                    "c": [1, 2],
                    "status": ["x", "y"],
                    "input_status": ["p", "q"],
                }
            ),
            pa.record_batch({"a": [3], "b": ["t"], "c": ["three"]}),
            pa.record_batch({"a": [4.5], "d": [[1, 2]]}),
        ],
    )
    rows = write_parquet(store, "r", tmp_path / "out.parquet")
    table = pq.read_table(tmp_path / "out.parquet")
    assert rows == table.num_rows == 4
    assert table.schema.names[:6] == ["a", "b", "c", "input_input_status", "input_status", "d"]
    assert table.schema.names[6:] == RESULT_SCHEMA.names
    assert table.column("a").to_pylist() == [1.0, 2.0, 3.0, 4.5]  # int64 + double -> double
    assert table.column("b").to_pylist() == [None, None, "t", None]
    assert table.column("c").to_pylist() == ["1", "2", "three", None]  # no common type: JSON
    assert table.column("d").to_pylist() == [None, None, None, [1, 2]]
    assert table.column("input_input_status").to_pylist() == ["x", "y", None, None]
    assert table.column("input_status").to_pylist() == ["p", "q", None, None]
    assert table.column("status").to_pylist() == ["pending"] * 4
    assert table.column("id").to_pylist() == ["id0", "id1", "id2", "id3"]


def test_a_failed_write_leaves_the_previous_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "s.db")
    register(store, [pa.record_batch({"a": [1]})])
    output = tmp_path / "out.parquet"
    write_parquet(store, "r", output)
    before = output.read_bytes()

    def broken_replace(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    store.checkpoint("r", outcomes=[Outcome(0, Status.DONE, 1, response="new", usage=Usage(1, 1))])
    with pytest.raises(OSError, match="disk full"):
        write_parquet(store, "r", output)
    assert output.read_bytes() == before
    assert [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")] == []


def test_batch_output_has_every_custom_id_and_errors_repeat_the_failures(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    register(store, [pa.record_batch({"a": [1, 2]})])
    raw = '{"id": "chatcmpl-1", "choices": []}'
    store.checkpoint(
        "r",
        outcomes=[
            Outcome(0, Status.DONE, 1, response="ok", usage=Usage(1, 1), raw_body=raw),
            Outcome(1, Status.FAILED, 3, error="HTTP 500: boom"),
        ],
    )
    write_batch_jsonl(store, "r", tmp_path / "o.jsonl", tmp_path / "e.jsonl")
    output = (tmp_path / "o.jsonl").read_text().splitlines()
    errors = (tmp_path / "e.jsonl").read_text().splitlines()
    assert len(output) == 2 and errors == output[1:]
    assert '"custom_id": "id0"' in output[0] and '"request_id": "chatcmpl-1"' in output[0]
    assert '"error": {"code": "failed", "message": "HTTP 500: boom"}' in output[1]
