"""The Ray engine on a local Ray instance (2 CPUs, shared by this module's tests):
the same job gives the same rows as the local engine, a worker killed mid-run
loses and repeats nothing, per-tenant limits hold at a strict server with the
tenants spread over workers, budgets hold across runs, and the CLI works.

The simulator runs in a thread of this process and its `/stats` is the witness.
Workers read tenant keys from their own environment: the one Ray started with.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import runner
from runner import reports
from runner.engine import EngineSettings
from runner.simulator import SimulatorConfig, SimulatorThread
from runner.store import Store
from tests.conftest import SAMPLE_DATA, JobWriter, ledger_charges, run_cli

ray = pytest.importorskip("ray")

TENANTS = ("acme", "globex", "initech", "umbrella")
KEYS = {f"{tenant.upper()}_API_KEY": f"sk-{tenant}" for tenant in TENANTS}
FAST: dict[str, dict[str, object]] = {
    tenant: {"rpm": 6000, "tpm": 2_000_000, "max_parallel": 8} for tenant in TENANTS
}
FAST["globex"]["allowed_models"] = ["deepseek-v3.2"]  # rejects the row "pricey"
COMPARED = [
    "id",
    "topic",
    "tenant",
    "model",
    "status",
    "response",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "attempts",
    "resends",
    "error",
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """One local Ray instance for the module; its workers hold the tenants' keys."""
    saved = {name: os.environ.get(name) for name in KEYS}
    os.environ.update(KEYS)
    try:
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
    yield str(ray.get_runtime_context().gcs_address)
    ray.shutdown()


