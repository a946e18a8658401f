"""The state database: registration, duplicates, requeue, checkpoints, schema."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pyarrow as pa
import pytest
from sqlite_utils import Database

from runner import carried_columns
from runner.checkpoint import Checkpointer
from runner.errors import StateError
from runner.ledger import Entry, Kind
from runner.locks import RunLock, schema_lock
from runner.records import Outcome, Rejection, Request, Status, Usage
from runner.schema import migrations
from runner.store import SENDS_KEPT_S, FailedAttempt, SendMark, Store
from tests.conftest import ledger_charges, new_run


def request(seq: int, row_id: str, tenant: str = "acme") -> Request:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10}
    return Request(seq, row_id, tenant, "m", f"in.jsonl:{seq + 1}", body, 8, 10)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "state.db")
    new_run(store)
    requests = [request(0, "a"), request(1, "b", "globex"), request(2, "a"), request(4, "c")]
    rejection = Rejection(3, "d", "acme", "m", "in.jsonl:4", "not valid JSON")
    carried = carried_columns.encode(pa.record_batch({"n": list(range(5))}))
    store.register("r", requests, [rejection], carried, first_seq=0)
    return store


def statuses(store: Store) -> dict[int, str]:
    rows = store.db.execute("SELECT seq, status FROM requests WHERE run_id = 'r'").fetchall()
    return dict(rows)


def test_duplicate_ids_after_the_first_are_rejected_naming_the_first(store: Store) -> None:
    assert store.reject_duplicate_ids("r") == 1
    assert statuses(store) == {
        0: "pending",
        1: "pending",
        2: "rejected",
        3: "rejected",
        4: "pending",
    }
    assert store.rejections("r", limit=5) == [
        ("in.jsonl:3", "in.jsonl:3: duplicate id 'a' (first seen at in.jsonl:1)"),
        ("in.jsonl:4", "not valid JSON"),
    ]


def test_lanes_page_pending_rows_in_input_order(store: Store) -> None:
    assert store.lane_tenants("r") == {"acme": 18, "globex": 18}
    page = store.pending_page("r", "acme", after_seq=-1, limit=2)
    assert [p.seq for p in page] == [0, 2]
    assert [p.seq for p in store.pending_page("r", "acme", after_seq=2, limit=2)] == [4]
    assert page[0].tpm_cost == 18 and page[0].model == "m"


def test_requeue_resends_what_was_in_flight_and_retries_deferred(store: Store) -> None:
    store.checkpoint("r", sends=[SendMark(0, 1, "acme", 18), SendMark(1, 1, "globex", 18)])
    store.defer_tenant("r", "acme", "no key")
    assert statuses(store)[2] == "deferred" and statuses(store)[0] == "sent"
    assert store.requeue("r") == 2
    assert statuses(store) == {
        0: "pending",
        1: "pending",
        2: "pending",
        3: "rejected",
        4: "pending",
    }
    resends = dict(store.db.execute("SELECT seq, resends FROM requests").fetchall())
    assert resends == {0: 1, 1: 1, 2: 0, 3: 0, 4: 0}


def test_a_checkpoint_commits_outcomes_failures_and_charges_together(store: Store) -> None:
    usage = Usage(prompt_tokens=8, completion_tokens=5, cached_tokens=2)
    store.checkpoint(
        "r",
        sends=[SendMark(2, 1, "acme", 18)],
        outcomes=[Outcome(0, Status.DONE, 2, response="hi", usage=usage, cost_micros=17)],
        failures=[FailedAttempt(0, 1, 503, "HTTP 503")],
        entries=[Entry("acme", "2026-12", Kind.CHARGE, 17, "m", "r", 0)],
    )
    (acme,) = [counts for counts in store.counts("r") if counts.tenant == "acme"]
    assert acme.by_status == {"done": 1, "sent": 1, "pending": 1, "rejected": 1}
    assert (acme.prompt_tokens, acme.cached_tokens, acme.completion_tokens) == (8, 2, 5)
    assert acme.cost_micros == ledger_charges(store, "r") == 17
    assert store.db.execute("SELECT attempt, http_status FROM attempts").fetchall() == [(1, 503)]


def test_a_checkpoint_that_may_not_wait_writes_nothing_while_another_process_writes(
    store: Store,
) -> None:
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's write transaction
    started = time.monotonic()
    assert store.checkpoint("r", sends=[SendMark(2, 1, "acme", 18)], wait=False) is None
    assert time.monotonic() - started < 0.5  # at once, not after the busy timeout
    other.execute("ROLLBACK")
    assert statuses(store)[2] == "pending"
    assert store.db.execute("PRAGMA busy_timeout").fetchone() == (10_000,)  # restored
    assert store.checkpoint("r", sends=[SendMark(2, 1, "acme", 18)], wait=False) == {}
    assert statuses(store)[2] == "sent"
    other.close()


@pytest.mark.anyio
async def test_the_checkpointer_lets_the_event_loop_run_while_another_process_writes(
    store: Store,
) -> None:
    """SQLite's own wait would block the thread, and every lane with it."""
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    checkpointer = Checkpointer(store, "r")
    ticks = 0
    async with anyio.create_task_group() as group:
        group.start_soon(checkpointer.run)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as sending:
                sending.start_soon(checkpointer.mark_sent, 2, 1, "acme", 18)
                for _ in range(30):
                    await anyio.sleep(0.01)
                    ticks += 1
                assert statuses(store)[2] == "pending"
                other.execute("ROLLBACK")
        group.cancel_scope.cancel()
    assert ticks == 30
    assert statuses(store)[2] == "sent"
    other.close()


