"""Crash safety with real processes: SIGKILL at seeded random moments, then resume;
SIGINT for a graceful stop. The simulator runs in a thread of the test process,
so it outlives every killed runner and its `/stats` is the witness of what was sent.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from runner.lane_processes import ABORT_KILL_S
from runner.locks import RunLock
from runner.simulator import SimulatorConfig, SimulatorThread
from tests.conftest import JobWriter

TENANTS = ("acme", "globex", "initech")
FAST_TENANTS = {tenant: {"rpm": 3000, "tpm": 1_000_000, "max_parallel": 8} for tenant in TENANTS}
PACED = {tenant: {**limits, "rpm": 1200} for tenant, limits in FAST_TENANTS.items()}


def write_input(path: Path, rows: int) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for index in range(rows):
            row = {
                "id": f"q{index}",
                "tenant": TENANTS[index % 3],
                "prompt": f"Tell me about {index}.",
            }
            handle.write(json.dumps(row) + "\n")
    return path


def start(job: Path, cwd: Path, *, own_group: bool = False) -> subprocess.Popen[str]:
    """The submit; with `own_group`, as the leader of a process group (as a shell
    job, a `timeout` or a scheduler starts it) that a test can signal whole."""
    return subprocess.Popen(
        [sys.executable, "-m", "runner", "submit", str(job), "--run-id", "night"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=own_group,
    )


def kill_repeatedly(
    job: Path, cwd: Path, rng: random.Random, *, kills: int, longest_s: float
) -> int:
    """Start the run `kills` times, SIGKILL it after a random 0.3..longest_s seconds,
    check the database after each; returns how many kills landed before the end."""
    landed = 0
    for _ in range(kills):
        process = start(job, cwd)
        time.sleep(rng.uniform(0.3, longest_s))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            landed += 1
        process.communicate(timeout=60)
        assert integrity(cwd / "state.db") == "ok"
    return landed


def run_to_the_end(job: Path, cwd: Path) -> None:
    process = start(job, cwd)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr


def integrity(state: Path) -> str:
    with sqlite3.connect(state) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


def request_rows(state: Path) -> dict[int, tuple[str, int, int, int | None]]:
    """seq -> (status, attempts, resends, cost_micros)"""
    with sqlite3.connect(state) as db:
        rows = db.execute(
            "SELECT seq, status, attempts, resends, cost_micros FROM requests"
            " WHERE run_id = 'night'"
        ).fetchall()
    return {seq: (status, attempts, resends, cost) for seq, status, attempts, resends, cost in rows}


def use_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for tenant in TENANTS:
        monkeypatch.setenv(f"{tenant.upper()}_API_KEY", f"sk-{tenant}")


def done_rows(state: Path) -> int:
    """Rows done so far; 0 while the runner is still creating the database."""
    try:
        return sum(status == "done" for status, *_ in request_rows(state).values())
    except sqlite3.OperationalError:
        return 0


def all_done_as_sent(
    state: Path, seen: dict[str, dict[str, int]]
) -> dict[int, tuple[str, int, int, int | None]]:
    """The run's rows (`request_rows`), checked: every row done, the server never
    saw more sends than the store counted, nor a second answer but for a resend."""
    rows = request_rows(state)
    assert {status for status, *_ in rows.values()} == {"done"}
    for seq, (_, attempts, resends, _) in rows.items():
        assert seen[f"night:{seq}"]["received"] <= attempts
        assert seen[f"night:{seq}"]["ok"] <= 1 + resends
    return rows


def job_in_processes(
    write_job: JobWriter,
    folder: Path,
    base_url: str,
    rows: int,
    processes: int,
    tenants: dict[str, dict[str, object]] = FAST_TENANTS,
) -> Path:
    """A job over `rows` rows of the three tenants, sent from `processes` processes."""
    source = write_input(folder / "in.jsonl", rows)
    return write_job(source, base_url=base_url, tenants=tenants, job=f"processes = {processes}")


def wait_for_done(state: Path, rows: int) -> None:
    """Until `rows` rows are done, for a minute at most."""
    deadline = time.monotonic() + 60
    while done_rows(state) < rows and time.monotonic() < deadline:
        time.sleep(0.05)


def test_sigkill_at_random_moments_then_resume_loses_nothing_and_resends_only_in_flight(
    tmp_path: Path, write_job: JobWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(20261203)
    rows, kills = 500, 12
    config = SimulatorConfig(latency_s=0.02, latency_jitter_s=0.08)
    with SimulatorThread(config) as sim:
        job = write_job(
            write_input(tmp_path / "in.jsonl", rows), base_url=sim.base_url, tenants=FAST_TENANTS
        )
        use_keys(monkeypatch)
        killed = kill_repeatedly(job, tmp_path, rng, kills=kills, longest_s=1.8)
        assert killed >= kills // 2, "the kills should land mid-run"
        run_to_the_end(job, tmp_path)
        seen = sim.stats()["client_request_ids"]

    table = pq.read_table(tmp_path / "out" / "result.parquet")
    assert table.column("id").to_pylist() == [f"q{index}" for index in range(rows)]
    assert set(table.column("status").to_pylist()) == {"done"}

    state = request_rows(tmp_path / "state.db")
    for seq, (_, attempts, resends, _) in state.items():
        witness = seen[f"night:{seq}"]
        # A row is marked sent before its bytes leave: the server never sees more
        # sends than the store counted, and a second answer only after a crash.
        assert witness["received"] <= attempts
        assert witness["ok"] <= 1 + resends
        if resends == 0:
            assert witness["received"] == witness["ok"] == 1
    total_resends = sum(resends for _, _, resends, _ in state.values())
    assert total_resends <= killed * 3 * 8  # at most the requests in flight at each kill
    with sqlite3.connect(tmp_path / "state.db") as db:
        (ledger,) = db.execute(
            "SELECT SUM(amount_micros) FROM ledger WHERE run_id = 'night'"
        ).fetchone()
    assert ledger == sum(cost for _, _, _, cost in state.values() if cost is not None)
    assert ledger == round(sum(table.column("cost_usd").to_pylist()) * 1e6)


@pytest.mark.parametrize("processes", [1, 2])
def test_sigint_stops_gracefully_with_exit_130_and_resume_finishes(
    tmp_path: Path, write_job: JobWriter, monkeypatch: pytest.MonkeyPatch, processes: int
) -> None:
    """With two processes the signal reaches the parent alone, which relays it."""
    config = SimulatorConfig(latency_s=0.3)
    with SimulatorThread(config) as sim:
        job = job_in_processes(write_job, tmp_path, sim.base_url, 90, processes)
        use_keys(monkeypatch)
        process = start(job, tmp_path)
        wait_for_done(tmp_path / "state.db", 1)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 130, stderr
        assert "runner resume night" in stderr
        assert not (tmp_path / "out" / "result.parquet").exists()
        statuses = [status for status, *_ in request_rows(tmp_path / "state.db").values()]
        assert "sent" not in statuses  # in-flight requests were waited for
        assert 0 < statuses.count("done") < 90

        process = start(job, tmp_path)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        seen = sim.stats()["client_request_ids"]
    for tenant in TENANTS:  # the rows done before, and what the lanes report since
        assert f"progress {tenant}: 30/30 finished (30 done," in stderr
    assert len(seen) == 90
    assert all(entry == {"received": 1, "ok": 1} for entry in seen.values())
    assert pq.read_table(tmp_path / "out" / "result.parquet").num_rows == 90


def test_sigkill_under_provider_faults_and_budgets_keeps_the_money_exact(
    tmp_path: Path, write_job: JobWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten more kills, while the provider fails 10 % of requests, drops 5 % of
    connections and every tenant spends against a cap."""
    rng = random.Random(7)
    capped = {t: {**FAST_TENANTS[t], "rpm": 600, "monthly_budget_usd": 1} for t in TENANTS}
    config = SimulatorConfig(
        latency_s=0.02, latency_jitter_s=0.05, error_rate=0.1, drop_rate=0.05, seed=3
    )
    with SimulatorThread(config) as sim:
        job = write_job(
            write_input(tmp_path / "in.jsonl", 240),
            base_url=sim.base_url,
            tenants=capped,
            provider="max_attempts = 8\nbackoff_base_s = 0.01\nmax_backoff_s = 0.05",
        )
        use_keys(monkeypatch)
        killed = kill_repeatedly(job, tmp_path, rng, kills=10, longest_s=1.5)
        assert killed >= 8, "the kills should land mid-run"
        run_to_the_end(job, tmp_path)
        seen = sim.stats()["client_request_ids"]
    state = all_done_as_sent(tmp_path / "state.db", seen)
    with sqlite3.connect(tmp_path / "state.db") as db:
        sums = dict(db.execute("SELECT kind, SUM(amount_micros) FROM ledger GROUP BY kind"))
        balances = db.execute(
            "SELECT SUM(charged_micros), SUM(reserved_micros) FROM balances"
        ).fetchone()
    costs = sum(cost for _, _, _, cost in state.values() if cost is not None)
    assert sums["charge"] == costs == balances[0]
    assert sums["reserve"] == sums["release"] and balances[1] == 0  # nothing left reserved


