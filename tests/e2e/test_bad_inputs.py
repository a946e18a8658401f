"""The malformed-input corpus (tests/bad_inputs) through the CLI: each case either
refuses the whole file before anything is sent (exit 2, naming the file and the
line or column), or rejects just its bad rows with their file and line while the
rest runs (exit 3). tests/bad_inputs/README.md lists the decisions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, JobWriter

CORPUS = REPO / "tests" / "bad_inputs"
TENANTS = {
    "acme": {"rpm": 6000, "tpm": 100_000, "allowed_models": ["deepseek-v3.2"]},
    "globex": {"rpm": 6000, "tpm": 100_000},
}


def submit(job: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runner", "submit", str(job), *args],
        cwd=job.parent,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
    )


def statuses(job: Path) -> list[tuple[str, str, str | None]]:
    table = pq.read_table(job.parent / "out" / "result.parquet")
    return list(
        zip(
            table.column("id").to_pylist(),
            table.column("status").to_pylist(),
            table.column("error").to_pylist(),
            strict=True,
        )
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("empty.jsonl", "the input file is empty"),
        ("only_blank_lines.jsonl", "the input file is empty"),
        ("all_garbage.jsonl", "no line is a JSON object; is it JSON Lines? (line 1: not valid"),
        ("prompts.csv", "cannot tell the input format from its name"),
        ("zero_rows.parquet", "the input file has no rows"),
        ("unknown_model.jsonl", "unknown_model.jsonl:2: model 'mystery-model-9' has no price"),
    ],
)
def test_files_refused_whole_before_anything_is_sent(
    write_job: JobWriter, name: str, message: str
) -> None:
    job = write_job(CORPUS / name, tenants=TENANTS)
    done = submit(job)
    assert done.returncode == 2, done.stderr
    assert name in done.stderr and message in done.stderr
    assert not (job.parent / "out").exists()


def test_a_wrong_column_name_in_the_mapping_refuses_the_parquet_file(
    write_job: JobWriter,
) -> None:
    job = write_job(
        CORPUS / "wrong_column_name.parquet",
        tenants=TENANTS,
        input_section='prompt = "prompt_text"',
    )
    done = submit(job)
    assert done.returncode == 2
    assert "maps column(s) ['prompt_text']" in done.stderr and "['id', 'question']" in done.stderr


@pytest.mark.parametrize("name", ["bom.jsonl", "crlf.jsonl", "blank_lines.jsonl"])
def test_encodings_and_spacing_that_are_fine(write_job: JobWriter, name: str) -> None:
    job = write_job(CORPUS / name, tenants=TENANTS)
    assert submit(job).returncode == 0
    assert [(row_id, status) for row_id, status, _ in statuses(job)] == [
        ("a", "done"),
        ("b", "done"),
    ]


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("truncated_last_line.jsonl", {"row-3": ":3: not valid JSON"}),
        ("not_json_line.jsonl", {"row-2": ":2: not valid JSON: Expecting value"}),
        (
            "not_an_object.jsonl",
            {
                "row-2": ":2: a JSON list, expected an object",
                "row-3": ":3: a JSON str, expected an object",
            },
        ),
        ("missing_prompt.jsonl", {"c": ":2: missing 'prompt' (or 'messages')"}),
        (
            "wrong_types.jsonl",
            {
                "c": ":2: 'max_tokens' must be a positive integer, not 'ten'",
                "d": ":3: 'messages' must be a non-empty list, not str",
                "e": ":4: 'temperature' must be a number, not str",
            },
        ),
        ("duplicate_ids.jsonl", {"a#2": ":2: duplicate id 'a' (first seen at"}),
        ("invalid_utf8.jsonl", {"row-2": ":2: not valid UTF-8 (byte 26)"}),
        ("unknown_tenant.jsonl", {"c": ":2: unknown tenant 'umbrella' (known: acme, globex)"}),
        ("model_not_allowed.jsonl", {"c": ":2: model 'gpt-4.1' is not allowed for tenant 'acme'"}),
        ("non_string_tenant.jsonl", {"c": ":2: 'tenant' must be a string, not int"}),
    ],
)
def test_bad_rows_are_rejected_with_file_and_line_and_the_rest_runs(
    write_job: JobWriter, name: str, bad: dict[str, str]
) -> None:
    job = write_job(CORPUS / name, tenants=TENANTS)
    done = submit(job)
    assert done.returncode == 3, done.stderr
    rows = statuses(job)
    seen: dict[str, int] = {}
    for row_id, status, error in rows:
        seen[row_id] = seen.get(row_id, 0) + 1
        key = row_id if seen[row_id] == 1 else f"{row_id}#{seen[row_id]}"
        if key in bad:
            assert status == "rejected"
            assert error is not None and error.startswith(str(CORPUS / name))
            assert bad[key] in error
        else:
            assert status == "done", (row_id, error)
    assert sum(status == "rejected" for _, status, _ in rows) == len(bad)


def test_duplicate_custom_ids_in_openai_batch_input(write_job: JobWriter, tmp_path: Path) -> None:
    job = write_job(CORPUS / "duplicate_custom_ids.jsonl", tenants=TENANTS)
    assert submit(job).returncode == 3
    assert [status for _, status, _ in statuses(job)] == ["done", "done", "rejected"]
    lines = (tmp_path / "out" / "result.errors.jsonl").read_text().splitlines()
    (error,) = [json.loads(line) for line in lines]
    assert error["custom_id"] == "r1" and "duplicate id 'r1'" in error["error"]["message"]


def test_a_5_mb_prompt_is_rejected_for_the_tenants_tpm_and_the_rest_runs(
    write_job: JobWriter, tmp_path: Path
) -> None:
    path = tmp_path / "huge.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": "small", "prompt": "hi"}) + "\n")
        handle.write(json.dumps({"id": "huge", "prompt": "lorem ipsum " * 440_000}) + "\n")
    assert path.stat().st_size > 5_000_000
    job = write_job(path, tenants=TENANTS)
    assert submit(job).returncode == 3
    (small, huge) = statuses(job)
    assert small[1] == "done" and huge[1] == "rejected"
    assert "but tenant 'acme' allows 100000 per minute" in str(huge[2])


def test_parquet_nulls_in_required_columns(write_job: JobWriter) -> None:
    job = write_job(CORPUS / "nulls_in_required.parquet", tenants=TENANTS)
    assert submit(job).returncode == 3
    assert statuses(job) == [
        ("a", "done", None),
        ("row-2", "done", None),
        (
            "c",
            "rejected",
            f"{CORPUS / 'nulls_in_required.parquet'}: row 3: missing 'prompt' (or 'messages')",
        ),
    ]


def test_parquet_nested_and_list_columns_are_carried_through(write_job: JobWriter) -> None:
    job = write_job(CORPUS / "nested_columns.parquet", tenants=TENANTS)
    assert submit(job).returncode == 0
    source = pq.read_table(CORPUS / "nested_columns.parquet")
    output = pq.read_table(job.parent / "out" / "result.parquet")
    for column in ("tags", "meta"):
        assert output.schema.field(column).type == source.schema.field(column).type
        assert output.column(column).to_pylist() == source.column(column).to_pylist()


def test_strict_refuses_a_file_with_any_row_problem(write_job: JobWriter) -> None:
    job = write_job(CORPUS / "not_json_line.jsonl", tenants=TENANTS)
    done = submit(job, "--strict")
    assert done.returncode == 2
    assert "--strict refuses the file; rejected rows:" in done.stderr
    assert "not_json_line.jsonl:2" in done.stderr
    assert not (job.parent / "out").exists()