def test_sends_are_remembered_for_the_limiters_of_runs_to_come(store: Store) -> None:
    """One row per tenant and checkpoint; read back as one send each, the tokens
    shared with their sum kept; forgotten once older than SENDS_KEPT_S."""
    acme = [SendMark(seq, 1, "acme", tokens) for seq, tokens in [(0, 18), (2, 18), (4, 19)]]
    store.checkpoint("r", sends=[*acme, SendMark(1, 1, "globex", 18)])
    assert store.db.execute("SELECT tenant, requests, tokens FROM recent_sends").fetchall() == [
        ("acme", 3, 55),
        ("globex", 1, 18),
    ]
    remembered = store.recent_sends("acme", within_s=60.5)
    assert sorted(tokens for _, tokens in remembered) == [18, 18, 19]
    assert all(0 <= age < 5 for age, _ in remembered)
    assert [tokens for _, tokens in store.recent_sends("globex", within_s=60.5)] == [18]
    store.db.execute("UPDATE recent_sends SET sent_at = sent_at - ?", [SENDS_KEPT_S + 1])
    store.db.conn.commit()
    assert store.recent_sends("acme", within_s=60.5) == []
    store.checkpoint("r", sends=[SendMark(0, 2, "acme", 18)])
    assert store.db.execute("SELECT tenant, requests FROM recent_sends").fetchall() == [("acme", 1)]
    with pytest.raises(ValueError, match="kept"):
        store.recent_sends("acme", within_s=SENDS_KEPT_S + 1)


def kept_bodies(store: Store) -> dict[int, str]:
    rows = store.db.execute("SELECT seq, body FROM request_bodies WHERE run_id = 'r'")
    return dict(rows.fetchall())


def test_a_request_is_kept_until_it_is_done_and_no_longer(store: Store) -> None:
    """Rejected rows never keep one; a failed or deferred row keeps its request
    for a later resume; a done row's request goes in the checkpoint that
    records its answer."""
    assert sorted(kept_bodies(store)) == [0, 1, 2, 4]
    store.reject_duplicate_ids("r")
    assert sorted(kept_bodies(store)) == [0, 1, 4]
    store.checkpoint(
        "r",
        outcomes=[
            Outcome(0, Status.DONE, 1, response="hi", usage=Usage(8, 1), cost_micros=3),
            Outcome(1, Status.FAILED, 3, error="HTTP 400"),
        ],
    )
    assert sorted(kept_bodies(store)) == [1, 4]
    store.defer_tenant("r", "acme", "budget exhausted")
    store.requeue("r", retry_failed=True)
    (globex,) = store.pending_page("r", "globex", after_seq=-1, limit=5)
    assert (globex.seq, globex.body) == (1, kept_bodies(store)[1])
    assert '"content":"x"' in globex.body
    assert [p.seq for p in store.pending_page("r", "acme", after_seq=-1, limit=5)] == [4]