@pytest.mark.parametrize("processes", [1, 3])
def test_sigterm_stops_gracefully_and_a_second_signal_stops_at_once(
    tmp_path: Path, write_job: JobWriter, monkeypatch: pytest.MonkeyPatch, processes: int
) -> None:
    with SimulatorThread(SimulatorConfig(latency_s=5.0)) as sim:
        job = job_in_processes(write_job, tmp_path, sim.base_url, 30, processes)
        use_keys(monkeypatch)
        process = start(job, tmp_path)
        deadline = time.monotonic() + 60
        while sim.stats()["requests"] < 24 and time.monotonic() < deadline:
            time.sleep(0.05)  # every slot holds a request that takes 5 s
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        stopped_in = time.monotonic() - started
    assert process.returncode == 130, stderr
    assert stopped_in < 4.0  # the second signal did not wait for the 5-second answers
    assert "stopping: no new requests" in stderr and "stopping now" in stderr
    assert integrity(tmp_path / "state.db") == "ok"
    statuses = [status for status, *_ in request_rows(tmp_path / "state.db").values()]
    assert statuses.count("sent") == 24  # in flight: sent again on resume
    assert not (tmp_path / "out" / "result.parquet").exists()


def test_sigkill_of_a_multi_process_run_ends_its_children_and_resume_finishes(
    tmp_path: Path, write_job: JobWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The children hold the run lock with the parent: after the parent's SIGKILL
    the run stays locked until they have stopped sending, and then they go."""
    rows = 600
    config = SimulatorConfig(latency_s=0.05, latency_jitter_s=0.1)
    with SimulatorThread(config) as sim:
        job = job_in_processes(write_job, tmp_path, sim.base_url, rows, 3, tenants=PACED)
        use_keys(monkeypatch)
        process = start(job, tmp_path)
        wait_for_done(tmp_path / "state.db", 60)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        lock = lock_file(tmp_path / "state.db", "night")
        released_in = wait_for_the_lock(lock, timeout_s=20)
        sent = sim.stats()["requests"]
        time.sleep(1.0)
        assert sim.stats()["requests"] == sent  # no orphan sends on
        assert released_in < 10
        assert integrity(tmp_path / "state.db") == "ok"
        assert 60 <= done_rows(tmp_path / "state.db") < rows

        run_to_the_end(job, tmp_path)
        seen = sim.stats()["client_request_ids"]
    all_done_as_sent(tmp_path / "state.db", seen)
    assert pq.read_table(tmp_path / "out" / "result.parquet").num_rows == rows


def lock_file(state: Path, run_id: str) -> Path:
    return RunLock(state, run_id).path


def wait_for_the_lock(path: Path, *, timeout_s: float) -> float:
    """Seconds until `path` could be locked; fails the test after `timeout_s`."""
    started = time.monotonic()
    handle = os.open(path, os.O_RDWR)
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                assert time.monotonic() - started < timeout_s, "the run stayed locked"
                time.sleep(0.02)
            else:
                return time.monotonic() - started
    finally:
        os.close(handle)


def lane_processes(parent: int) -> list[int]:
    """The pids of a running submit's lane processes (Linux /proc)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children]


def wait_for_lane_processes(parent: int, count: int) -> list[int]:
    deadline = time.monotonic() + 60
    while len(pids := lane_processes(parent)) < count:
        assert time.monotonic() < deadline, "the lane processes did not start"
        time.sleep(0.05)
    return pids


def test_one_sigterm_to_the_whole_process_group_stops_a_multi_process_run_gracefully(
    tmp_path: Path, write_job: JobWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `timeout`, systemd or a Ctrl-C deliver it: the children, in sessions of
    their own, do not also take it as a second signal (which stops at once)."""
    with SimulatorThread(SimulatorConfig(latency_s=0.3)) as sim:
        job = job_in_processes(write_job, tmp_path, sim.base_url, 300, 3)
        use_keys(monkeypatch)
        process = start(job, tmp_path, own_group=True)
        wait_for_done(tmp_path / "state.db", 30)
        os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.count("stopping: no new requests") == 1  # the parent's; it relayed the stop
    assert "stopping now" not in stderr
    statuses = [status for status, *_ in request_rows(tmp_path / "state.db").values()]
    assert "sent" not in statuses  # every request in flight was waited for
    assert 30 <= statuses.count("done") < 300


def test_a_lane_process_that_dies_fails_the_run_with_one_line_and_resume_finishes(
    tmp_path: Path, write_job: JobWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = 600
    with SimulatorThread(SimulatorConfig(latency_s=0.05, latency_jitter_s=0.1)) as sim:
        job = job_in_processes(write_job, tmp_path, sim.base_url, rows, 3, tenants=PACED)
        use_keys(monkeypatch)
        process = start(job, tmp_path)
        victim = wait_for_lane_processes(process.pid, 3)[0]
        wait_for_done(tmp_path / "state.db", 60)
        os.kill(victim, signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 2, stderr
        assert "a lane process failed" in stderr and "exited with -9" in stderr
        assert "runner resume night" in stderr
        assert "Traceback" not in stderr
        run_to_the_end(job, tmp_path)
    assert {status for status, *_ in request_rows(tmp_path / "state.db").values()} == {"done"}
    assert pq.read_table(tmp_path / "out" / "result.parquet").num_rows == rows


def test_a_lane_process_that_hangs_is_killed_after_an_abort(
    tmp_path: Path, write_job: JobWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SimulatorThread(SimulatorConfig(latency_s=0.2)) as sim:
        job = job_in_processes(write_job, tmp_path, sim.base_url, 300, 3)
        use_keys(monkeypatch)
        process = start(job, tmp_path)
        hung = wait_for_lane_processes(process.pid, 3)[0]
        wait_for_done(tmp_path / "state.db", 30)
        os.kill(hung, signal.SIGSTOP)
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        stopped_in = time.monotonic() - started
    assert process.returncode == 130, stderr  # stopped as asked, not failed
    assert stopped_in < ABORT_KILL_S + 5
    assert "did not stop within 5s of the abort; killed" in stderr
    assert integrity(tmp_path / "state.db") == "ok"