def write_input(path: Path, rows: int) -> Path:
    """Rows for four tenants in turn, plus rows every engine must reject alike."""
    lines = [
        {"id": f"q{n}", "tenant": TENANTS[n % 4], "prompt": f"Tell me about {n}.", "topic": n}
        for n in range(rows)
    ]
    lines += [
        {"id": "stranger", "tenant": "nobody", "prompt": "unknown tenant", "topic": -1},
        {"id": "q0", "tenant": "acme", "prompt": "a duplicate id", "topic": -2},
        {"id": "pricey", "tenant": "globex", "prompt": "hi", "model": "gpt-4.1", "topic": -3},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def by_id(table: pa.Table) -> list[dict[str, Any]]:
    return sorted(table.select(COMPARED).to_pylist(), key=lambda row: row["id"] + str(row["topic"]))


def request_rows(state: Path, run_id: str) -> dict[int, tuple[str, int, int, int | None]]:
    """seq -> (status, attempts, resends, cost_micros)"""
    with sqlite3.connect(state) as db:
        rows = db.execute(
            "SELECT seq, status, attempts, resends, cost_micros FROM requests WHERE run_id = ?",
            [run_id],
        ).fetchall()
    return {seq: (status, attempts, resends, cost) for seq, status, attempts, resends, cost in rows}


def test_the_same_job_gives_the_same_rows_statuses_and_costs_under_both_engines(
    cluster: str, tmp_path: Path, write_job: JobWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenants = {**FAST, "umbrella": {**FAST["umbrella"], "monthly_budget_usd": 5}}
    source = write_input(tmp_path / "in.jsonl", 120)
    with SimulatorThread(SimulatorConfig(latency_s=0.01)) as sim:
        job = write_job(source, base_url=sim.base_url, tenants=tenants)
        monkeypatch.setenv("UMBRELLA_API_KEY", "sk-umbrella")
        for name, key in KEYS.items():
            monkeypatch.setenv(name, key)
        local = runner.run_job(job, run_id="same", state=tmp_path / "local.db")
    (tmp_path / "out" / "result.parquet").rename(tmp_path / "local.parquet")
    with SimulatorThread(SimulatorConfig(latency_s=0.01)) as sim:
        job = write_job(source, base_url=sim.base_url, tenants=tenants)
        distributed = runner.run_job(
            job, run_id="same", state=tmp_path / "ray.db", engine="ray", workers=2, merge=True
        )
        seen = sim.stats()["client_request_ids"]

    assert local.exit_code == distributed.exit_code == 3  # three rows rejected
    assert local.counts == distributed.counts == {"done": 120, "rejected": 3}
    assert local.cost_micros == distributed.cost_micros > 0
    assert len(seen) == 120 and all(v == {"received": 1, "ok": 1} for v in seen.values())

    folder = tmp_path / "out" / "result"
    shards = sorted(folder.glob("shard-*.parquet"))
    assert distributed.outputs == (*shards, tmp_path / "out" / "result.parquet")
    expected = by_id(pq.read_table(tmp_path / "local.parquet"))
    assert by_id(pq.read_table(tmp_path / "out" / "result.parquet")) == expected
    assert by_id(pq.read_table(folder)) == expected  # the dataset: every row once
    tenant_sets = [set(pq.read_table(path).column("tenant").to_pylist()) for path in shards]
    assert len(shards) == 2 and not tenant_sets[0] & tenant_sets[1]  # whole tenants
    assert pq.read_table(shards[0]).schema == pq.read_table(tmp_path / "local.parquet").schema

    month = reports.current_month()
    stores = [Store(tmp_path / "local.db"), Store(tmp_path / "ray.db")]
    try:
        local_report, ray_report = (reports.month_report(store, month) for store in stores)
        assert local_report == ray_report and sum(r.spend_micros for r in ray_report) > 0
        for tenant in TENANTS:
            assert reports.invoice(stores[0], tenant, month) == reports.invoice(
                stores[1], tenant, month
            )
        assert ledger_charges(stores[1], "same") == distributed.cost_micros
        (reserved,) = stores[1].db.execute("SELECT SUM(reserved_micros) FROM balances").fetchone()
        assert reserved == 0  # the hand-off was given back
    finally:
        for store in stores:
            store.close()
    assert not list((tmp_path / "ray.db.shards").glob("*/*"))  # shards removed after the merge


def test_a_worker_killed_mid_run_is_retried_and_resumes_without_resending_finished_rows(
    cluster: str, tmp_path: Path, write_job: JobWriter
) -> None:
    rows = 160
    slow = {tenant: {**FAST[tenant], "max_parallel": 2} for tenant in TENANTS}
    with SimulatorThread(SimulatorConfig(latency_s=0.15, latency_jitter_s=0.1)) as sim:
        job = write_job(
            write_input(tmp_path / "in.jsonl", rows), base_url=sim.base_url, tenants=slow
        )
        results: list[runner.RunResult] = []
        thread = threading.Thread(
            target=lambda: results.append(
                runner.run_job(job, run_id="night", engine="ray", workers=2)
            )
        )
        thread.start()
        victim = wait_for_a_busy_worker(tmp_path / "state.db.shards" / "night")
        os.kill(victim, signal.SIGKILL)
        thread.join(timeout=120)
        seen = sim.stats()["client_request_ids"]

    (result,) = results
    assert result.exit_code == 3 and result.counts == {"done": rows, "rejected": 3}
    dataset = pq.read_table(tmp_path / "out" / "result")
    assert sorted(dataset.column("id").to_pylist()) == sorted(
        [f"q{n}" for n in range(rows)] + ["stranger", "q0", "pricey"]
    )
    state = request_rows(tmp_path / "state.db", "night")
    resent = 0
    for seq, (status, attempts, resends, _) in state.items():
        if status == "rejected":
            continue
        assert status == "done"
        witness = seen[f"night:{seq}"]
        assert witness["received"] <= attempts
        assert witness["ok"] <= 1 + resends  # a second answer only for a recorded re-send
        if resends == 0:
            assert witness["received"] == witness["ok"] == 1
        resent += resends
    # Only the killed worker's rows in flight or answered but not yet committed:
    # 2 tenants x max_parallel 2, each slot with one of each at most.
    assert 0 < resent <= 2 * 2 * 2
    with sqlite3.connect(tmp_path / "state.db") as db:
        sums = dict(db.execute("SELECT kind, SUM(amount_micros) FROM ledger GROUP BY kind"))
    assert sums["charge"] == sum(cost or 0 for *_, cost in state.values())


def wait_for_a_busy_worker(root: Path) -> int:
    """The pid of a shard's worker once that shard has finished some rows."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for pid_file in root.glob("*/shard-*.pid"):
            try:
                with sqlite3.connect(pid_file.with_suffix(".db")) as db:
                    (done,) = db.execute(
                        "SELECT COUNT(*) FROM requests WHERE status = 'done'"
                    ).fetchone()
            except sqlite3.OperationalError:
                continue  # the worker is still creating its database
            if done >= 10:
                return int(pid_file.read_text())
        time.sleep(0.05)
    raise AssertionError("no shard worker got going within 60 s")


def test_per_tenant_limits_hold_at_a_strict_server_with_tenants_spread_over_workers(
    cluster: str, tmp_path: Path, write_job: JobWriter
) -> None:
    """A 4-second window stands in for the minute, on both sides."""
    limits = {tenant: {**FAST[tenant], "rpm": 12} for tenant in TENANTS}
    config = SimulatorConfig(
        rpm=12, window_s=4.0, keys={f"sk-{tenant}": tenant for tenant in TENANTS}
    )
    with SimulatorThread(config) as sim:
        job = write_job(
            write_input(tmp_path / "in.jsonl", 80), base_url=sim.base_url, tenants=limits
        )
        settings = EngineSettings(window_s=4.0, margin_s=0.3)
        run = functools.partial(
            runner.run_job_async, job, settings=settings, engine="ray", workers=3
        )
        outcome = anyio.run(run)
        stats = sim.stats()
    assert outcome.counts == {"done": 80, "rejected": 3}
    assert len(list((tmp_path / "out" / "result").glob("shard-*.parquet"))) == 3
    assert stats["by_status"] == {"200": 80}  # not one 429
    assert stats["max_window_requests"] == dict.fromkeys(TENANTS, 12)  # used, never passed


def test_budgets_hold_across_runs_when_the_second_runs_on_ray(
    cluster: str, tmp_path: Path, write_job: JobWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local run spends part of acme's cap; the Ray run gets only the rest."""
    capped = {**FAST, "acme": {**FAST["acme"], "monthly_budget_usd": 0.0003}}
    with SimulatorThread(SimulatorConfig()) as sim:
        first = write_job(
            write_input(tmp_path / "a.jsonl", 8), base_url=sim.base_url, tenants=capped
        )
        monkeypatch.setenv("ACME_API_KEY", "sk-acme")
        monkeypatch.setenv("GLOBEX_API_KEY", "sk-globex")
        monkeypatch.setenv("INITECH_API_KEY", "sk-initech")
        monkeypatch.setenv("UMBRELLA_API_KEY", "sk-umbrella")
        runner.run_job(first, run_id="day")
        state = Store(tmp_path / "state.db")
        period = reports.current_period(state, "acme")
        spent_before = state.balance("acme", period).charged_micros
        second = write_job(
            write_input(tmp_path / "b.jsonl", 200), base_url=sim.base_url, tenants=capped
        )
        result = runner.run_job(second, run_id="night", engine="ray", workers=2)
    try:
        acme = next(t for t in result.tenants if t.tenant == "acme")
        assert acme.by_status["done"] > 0 and acme.by_status["deferred"] > 0
        balance = state.balance("acme", period)
        assert balance.charged_micros == spent_before + acme.cost_micros
        assert 0 < spent_before < balance.charged_micros <= 300  # the cap: $0.0003
        assert balance.reserved_micros == 0
        deferred = state.db.execute(
            "SELECT DISTINCT error FROM requests WHERE run_id = 'night' AND status = 'deferred'"
        ).fetchall()
        assert len(deferred) == 1 and "budget" in deferred[0][0]
    finally:
        state.close()


def test_the_cli_joins_a_cluster_by_address_and_report_sees_the_merged_spend(
    cluster: str, tmp_path: Path, write_job: JobWriter
) -> None:
    with SimulatorThread(SimulatorConfig()) as sim:
        job = write_job(write_input(tmp_path / "in.jsonl", 40), base_url=sim.base_url, tenants=FAST)
        done = run_cli(
            "submit", str(job), "--engine", "ray", "--address", cluster, "--workers", "2",
            cwd=tmp_path,
        )  # fmt: skip
    assert done.returncode == 3, done.stderr  # the three rejected rows
    assert "output: " + str(tmp_path / "out" / "result" / "shard-0.parquet") in done.stdout
    assert not (tmp_path / "out" / "result.parquet").exists()  # no merged file unless asked
    report = run_cli("report", "--format", "json", "--state", "state.db", cwd=tmp_path)
    rows = {row["tenant"]: row for row in json.loads(report.stdout)}
    costs = pq.read_table(tmp_path / "out" / "result").column("cost_usd").to_pylist()
    assert rows["TOTAL"]["requests"] == 40
    assert Decimal(rows["TOTAL"]["spend_usd"]) == sum(Decimal(str(c)) for c in costs if c)
    status = json.loads(run_cli("status", "--json", "--state", "state.db", cwd=tmp_path).stdout)
    assert status[0]["phase"] == "finished"


def test_without_ray_the_ray_engine_is_refused_with_how_to_install_it(
    tmp_path: Path, write_job: JobWriter
) -> None:
    job = write_job(write_input(tmp_path / "in.jsonl", 4))
    hide_ray = "import sys; sys.modules['ray'] = None; from runner.cli import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", hide_ray, "submit", str(job), "--engine", "ray"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "pip install 'runner[ray]'" in done.stderr


def test_a_killed_driver_is_resumed_and_what_its_workers_finished_is_not_sent_again(
    cluster: str, tmp_path: Path, write_job: JobWriter
) -> None:
    rows = 120
    slow = {tenant: {**FAST[tenant], "max_parallel": 2} for tenant in TENANTS}
    with SimulatorThread(SimulatorConfig(latency_s=0.15)) as sim:
        job = write_job(
            write_input(tmp_path / "in.jsonl", rows), base_url=sim.base_url, tenants=slow
        )
        submit = ["submit", str(job), "--run-id", "night", "--engine", "ray", "--address", cluster]
        driver = subprocess.Popen(
            [sys.executable, "-m", "runner", *submit],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_a_busy_worker(tmp_path / "state.db.shards" / "night")
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        assert not (tmp_path / "out" / "result").exists()
        resumed = run_cli("resume", "night", "--state", "state.db", cwd=tmp_path)
        seen = sim.stats()["client_request_ids"]

    assert resumed.returncode == 3, resumed.stderr  # the three rejected rows
    state = request_rows(tmp_path / "state.db", "night")
    assert sorted(status for status, *_ in state.values()) == ["done"] * rows + ["rejected"] * 3
    for seq, (status, attempts, resends, _) in state.items():
        if status == "done":
            witness = seen[f"night:{seq}"]
            assert witness["received"] <= attempts and witness["ok"] <= 1 + resends
            if resends == 0:
                assert witness["received"] == witness["ok"] == 1
    with sqlite3.connect(tmp_path / "state.db") as db:
        sums = dict(db.execute("SELECT kind, SUM(amount_micros) FROM ledger GROUP BY kind"))
    assert sums["charge"] == sum(cost or 0 for *_, cost in state.values())
    assert pq.read_table(tmp_path / "out" / "result").num_rows == rows + 3


def test_an_openai_batch_file_gets_the_same_batch_output_under_both_engines(
    cluster: str, tmp_path: Path, write_job: JobWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, key in KEYS.items():
        monkeypatch.setenv(name, key)
    price = (
        '[prices."meta-llama/Meta-Llama-3-8B-Instruct"]\ninput = 1\ncached_input = 1\noutput = 1'
    )
    lines = {}
    for engine in ("local", "ray"):
        with SimulatorThread(SimulatorConfig()) as sim:
            job = write_job(
                SAMPLE_DATA / "openai_batch.jsonl", base_url=sim.base_url, tenants=FAST, extra=price
            )
            result = runner.run_job(
                job, run_id=engine, state=tmp_path / f"{engine}.db", engine=engine
            )
        assert result.exit_code == 0
        output = tmp_path / "out" / "result.output.jsonl"
        lines[engine] = [json.loads(line) for line in output.read_text().splitlines()]
    assert all(line["error"] is None for line in lines["ray"])
    answers = {  # (the completion ids and timestamps differ from run to run)
        engine: sorted(
            (line["custom_id"], line["response"]["status_code"], body["choices"], body["usage"])
            for line in lines[engine]
            for body in [line["response"]["body"]]
        )
        for engine in lines
    }
    assert len(answers["ray"]) == 82 and answers["ray"] == answers["local"]
