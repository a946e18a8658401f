"""Real processes competing for one run, runs left half-registered, money commands."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from runner.simulator import SimulatorConfig, SimulatorThread
from runner.store import Store
from tests.conftest import SAMPLE_DATA, JobWriter, new_run, run_cli


def status_json(cwd: Path, *run_id: str) -> Any:
    return json.loads(run_cli("status", *run_id, "--json", "--state", "state.db", cwd=cwd).stdout)


def test_a_second_process_on_a_running_run_exits_4_and_sends_nothing(
    tmp_path: Path, write_job: JobWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACME_API_KEY", "sk-a")
    monkeypatch.setenv("GLOBEX_API_KEY", "sk-g")
    monkeypatch.setenv("INITECH_API_KEY", "sk-i")
    # 160 rows, 24 at a time, 1 s each: the first run lasts about 7 s, long enough
    # for the two others to start (slowly, on a loaded machine) while it runs.
    with SimulatorThread(SimulatorConfig(latency_s=1.0)) as sim:
        job = write_job(
            SAMPLE_DATA / "prompts.parquet", input_section='prompt = "turns"', base_url=sim.base_url
        )
        first = subprocess.Popen(
            [sys.executable, "-m", "runner", "submit", str(job), "--run-id", "night"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while sim.stats()["requests"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        with ThreadPoolExecutor() as pool:  # both at once, while the first still runs
            submits = pool.submit(run_cli, "submit", str(job), "--run-id", "night", cwd=tmp_path)
            resumes = pool.submit(run_cli, "resume", "night", "--state", "state.db", cwd=tmp_path)
            second, resume = submits.result(), resumes.result()
        assert first.poll() is None  # (else this test proves nothing)
        _, stderr = first.communicate(timeout=120)
        seen = sim.stats()["client_request_ids"]
    assert second.returncode == 4 and resume.returncode == 4
    assert "run 'night' is already running (pid " in second.stderr
    assert first.returncode == 0, stderr
    assert len(seen) == 160
    assert all(entry == {"received": 1, "ok": 1} for entry in seen.values())
    again = run_cli("resume", "night", "--state", "state.db", cwd=tmp_path)
    assert again.returncode == 0  # the lock went with the process that held it


def test_a_run_stopped_while_registering_is_refused_by_resume_and_redone_by_submit(
    tmp_path: Path, write_job: JobWriter
) -> None:
    job = write_job(SAMPLE_DATA / "prompts.parquet", input_section='prompt = "turns"')
    store = Store(tmp_path / "state.db")
    new_run(store, "night", job_name="test")
    store.close()
    refused = run_cli("resume", "night", "--state", "state.db", cwd=tmp_path)
    assert refused.returncode == 2
    assert "stopped while registering its input" in refused.stderr
    assert "runner submit JOB.toml --run-id night" in refused.stderr
    redone = run_cli("submit", str(job), "--run-id", "night", cwd=tmp_path)
    assert redone.returncode == 0, redone.stderr
    assert "160" in redone.stdout


def test_money_commands_from_the_command_line(tmp_path: Path, write_job: JobWriter) -> None:
    tenants = {
        name: {"rpm": 6000, "tpm": 1_000_000, "monthly_budget_usd": 0.001}
        for name in ("acme", "globex", "initech")
    }
    job = write_job(
        SAMPLE_DATA / "prompts.parquet", input_section='prompt = "turns"', tenants=tenants
    )
    estimate = run_cli("estimate", str(job), "--format", "json", cwd=tmp_path)
    assert estimate.returncode == 0, estimate.stderr
    rows = {row["tenant"]: row for row in json.loads(estimate.stdout)}
    assert rows["acme"]["rows"] == 53 and rows["acme"]["budget_left_usd"] == "0.001000"
    assert rows["acme"]["fits"] is False
    assert not (tmp_path / "state.db").exists()  # a dry run writes nothing

    first = run_cli("submit", str(job), "--run-id", "m", cwd=tmp_path)
    assert first.returncode == 3
    assert "budget exhausted" in first.stdout
    for tenant in ("acme", "globex", "initech"):
        topped = run_cli(
            "topup", tenant, "0.05", "--reason", "pilot", "--state", "state.db", cwd=tmp_path
        )
        assert topped.returncode == 0, topped.stderr
    second = run_cli("resume", "m", "--state", "state.db", cwd=tmp_path)
    assert second.returncode == 0, second.stderr

    report = run_cli("report", "--format", "json", "--state", "state.db", cwd=tmp_path)
    table = {row["tenant"]: row for row in json.loads(report.stdout)}
    assert table["TOTAL"]["requests"] == 160
    assert table["acme"]["budget_usd"] == "0.051000"
    invoice = json.loads(run_cli("invoice", "acme", "--state", "state.db", cwd=tmp_path).stdout)
    assert invoice["tenant"] == "acme" and invoice["total_usd"] == table["acme"]["spend_usd"]
    assert [t["reason"] for t in invoice["topups"]] == ["pilot"]
    assert "globex" not in json.dumps(invoice) and "initech" not in json.dumps(invoice)
    invoice_csv = run_cli("invoice", "acme", "--format", "csv", "--state", "state.db", cwd=tmp_path)
    items = list(csv.DictReader(io.StringIO(invoice_csv.stdout)))
    assert [item["item"] for item in items] == ["usage", "topup", "total"]
    assert items[1]["reason"] == "pilot" and items[2]["amount_usd"] == invoice["total_usd"]
    csv_report = run_cli("report", "--format", "csv", "--state", "state.db", cwd=tmp_path)
    assert csv_report.stdout.splitlines()[0].startswith("tenant,requests,prompt_tokens")

    bad = run_cli("topup", "acme", "0", "--reason", "x", "--state", "state.db", cwd=tmp_path)
    assert bad.returncode == 2 and "must be more than zero" in bad.stderr
    bad_period = run_cli("report", "--period", "2026-13", "--state", "state.db", cwd=tmp_path)
    assert bad_period.returncode == 2 and "expected a month as YYYY-MM" in bad_period.stderr


def test_a_nightly_template_continues_the_nights_run_and_refuses_a_changed_input(
    tmp_path: Path, write_job: JobWriter
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"q{n}", "prompt": f"Q {n}?"}) + "\n" for n in range(5)),
        encoding="utf-8",
    )
    job = write_job(source)
    first = run_cli("submit", str(job), "--run-id", "{job}-{date}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (run,) = status_json(tmp_path)
    assert run["run_id"] == f"test-{time.strftime('%Y-%m-%d', time.gmtime())}"
    again = run_cli("submit", str(job), "--run-id", "{job}-{date}", cwd=tmp_path)
    assert again.returncode == 0
    assert len(status_json(tmp_path)) == 1

    with source.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": "late", "prompt": "one more"}) + "\n")
    changed = run_cli("submit", str(job), "--run-id", "{job}-{date}", cwd=tmp_path)
    assert changed.returncode == 2
    assert "changed since the run was registered; submit with --restart" in changed.stderr
    restarted = run_cli("submit", str(job), "--run-id", "{job}-{date}", "--restart", cwd=tmp_path)
    assert restarted.returncode == 0
    (run,) = status_json(tmp_path)
    assert run["rows"] == 6

    bad = run_cli("submit", str(job), "--run-id", "{job}-{nightly}", cwd=tmp_path)
    assert bad.returncode == 2 and "use {job}, {date}, {datetime}, {input_hash}" in bad.stderr


def test_json_logs_and_result_for_log_shippers(tmp_path: Path, write_job: JobWriter) -> None:
    job = write_job(SAMPLE_DATA / "prompts.parquet", input_section='prompt = "turns"')
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner",
            "--log-format",
            "json",
            "submit",
            str(job),
            "--run-id",
            "j",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["event"] == "finished" and result["counts"] == {"done": 160}
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert {event["event"] for event in events} == {"progress"}
    assert all(event["run_id"] == "j" and "tenant" in event for event in events)
    status = status_json(tmp_path, "j")
    assert sum(t["by_status"]["done"] for t in status[0]["tenants"]) == 160

    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner",
            "--log-format",
            "json",
            "resume",
            "nope",
            "--state",
            "state.db",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    (error,) = [json.loads(line) for line in refused.stderr.splitlines()]
    assert (
        refused.returncode == 2
        and error["event"] == "error"
        and "no run 'nope'" in error["message"]
    )


def test_prune_drops_old_rows_keeps_summaries_and_the_ledger(
    tmp_path: Path, write_job: JobWriter
) -> None:
    job = write_job(SAMPLE_DATA / "prompts.parquet", input_section='prompt = "turns"')
    assert run_cli("submit", str(job), "--run-id", "old", cwd=tmp_path).returncode == 0
    before = status_json(tmp_path, "old")
    report = ("report", "--format", "json", "--state", "state.db")
    report_before = run_cli(*report, cwd=tmp_path).stdout

    kept = run_cli("prune", "--older-than", "1d", "--state", "state.db", cwd=tmp_path)
    assert kept.returncode == 0 and "pruned 0 run(s), 0 request rows" in kept.stdout
    time.sleep(0.05)
    pruned = run_cli("prune", "--older-than", "0s", "--state", "state.db", cwd=tmp_path)
    assert pruned.returncode == 0, pruned.stderr
    assert "pruned 1 run(s), 160 request rows" in pruned.stdout and "  old" in pruned.stdout

    after = status_json(tmp_path, "old")
    assert after[0]["phase"] == "pruned"
    assert after[0]["tenants"] == before[0]["tenants"]
    report_after = run_cli(*report, cwd=tmp_path).stdout
    assert report_after == report_before
    resumed = run_cli("resume", "old", "--state", "state.db", cwd=tmp_path)
    assert resumed.returncode == 2 and "was pruned" in resumed.stderr
    bad = run_cli("prune", "--older-than", "soon", "--state", "state.db", cwd=tmp_path)
    assert bad.returncode == 2 and "expected a number and s, m, h, d or w" in bad.stderr


def test_a_folder_input_takes_each_new_settled_file_once(
    tmp_path: Path, write_job: JobWriter
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()

    def drop(name: str, ids: range) -> None:
        rows = "".join(json.dumps({"id": f"{name}{n}", "prompt": f"Q {n}?"}) + "\n" for n in ids)
        (inbox / name).write_text(rows, encoding="utf-8")

    drop("a.jsonl", range(3))
    drop("b.jsonl", range(2))
    drop("c.jsonl.part", range(9))  # still being uploaded
    drop(".d.jsonl", range(9))  # hidden
    job = write_job(inbox, input_section="settle_s = 0.2")
    first = run_cli("submit", str(job), "--run-id", "{job}-{input_hash}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    ids = pq.read_table(tmp_path / "out" / "result.parquet").column("id").to_pylist()
    assert ids == ["a.jsonl0", "a.jsonl1", "a.jsonl2", "b.jsonl0", "b.jsonl1"]

    nothing = run_cli("submit", str(job), "--run-id", "{job}-{input_hash}", cwd=tmp_path)
    assert nothing.returncode == 0
    assert "no new input files for job 'test'" in nothing.stderr

    drop("e.jsonl", range(2))
    growing = inbox / "f.jsonl"
    growing.write_text(json.dumps({"id": "f0", "prompt": "Q?"}) + "\n", encoding="utf-8")
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time,sys\nfor n in range(40):\n time.sleep(0.05)\n"
            f' open({str(growing)!r},\'a\').write(\'{{"id": "f%d", "prompt": "Q"}}\\n\' % n)',
        ],
    )
    third = run_cli("submit", str(job), "--run-id", "{job}-{input_hash}", cwd=tmp_path)
    writer.wait()
    assert third.returncode == 0, third.stderr
    assert f"skipping {growing}: it is still being written" in third.stderr
    ids = pq.read_table(tmp_path / "out" / "result.parquet").column("id").to_pylist()
    assert ids == ["e.jsonl0", "e.jsonl1"]
    runs = status_json(tmp_path)
    assert [run["rows"] for run in runs] == [5, 2]


def test_a_folder_job_that_stopped_early_continues_that_run_first(
    tmp_path: Path, write_job: JobWriter
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.jsonl").write_text(
        "".join(json.dumps({"id": f"a{n}", "prompt": "Q?"}) + "\n" for n in range(4)),
        encoding="utf-8",
    )
    job = write_job(inbox, input_section="settle_s = 0")
    assert run_cli("submit", str(job), cwd=tmp_path).returncode == 0
    with sqlite3.connect(tmp_path / "state.db") as db:  # as a kill mid-run leaves it
        db.execute("UPDATE runs SET phase = 'interrupted'")
        db.execute("UPDATE requests SET status = 'sent' WHERE seq >= 2")
        db.execute(  # (a request in flight is kept until it is answered)
            "INSERT INTO request_bodies (run_id, seq, body) SELECT run_id, seq, json_object("
            "'model', model, 'messages', json_array(json_object('role', 'user', 'content', 'Q?'))"
            ") FROM requests WHERE seq >= 2"
        )
    again = run_cli("submit", str(job), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "continuing the unfinished run test-" in again.stderr
    (run,) = status_json(tmp_path)
    assert run["phase"] == "finished"
    assert run["tenants"][0]["by_status"]["done"] == 4 and run["tenants"][0]["resends"] == 2


def test_continuing_a_run_without_one_of_its_tenants_is_refused(
    tmp_path: Path, write_job: JobWriter
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(
        json.dumps({"id": "a", "prompt": "Q?", "tenant": "acme"})
        + "\n"
        + json.dumps({"id": "b", "prompt": "Q?", "tenant": "globex"})
        + "\n",
        encoding="utf-8",
    )
    job = write_job(source, base_url="http://127.0.0.1:9/v1")  # keys missing: rows deferred
    assert run_cli("submit", str(job), "--run-id", "r", cwd=tmp_path).returncode == 3
    fewer = write_job(source, tenants={"acme": {"rpm": 60}}, name="job.toml")
    refused = run_cli("submit", str(fewer), "--run-id", "r", cwd=tmp_path)
    assert refused.returncode == 2
    assert "has rows to send for tenant(s) ['globex']" in refused.stderr
    resumed = run_cli("resume", "r", "--state", "state.db", cwd=tmp_path)
    assert resumed.returncode == 3  # the recorded job still has globex: no crash
