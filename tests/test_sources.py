"""Streaming readers on the real prompt files, odd encodings, and round trips."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.config import InputMapping
from runner.errors import InputError
from runner.sources import SourceBatch, detect_format, open_source
from tests.conftest import SAMPLE_DATA, SHARED_DATA

TURNS = InputMapping(id="question_id", prompt="turns")


def read_all(path: Path, mapping: InputMapping = TURNS, **kwargs: Any) -> list[SourceBatch]:
    return list(open_source(path, mapping, **kwargs))


def test_mt_bench_streams_in_batches_with_continuous_positions() -> None:
    batches = read_all(SHARED_DATA / "mt_bench_questions.jsonl", batch_rows=16)
    assert [len(batch.rows) for batch in batches] == [16] * 5
    rows = [row for batch in batches for row in batch.rows]
    assert [row.seq for row in rows] == list(range(80))
    first = rows[0]
    assert first.fields["id"] == 81
    assert (
        first.fields["prompt"][1]
        == "Rewrite your previous response. Start every sentence with the letter A."
    )
    assert first.where.endswith("mt_bench_questions.jsonl:1")
    # question_id and turns are consumed; category and reference are carried
    assert batches[0].carried.schema.names == ["category", "reference"]
    assert batches[0].carried.num_rows == 16


def test_reading_a_parquet_file_holds_one_row_group_in_memory_not_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "big.parquet"
    rng = random.Random(7)
    with pq.ParquetWriter(path, pa.schema([("id", pa.string()), ("prompt", pa.string())])) as out:
        for group in range(40):  # 40 row groups of 1,000 prompts that do not compress
            ids = [f"{group}-{i}" for i in range(1000)]
            prompts = [rng.randbytes(500).hex() for _ in range(1000)]
            out.write_table(pa.table({"id": ids, "prompt": prompts}))
    peak = rows = 0
    for batch in open_source(path, InputMapping(id="id", prompt="prompt"), batch_rows=500):
        rows += len(batch.rows)
        peak = max(peak, pa.total_allocated_bytes())
    assert rows == 40_000
    assert peak < 8_000_000  # a row group is 1 MB; the whole file would be 40


def test_the_openai_batch_example_is_detected_and_read_as_it_is() -> None:
    path = SHARED_DATA / "openai_batch_example.jsonl"
    assert detect_format(path) == "openai_batch"
    (batch,) = read_all(path, InputMapping())
    assert [row.fields["custom_id"] for row in batch.rows] == ["request-1", "request-2"]
    assert batch.rows[0].fields["body"]["max_completion_tokens"] == 1000
    assert batch.carried.num_rows == 2


def test_sample_parquet_keeps_list_columns_with_their_arrow_types() -> None:
    path = SAMPLE_DATA / "prompts.parquet"
    assert detect_format(path) == "parquet"
    batches = read_all(path, InputMapping(prompt="turns"))
    assert sum(len(batch.rows) for batch in batches) == 160
    carried = batches[0].carried.schema
    assert carried.field("reference").type == pa.list_(pa.string())
    assert "turns" not in carried.names and "id" not in carried.names


def write_lines(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "input.jsonl"
    path.write_bytes(data)
    return path


def test_bom_crlf_and_blank_lines_are_accepted(tmp_path: Path) -> None:
    data = b'\xef\xbb\xbf{"id": 1, "prompt": "a"}\r\n\r\n   \n{"id": 2, "prompt": "b"}\r\n'
    (batch,) = read_all(write_lines(tmp_path, data), InputMapping())
    assert [(row.fields["id"], row.problem) for row in batch.rows] == [(1, None), (2, None)]
    assert [row.where.rsplit(":", 1)[1] for row in batch.rows] == ["1", "4"]


def test_unparseable_lines_become_problem_rows_with_their_line_numbers(tmp_path: Path) -> None:
    data = (
        b'{"id": 1, "prompt": "fine"}\n'
        b"not json\n"
        b"[1, 2]\n"
        b'{"id": 4, "prompt": "caf\xe9"}\n'
        b'{"id": 5, "prompt": "cut'
    )
    (batch,) = read_all(write_lines(tmp_path, data), InputMapping())
    problems = [(row.where.rsplit(":", 1)[1], row.problem) for row in batch.rows]
    assert problems[0] == ("1", None)
    assert problems[1][0] == "2" and "not valid JSON" in str(problems[1][1])
    assert problems[2] == ("3", "a JSON list, expected an object")
    assert problems[3][0] == "4" and "not valid UTF-8" in str(problems[3][1])
    assert problems[4][0] == "5" and "truncated" in str(problems[4][1])


@pytest.mark.parametrize("data", [b"", b"\n\n  \n"])
def test_an_input_without_rows_is_refused(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(InputError, match=r"empty|no rows"):
        read_all(write_lines(tmp_path, data), InputMapping(format="jsonl"))


def test_a_mapped_column_missing_from_parquet_refuses_the_file(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["hi"]}), path)
    with pytest.raises(InputError, match=r"maps column\(s\) \['question'\].*\['id', 'text'\]"):
        read_all(path, InputMapping(prompt="question"))


def test_parquet_nulls_count_as_absent_and_nested_columns_are_carried(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    table = pa.table(
        {
            "id": ["a", "b"],
            "prompt": ["hi", None],
            "max_tokens": pa.array([None, 5], pa.int64()),
            "meta": pa.array([{"k": [1, 2]}, None], pa.struct([("k", pa.list_(pa.int64()))])),
        }
    )
    pq.write_table(table, path)
    (batch,) = read_all(path, InputMapping())
    assert batch.rows[0].fields == {"id": "a", "prompt": "hi"}
    assert batch.rows[1].fields == {"id": "b", "max_tokens": 5}
    assert batch.carried.column("meta").to_pylist() == [{"k": [1, 2]}, None]


def test_a_jsonl_column_without_one_type_is_carried_as_json_text(tmp_path: Path) -> None:
    data = b'{"prompt": "a", "extra": 1}\n{"prompt": "b", "extra": "two"}\n'
    (batch,) = read_all(write_lines(tmp_path, data), InputMapping())
    assert batch.carried.column("extra").to_pylist() == ["1", '"two"']


def test_a_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such input file"):
        read_all(tmp_path / "missing.jsonl")


ROWS = st.lists(
    st.fixed_dictionaries(
        {
            "id": st.text(min_size=1, max_size=8),
            "prompt": st.text(min_size=1, max_size=40),
            "score": st.integers(-(2**40), 2**40),
        }
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=ROWS)
def test_jsonl_and_parquet_round_trip_generated_rows(
    tmp_path: Path, rows: list[dict[str, Any]]
) -> None:
    jsonl = tmp_path / "rt.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    parquet = tmp_path / "rt.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, parquet):
        batches = read_all(path, InputMapping(), batch_rows=7)
        read_rows = [row for batch in batches for row in batch.rows]
        assert [row.fields["id"] for row in read_rows] == [row["id"] for row in rows]
        assert [row.fields["prompt"] for row in read_rows] == [row["prompt"] for row in rows]
        scores = [value for batch in batches for value in batch.carried.column("score").to_pylist()]
        assert scores == [row["score"] for row in rows]


def test_a_file_whose_name_names_no_known_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "prompts.csv"
    path.write_text("id,prompt\n1,hi\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"prompts\.csv: cannot tell the input format"):
        read_all(path, InputMapping())


def test_a_jsonl_file_in_which_no_line_is_an_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.jsonl"
    path.write_text("# notes\nnot json either\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"no line is a JSON object.*line 1: not valid JSON"):
        read_all(path, InputMapping())