def test_a_source_waits_beside_its_request_and_stays_on_the_row_only_if_rejected(
    store: Store,
) -> None:
    """A row's "file:line" is only read to name it in an error, so an accepted
    row's goes with its request once answered; a rejected row keeps its own."""
    sources = dict(store.db.execute("SELECT seq, source FROM requests WHERE run_id = 'r'"))
    assert sources == {0: "", 1: "", 2: "", 3: "in.jsonl:4", 4: ""}
    waiting = store.db.execute("SELECT seq, source FROM request_bodies WHERE run_id = 'r'")
    assert dict(waiting.fetchall()) == {
        0: "in.jsonl:1",
        1: "in.jsonl:2",
        2: "in.jsonl:3",
        4: "in.jsonl:5",
    }
    store.reject_duplicate_ids("r")
    on_rows = store.db.execute("SELECT seq, source FROM requests WHERE source != ''")
    assert dict(on_rows.fetchall()) == {2: "in.jsonl:3", 3: "in.jsonl:4"}


def test_a_row_to_send_without_its_request_stops_the_run_instead_of_being_skipped(
    store: Store,
) -> None:
    store.db.execute("DELETE FROM request_bodies WHERE seq = 2")
    with pytest.raises(StateError, match="request 2 of run 'r' is still to be sent"):
        store.pending_page("r", "acme", after_seq=-1, limit=5)


def test_a_request_an_older_runner_kept_on_its_row_is_still_sent(store: Store) -> None:
    """An older runner that opened the database before a newer one upgraded it
    registers its rows' bodies where it always did, on the row itself."""
    store.db.execute(
        "UPDATE requests SET body = (SELECT body FROM request_bodies WHERE seq = 2) WHERE seq = 2"
    )
    store.db.execute("DELETE FROM request_bodies WHERE seq = 2")
    page = store.pending_page("r", "acme", after_seq=-1, limit=5)
    assert [(request.seq, json.loads(request.body)["max_tokens"]) for request in page] == [
        (0, 10),
        (2, 10),
        (4, 10),
    ]


def test_the_pages_of_answered_requests_go_back_to_the_file_system(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    new_run(store)
    body = {"model": "m", "messages": [{"role": "user", "content": "q" * 2000}]}
    requests = [Request(seq, str(seq), "acme", "m", "in:1", body, 500, 1) for seq in range(3000)]
    store.register("r", requests, [], carried_columns.encode(pa.record_batch({"n": [0]})), 0)
    registered = store.db.execute("PRAGMA page_count").fetchone()[0]
    outcomes = [Outcome(seq, Status.DONE, 1, response="a") for seq in range(3000)]
    store.checkpoint("r", outcomes=outcomes)
    (free,) = store.db.execute("PRAGMA freelist_count").fetchone()
    steps: list[str] = []
    store.db.conn.set_trace_callback(
        lambda statement: steps.append(statement) if "incremental_vacuum" in statement else None
    )
    assert store.release_free_pages(pages_per_step=100) == free > 1000
    assert len(steps) == -(-free // 100)  # a hundred pages per transaction, not one
    store.db.conn.set_trace_callback(None)
    assert store.db.execute("PRAGMA freelist_count").fetchone() == (0,)
    # 3,000 requests of 2 KB were registered; what stays is their short answers.
    assert store.db.execute("PRAGMA page_count").fetchone()[0] < registered / 10
    assert store.release_free_pages() == 0


def test_carried_columns_come_back_as_registered(store: Store) -> None:
    ((first_seq, data),) = list(store.carried_batches("r"))
    batch = carried_columns.decode(data)
    assert first_seq == 0 and batch.column("n").to_pylist() == [0, 1, 2, 3, 4]
    assert [carried_columns.decode_schema(blob) for blob in store.carried_schemas("r")] == [
        pa.schema([("n", pa.int64())])
    ]


def test_planning_a_run_over_a_broken_database_is_a_state_error(store: Store) -> None:
    assert store.pending_work("r") == {"acme": (3, 3 * 18), "globex": (1, 18)}  # 8 + 10 each
    store.db.execute("ALTER TABLE requests RENAME TO requests_gone")
    with pytest.raises(StateError, match="no such table: requests"):
        store.pending_work("r")


def test_deleting_a_run_leaves_no_rows(store: Store) -> None:
    store.delete_run("r")
    assert store.run("r") is None
    assert store.db.execute("SELECT COUNT(*) FROM requests").fetchone() == (0,)


def test_a_database_from_a_newer_runner_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "state.db").close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute(
            "INSERT INTO _sqlite_migrations (migration_set, name, applied_at)"
            " VALUES ('runner', 'm999_future', 'now')"
        )
    with pytest.raises(StateError, match="written by a newer runner"):
        Store(tmp_path / "state.db")


def test_a_file_that_is_not_sqlite_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StateError, match="cannot open the state database"):
        Store(tmp_path / "state.db")


