"""Shards without Ray: rows out of the run, one shard run in this process with
the worker's own code, outcomes and money merged back exactly once."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from sqlite_utils import Database

from runner import carried_columns
from runner.config import load_job
from runner.distributed.plan import tenant_work
from runner.distributed.shards import (
    HAND_OFF,
    hand_off,
    merge,
    shard_caps,
    write_shard,
)
from runner.distributed.worker import ShardTask, run_shard
from runner.records import Outcome, Request, Status
from runner.runs import register
from runner.schema import migrations
from runner.sources import file_hash
from runner.store import Store
from tests.conftest import JobWriter, ledger_charges, new_run

ONE_ROW = carried_columns.encode(pa.record_batch({"n": [0]}))
TENANTS = {
    "acme": {"rpm": 6000, "tpm": 1_000_000, "monthly_budget_usd": 1},
    "globex": {"rpm": 6000, "tpm": 1_000_000},
}


def write_input(path: Path) -> Path:
    rows = [
        {"id": f"q{n}", "tenant": ("acme", "globex")[n % 2], "prompt": f"Q {n}?"} for n in range(30)
    ]
    rows.append({"id": "x", "tenant": "nobody", "prompt": "unknown tenant"})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def ledger_rows(state: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(state) as db:
        return db.execute(
            "SELECT tenant, period, kind, amount_micros, reason FROM ledger"
        ).fetchall()


def balances_match_ledger(state: Path) -> bool:
    with sqlite3.connect(state) as db:
        balances = dict(db.execute("SELECT tenant, charged_micros FROM balances").fetchall())
        sums = dict(
            db.execute(
                "SELECT tenant, TOTAL(amount_micros) FROM ledger WHERE kind = 'charge'"
                " GROUP BY tenant"
            ).fetchall()
        )
        (reserved,) = db.execute("SELECT TOTAL(reserved_micros) FROM balances").fetchone()
    return all(balances[t] == sums[t] for t in sums) and reserved == 0


def test_a_shard_runs_on_its_own_database_and_merges_into_the_run_exactly_once(
    tmp_path: Path, write_job: JobWriter
) -> None:
    source = write_input(tmp_path / "in.jsonl")
    job = load_job(write_job(source, tenants=TENANTS))
    store = Store(tmp_path / "state.db")
    register(store, "r", job, [(source, file_hash(source))], input_hash="h")

    work = tenant_work(store, "r")
    assert {name: (w.rows, w.tokens > 0) for name, w in work.items()} == {
        "acme": (15, True),
        "globex": (15, True),
        "nobody": (0, False),  # its row is rejected: nothing to send
    }
    caps = hand_off(store, "r", job, ["acme", "globex"])
    assert caps == {"acme": 1_000_000}  # globex has no cap: nothing handed over
    (period,) = {period for _, period, *_ in ledger_rows(store.path)}
    assert store.balance("acme", period).reserved_micros == 1_000_000

    shard = tmp_path / "shards" / "shard-0.parquet"
    assert write_shard(store, "r", ["acme", "globex"], shard) == 30
    table = pq.read_table(shard)
    assert table.column("seq").to_pylist() == list(range(30))
    assert "sk-" not in json.dumps(table.to_pylist())  # no key travels in a shard

    shard_job = shard_caps(job, caps)
    assert shard_job.tenants["acme"].cap_micros == 1_000_000
    assert shard_job.tenants["acme"].alert_thresholds == []
    task = ShardTask("r", 0, shard_job.to_json(), "jsonl", shard, shard.with_suffix(".db"))
    execution = run_shard(task)
    assert not execution.interrupted and execution.outputs == ()
    assert task.pid_file.read_text().strip().isdigit()

    merge(store, "r", task.db, "t:0#")
    once = ledger_rows(store.path)
    merge(store, "r", task.db, "t:0#")  # a driver that died before removing the shard
    assert ledger_rows(store.path) == once
    # the next run's limiters count the shard's sends, each once
    remembered = {t: len(store.recent_sends(t, within_s=60.5)) for t in ("acme", "globex")}
    assert remembered == {"acme": 15, "globex": 15}

    counts = {c.tenant: c.by_status for c in store.counts("r")}
    assert counts == {"acme": {"done": 15}, "globex": {"done": 15}, "nobody": {"rejected": 1}}
    costs = store.db.execute("SELECT TOTAL(cost_micros) FROM requests WHERE run_id = 'r'")
    assert ledger_charges(store, "r") == int(costs.fetchone()[0]) > 0
    assert balances_match_ledger(store.path)  # the hand-off is released, nothing held
    kinds = [kind for _, _, kind, _, reason in once if reason == HAND_OFF]
    assert kinds == ["reserve", "release"]  # the hand-off, once each
    attempts = store.db.execute(
        "SELECT DISTINCT attempts, resends FROM requests WHERE status = 'done'"
    )
    assert attempts.fetchall() == [(1, 0)]
    bodies = store.db.execute("SELECT COUNT(*) FROM request_bodies WHERE run_id = 'r'")
    assert bodies.fetchone() == (0,)  # the merged rows are done: no request kept
    store.close()


def one_row_run(path: Path) -> Store:
    store = Store(path)
    new_run(store)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    store.register("r", [Request(0, "0", "acme", "m", "in:1", body, 5, 5)], [], ONE_ROW, 0)
    return store


def test_a_stale_shard_answer_the_run_did_not_take_leaves_the_row_its_request(
    tmp_path: Path,
) -> None:
    """A shard database merged after the run moved on (its row has more attempts
    there): the run keeps its own outcome, and the request it may send again."""
    shard = one_row_run(tmp_path / "shard-0.db")
    shard.checkpoint("r", outcomes=[Outcome(0, Status.DONE, 1, response="ok", cost_micros=1)])
    shard.close()
    store = one_row_run(tmp_path / "state.db")
    store.checkpoint("r", outcomes=[Outcome(0, Status.FAILED, 3, error="HTTP 500")])
    merge(store, "r", tmp_path / "shard-0.db", "t:0#")
    assert store.db.execute("SELECT status FROM requests").fetchall() == [("failed",)]
    store.requeue("r", retry_failed=True)
    (again,) = store.pending_page("r", "acme", after_seq=-1, limit=5)
    assert '"content":"hi"' in again.body


def test_a_shard_database_of_an_older_runner_is_migrated_before_its_merge(
    tmp_path: Path,
) -> None:
    shard = Database(tmp_path / "shard-0.db")
    migrations.apply(shard, stop_before="m003_bodies_until_answered")
    shard.execute(
        "INSERT INTO requests (run_id, seq, row_id, tenant, model, source, status, attempts,"
        " response, cost_micros) VALUES ('r', 0, '0', 'acme', 'm', 'in:1', 'done', 1, 'ok', 7)"
    )
    shard.execute(
        "INSERT INTO ledger (tenant, period, kind, amount_micros, model, run_id, seq, at)"
        " VALUES ('acme', '2026-12', 'charge', 7, 'm', 'r', 0, '2026-12-03T00:00:00')"
    )
    shard.conn.commit()
    shard.close()
    store = one_row_run(tmp_path / "state.db")
    merge(store, "r", tmp_path / "shard-0.db", "t:0#")
    assert store.db.execute("SELECT status, response FROM requests").fetchall() == [("done", "ok")]
    charges = store.db.execute("SELECT amount_micros, requests FROM ledger WHERE kind = 'charge'")
    assert charges.fetchall() == [(7, 1)]
    assert store.db.execute("SELECT COUNT(*) FROM request_bodies").fetchone() == (0,)
