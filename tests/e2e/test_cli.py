"""The CLI as a user runs it: `python -m runner` in a subprocess, real files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from tests.conftest import SAMPLE_DATA, JobWriter, run_cli

LLAMA_PRICE = '[prices."meta-llama/Meta-Llama-3-8B-Instruct"]\ninput = 0.05\noutput = 0.1\n'


def test_submit_runs_the_sample_parquet_to_one_done_row_per_input_row(
    tmp_path: Path, write_job: JobWriter
) -> None:
    job = write_job(SAMPLE_DATA / "prompts.parquet", input_section='prompt = "turns"')
    done = run_cli("submit", str(job), "--run-id", "nightly", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"output: {tmp_path / 'out' / 'result.parquet'}" in done.stdout
    assert "TOTAL" in done.stdout and "160" in done.stdout
    source = pq.read_table(SAMPLE_DATA / "prompts.parquet")
    result = pq.read_table(tmp_path / "out" / "result.parquet")
    assert result.column("id").to_pylist() == source.column("id").to_pylist()
    assert result.column("tenant").to_pylist() == source.column("tenant").to_pylist()
    assert result.column("reference").to_pylist() == source.column("reference").to_pylist()
    assert set(result.column("status").to_pylist()) == {"done"}

    status = run_cli("status", "nightly", "--json", "--state", "state.db", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    (run,) = json.loads(status.stdout)
    assert run["phase"] == "finished" and run["rows"] == 160
    per_tenant = {t["tenant"]: t["by_status"]["done"] for t in run["tenants"]}
    counted = {}
    for tenant in result.column("tenant").to_pylist():
        counted[tenant] = counted.get(tenant, 0) + 1
    assert per_tenant == counted

    again = run_cli("submit", str(job), "--run-id", "nightly", cwd=tmp_path)
    assert again.returncode == 0
    assert "TOTAL" in again.stdout


def test_openai_batch_input_gets_openai_format_output_lines(
    tmp_path: Path, write_job: JobWriter
) -> None:
    job = write_job(SAMPLE_DATA / "openai_batch.jsonl", extra=LLAMA_PRICE)
    done = run_cli("submit", str(job), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "out" / "result.output.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    inputs = [
        json.loads(line) for line in (SAMPLE_DATA / "openai_batch.jsonl").read_text().splitlines()
    ]
    assert [r["custom_id"] for r in records] == [i["custom_id"] for i in inputs]
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in records)
    first = records[0]["response"]["body"]
    assert first["model"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert first["usage"]["completion_tokens"] <= 1000
    assert (tmp_path / "out" / "result.errors.jsonl").read_text() == ""


def test_an_unpriced_model_exits_2_before_anything_is_sent(
    tmp_path: Path, write_job: JobWriter
) -> None:
    job = write_job(SAMPLE_DATA / "openai_batch.jsonl")
    refused = run_cli("submit", str(job), cwd=tmp_path)
    assert refused.returncode == 2
    assert "model 'meta-llama/Meta-Llama-3-8B-Instruct' has no price" in refused.stderr
    assert "openai_batch.jsonl:1" in refused.stderr
    assert not (tmp_path / "out").exists()
    status = run_cli("status", "--state", "state.db", cwd=tmp_path)
    assert "no runs yet" in status.stdout


def test_a_bad_job_file_exits_2_naming_the_key(tmp_path: Path, write_job: JobWriter) -> None:
    job = write_job(SAMPLE_DATA / "prompts.parquet", tenants={"acme": {"rpm": "lots"}})
    refused = run_cli("submit", str(job), cwd=tmp_path)
    assert refused.returncode == 2
    assert "[tenants.acme] rpm: Input should be a valid integer" in refused.stderr


def test_resume_of_an_unknown_run_exits_2_and_creates_nothing(
    tmp_path: Path, write_job: JobWriter
) -> None:
    missing = run_cli("resume", "nope", "--state", "state.db", cwd=tmp_path)
    assert missing.returncode == 2
    assert "state.db: no state database here; pass --state PATH" in missing.stderr
    assert not (tmp_path / "state.db").exists()
    status = run_cli("status", cwd=tmp_path)
    assert status.returncode == 2 and not (tmp_path / "runner.db").exists()

    job = write_job(SAMPLE_DATA / "prompts.parquet", input_section='prompt = "turns"')
    assert run_cli("submit", str(job), "--run-id", "real", cwd=tmp_path).returncode == 0
    unknown = run_cli("resume", "nope", "--state", "state.db", cwd=tmp_path)
    assert unknown.returncode == 2
    assert "no run 'nope'" in unknown.stderr


def test_runner_help_lists_the_exit_codes(tmp_path: Path) -> None:
    shown = run_cli("--help", cwd=tmp_path)
    assert "130  interrupted" in shown.stdout and "3    finished, with failed" in shown.stdout