def test_an_unknown_run_is_a_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="no run 'nope'"):
        Store(tmp_path / "state.db").require_run("nope")


def test_a_database_of_the_first_release_gains_the_per_tenant_costs_and_indexes(
    tmp_path: Path,
) -> None:
    db = Database(tmp_path / "state.db")
    migrations.apply(db, stop_before="m002_indexes_for_a_million_rows")
    db.execute(
        "INSERT INTO runs (run_id, job_name, job_json, input_path, input_format, input_hash,"
        " output_path, phase, created_at, updated_at)"
        " VALUES ('old', 'j', '{}', 'in', 'jsonl', 'h', 'out', 'ready', 't', 't')"
    )
    for seq, tenant, estimate, status in [
        (0, "acme", 5, "done"),
        (1, "acme", 40, "pending"),
        (2, "globex", 7, "pending"),
        (3, "initech", 9, "done"),
    ]:
        db.execute(
            "INSERT INTO requests (run_id, seq, row_id, tenant, model, source, status,"
            " prompt_estimate, max_tokens) VALUES ('old', ?, ?, ?, 'm', 's', ?, ?, 10)",
            [seq, str(seq), tenant, status, estimate],
        )
    db.conn.commit()
    db.close()
    store = Store(tmp_path / "state.db")
    assert store.lane_tenants("old") == {"acme": 50, "globex": 17}
    indexes = {name for (name,) in store.db.execute("SELECT name FROM sqlite_master")}
    assert {"requests_status", "requests_reserved"} <= indexes
    assert "requests_lane" not in indexes


def test_a_database_of_the_second_release_keeps_only_the_requests_still_to_answer(
    tmp_path: Path,
) -> None:
    db = Database(tmp_path / "state.db")
    migrations.apply(db, stop_before="m003_bodies_until_answered")
    db.execute(
        "INSERT INTO runs (run_id, job_name, job_json, input_path, input_format, input_hash,"
        " output_path, phase, created_at, updated_at)"
        " VALUES ('old', 'j', '{}', 'in', 'jsonl', 'h', 'out', 'interrupted', 't', 't')"
    )
    for seq, status, body in [
        (0, "done", '{"n":0}'),
        (1, "pending", '{"n":1}'),
        (2, "rejected", None),
        (3, "failed", '{"n":3}'),
    ]:
        db.execute(
            "INSERT INTO requests (run_id, seq, row_id, tenant, model, source, status, body,"
            " prompt_estimate, max_tokens) VALUES ('old', ?, ?, 'acme', 'm', 's', ?, ?, 5, 5)",
            [seq, str(seq), status, body],
        )
    db.conn.commit()
    db.close()
    store = Store(tmp_path / "state.db")
    bodies = store.db.execute("SELECT seq, body FROM request_bodies WHERE run_id = 'old'")
    assert bodies.fetchall() == [(1, '{"n":1}'), (3, '{"n":3}')]
    old_bodies = store.db.execute("SELECT COUNT(*) FROM requests WHERE body IS NOT NULL")
    assert old_bodies.fetchone() == (0,)  # (the column stays, unused)
    pending = store.pending_page("old", "acme", after_seq=-1, limit=5)
    assert [(p.seq, p.body) for p in pending] == [(1, '{"n":1}')]


def test_a_database_of_the_fourth_release_still_names_where_its_duplicates_were(
    tmp_path: Path,
) -> None:
    """Rows registered before m005 hold their source on the row and none beside
    their request; the duplicate search and the Ray shards read either."""
    db = Database(tmp_path / "state.db")
    migrations.apply(db, stop_before="m005_sources_until_answered")
    db.execute(
        "INSERT INTO runs (run_id, job_name, job_json, input_path, input_format, input_hash,"
        " output_path, phase, created_at, updated_at)"
        " VALUES ('old', 'j', '{}', 'in', 'jsonl', 'h', 'out', 'registering', 't', 't')"
    )
    for seq, row_id in [(0, "a"), (1, "b"), (2, "a")]:
        db.execute(
            "INSERT INTO requests (run_id, seq, row_id, tenant, model, source, status,"
            " prompt_estimate, max_tokens) VALUES ('old', ?, ?, 'acme', 'm', ?, 'pending', 5, 5)",
            [seq, row_id, f"old.jsonl:{seq + 1}"],
        )
        db.execute("INSERT INTO request_bodies (run_id, seq, body) VALUES ('old', ?, '{}')", [seq])
    db.conn.commit()
    db.close()
    store = Store(tmp_path / "state.db")
    indexes = {name for (name,) in store.db.execute("SELECT name FROM sqlite_master")}
    assert "requests_row_id" not in indexes
    assert store.reject_duplicate_ids("old") == 1
    assert store.rejections("old", limit=5) == [
        ("old.jsonl:3", "old.jsonl:3: duplicate id 'a' (first seen at old.jsonl:1)")
    ]


def test_processes_that_open_an_older_database_at_once_upgrade_it_in_turn(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    db = Database(path)
    migrations.apply(db, stop_before="m003_bodies_until_answered")
    db.close()
    opening = [sys.executable, "-c", f"from runner.store import Store; Store({str(path)!r})"]
    with schema_lock(path):
        first = subprocess.Popen(opening)
        time.sleep(1.0)
        assert first.poll() is None  # it waits for the lock held here
        assert "m003_bodies_until_answered" not in applied_migrations(path)
        others = [subprocess.Popen(opening) for _ in range(3)]
    assert [p.wait(timeout=60) for p in [first, *others]] == [0, 0, 0, 0]
    upgraded = applied_migrations(path)
    assert {"m003_bodies_until_answered", "m004_ledger_rows_sum_requests"} <= upgraded


def test_an_upgrade_waits_for_the_runs_of_an_older_runner_to_end(tmp_path: Path) -> None:
    """A migration moves rows (bodies, sources) from under any process of the
    older release still running on the database, so it is refused until that
    run ends; a run lock this process holds itself (the Ray driver's on a shard)
    does not stand in the way."""
    path = tmp_path / "state.db"
    db = Database(path)
    migrations.apply(db, stop_before="m003_bodies_until_answered")
    db.close()
    script = (
        "import pathlib, sys; from runner.locks import RunLock; "
        "lock = RunLock(pathlib.Path(sys.argv[1]), 'nightly').__enter__(); "
        "print('held', flush=True); input()"
    )
    older = subprocess.Popen(
        [sys.executable, "-c", script, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert older.stdout is not None and older.stdout.readline() == "held\n"
        with pytest.raises(StateError, match=f"older runner are using it \\(pid {older.pid} on"):
            Store(path)
        assert "m003_bodies_until_answered" not in applied_migrations(path)
    finally:
        older.communicate("\n", timeout=30)
    with RunLock(path, "own"):
        Store(path).close()
    assert "m006_recent_sends" in applied_migrations(path)


def test_a_send_mark_without_its_tenant_and_cost_is_refused() -> None:
    with pytest.raises(ValueError, match="tenant and TPM cost"):
        SendMark(0, 1)


def applied_migrations(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {name for (name,) in db.execute("SELECT name FROM _sqlite_migrations")}


def test_resuming_a_run_reads_no_finished_row(store: Store) -> None:
    """The queries of a resume's start visit only the table rows they select by
    status (in flight, pending, deferred), held reservation or recent send: a
    half-done million-row run starts at once. Counting may read the index."""
    statements: list[str] = []
    store.db.conn.set_trace_callback(statements.append)
    store.requeue("r", retry_failed=True)
    store.status_counts("r")
    store.lane_tenants("r")
    store.pending_page("r", "acme", after_seq=-1, limit=10)
    store.recent_sends("acme", within_s=60.5)
    store.db.conn.set_trace_callback(None)
    queries = [s for s in statements if s.lstrip().upper().startswith(("SELECT", "UPDATE"))]
    assert len(queries) == 8
    selective = ("status=?", "requests_reserved", "sent_at>?", "COVERING INDEX")
    for query in queries:
        plan = [row[3] for row in store.db.execute(f"EXPLAIN QUERY PLAN {query}")]
        steps = [step for step in plan if {"requests", "recent_sends"} & set(step.split())]
        assert steps, (query, plan)
        for step in steps:
            assert step.startswith("SEARCH") and any(s in step for s in selective), (query, step)


def test_opening_an_up_to_date_database_takes_no_write_lock(tmp_path: Path) -> None:
    """A command that opens the database (status, report, another run) must not
    wait on a long write, such as a prune's VACUUM, just to open it."""
    path = tmp_path / "state.db"
    Store(path).close()
    writer = sqlite3.connect(path, timeout=0)
    writer.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        store = Store(path)
        assert time.monotonic() - started < 2.0
        assert int(store.db.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2  # incremental
        store.close()
    finally:
        writer.rollback()
        writer.close()
