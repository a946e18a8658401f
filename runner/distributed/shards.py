"""The driver's state database and the shards: rows out, outcomes and money back.

A shard is a Parquet file of the rows that one worker sends, taken from the run
as the driver registered it (validated once, with the run's own sequence
numbers, so a shard's requests carry the same `X-Client-Request-Id` as under the
local engine). The worker loads it into its own shard database and runs the
ordinary engine there. Afterwards `merge` copies the rows' outcomes, failed
attempts and ledger entries back into the run's state database in one
transaction; a merge repeated after a crash changes nothing (each ledger entry
is tagged with its shard and id, and only entries past the last merged id are
added).

Budgets: `hand_off` reserves, in the run's state database, each capped tenant's
whole remaining budget for the period, and the shard's worker gets that amount
as the tenant's cap; other jobs sharing the database see it as reserved, and the
shard can never spend more. `merge` releases a tenant's hand-off in the same
transaction that brings its charges in.

This module speaks SQL to the `Store`'s tables directly (ATTACH of a shard
database, bulk copies); it keeps the store's rules: its writes go through
`Store.transaction()`, and no bare `sqlite3` error leaves it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from runner import carried_columns, ledger
from runner.config import Job
from runner.errors import StateError
from runner.ledger import Entry, Kind, period_of
from runner.records import Request
from runner.sources import file_hash
from runner.sources import parquet as parquet_source
from runner.store import BODY, SENDS_KEPT_S, SOURCE, Store, missing_body, utc_now

HAND_OFF = "budget handed to Ray workers"
SHARD_SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),
        ("row_id", pa.string()),
        ("tenant", pa.string()),
        ("model", pa.string()),
        ("source", pa.string()),
        ("body", pa.string()),
        ("prompt_estimate", pa.int64()),
        ("max_tokens", pa.int64()),
        ("attempts", pa.int64()),
        ("resends", pa.int64()),
    ]
)
# (the body and source come from request_bodies, or the row if an older runner wrote them)
_FROM_BODIES = {"body": BODY, "source": SOURCE}
_SHARD_COLUMNS = ", ".join(_FROM_BODIES.get(name, name) for name in SHARD_SCHEMA.names)
_BODY = SHARD_SCHEMA.names.index("body")
_PAGE_ROWS = 10_000
_OUTCOME_COLUMNS = (
    "status",
    "attempts",
    "resends",
    "response",
    "finish_reason",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cost_micros",
    "latency_ms",
    "error",
    "raw_body",
    "reserved_micros",
    "reserved_period",
)
_LEDGER_COLUMNS = (
    "id, tenant, period, kind, amount_micros, model, run_id, seq, prompt_tokens, cached_tokens,"
    " completion_tokens, price_input, price_cached_input, price_output, requests, at"
)


# -- the driver: work, shard files, budgets ---------------------------------------


def write_shard(store: Store, run_id: str, tenants: Collection[str], path: Path) -> int:
    """The `pending` rows of `tenants`, in input order, as a Parquet shard; returns
    the row count. The request bodies hold no key: keys never leave the workers'
    environments."""
    marks = ", ".join("?" * len(tenants))
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    try:
        cursor = store.db.execute(
            f"SELECT {_SHARD_COLUMNS}"
            " FROM requests LEFT JOIN request_bodies AS b USING (run_id, seq)"
            f" WHERE run_id = ? AND status = 'pending' AND tenant IN ({marks}) ORDER BY seq",
            [run_id, *sorted(tenants)],
        )
        with pq.ParquetWriter(path, SHARD_SCHEMA) as writer:
            while page := cursor.fetchmany(_PAGE_ROWS):
                columns = list(zip(*page, strict=True))
                if None in columns[_BODY]:
                    seqs = columns[SHARD_SCHEMA.names.index("seq")]
                    raise missing_body(store.path, run_id, seqs[columns[_BODY].index(None)])
                writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=SHARD_SCHEMA))
                rows += len(page)
    except sqlite3.Error as exc:
        raise StateError(f"{store.path}: {exc}") from None
    return rows


def hand_off(
    store: Store, run_id: str, job: Job, tenants: Collection[str], *, now: datetime | None = None
) -> dict[str, int]:
    """Reserve each capped tenant's remaining budget for the current period in
    the run's state database; returns tenant -> micro-dollars, the cap its worker
    gets. Hand-offs a killed driver left behind are released first."""
    now = now or datetime.now(UTC)
    caps: dict[str, int] = {}
    with store.transaction() as conn:
        _release_hand_offs(conn, run_id, None)
        for tenant in sorted(tenants):
            config = job.tenants.get(tenant)
            cap = None if config is None else config.cap_micros
            if config is None or cap is None:
                continue
            period = period_of(now, config.budget_period)
            ledger.set_cap(conn, tenant, period, cap)
            available = max(0, ledger.balance(conn, tenant, period).available_micros(cap))
            entry = Entry(tenant, period, Kind.RESERVE, available, run_id=run_id, reason=HAND_OFF)
            ledger.record(conn, [entry], utc_now())
            caps[tenant] = available
    return caps


def release_hand_offs(store: Store, run_id: str) -> None:
    """Give back every budget still handed to the run's workers (a shard that
    never started has nothing to merge)."""
    with store.transaction() as conn:
        _release_hand_offs(conn, run_id, None)


def _release_hand_offs(
    conn: sqlite3.Connection, run_id: str, tenants: Collection[str] | None
) -> None:
    held = conn.execute(
        "SELECT tenant, period, TOTAL(CASE kind WHEN 'reserve' THEN amount_micros"
        " ELSE -amount_micros END) FROM ledger"
        " WHERE run_id = ? AND seq IS NULL AND reason = ? GROUP BY tenant, period",
        (run_id, HAND_OFF),
    ).fetchall()
    releases = [
        Entry(tenant, period, Kind.RELEASE, int(amount), run_id=run_id, reason=HAND_OFF)
        for tenant, period, amount in held
        if amount and (tenants is None or tenant in tenants)
    ]
    ledger.record(conn, releases, utc_now())


# -- the worker: a shard file into a shard database ----------------------------------


def load_shard(store: Store, run_id: str, job: Job, shard: Path, input_format: str) -> int:
    """Register a shard's rows in a shard database as run `run_id`, keeping their
    sequence numbers, attempts and re-sends; returns the row count. A load cut
    short stays in phase `registering` (the caller deletes it and loads again)."""
    store.create_run(
        run_id,
        job_name=job.job.name,
        job_json=job.to_json(),
        input_path=str(shard),
        input_format=input_format,
        input_hash=file_hash(shard),
        output_path="",
    )
    rows = 0
    no_columns = carried_columns.encode(pa.RecordBatch.from_pydict({}))
    for batch in parquet_source.streaming(shard).iter_batches(batch_size=_PAGE_ROWS):
        records = batch.to_pylist()
        if not records:
            continue
        requests = [
            Request(
                r["seq"],
                r["row_id"],
                r["tenant"],
                r["model"],
                r["source"],
                json.loads(r["body"]),
                r["prompt_estimate"],
                r["max_tokens"],
            )
            for r in records
        ]
        store.register(run_id, requests, [], no_columns, records[0]["seq"])
        counters = [(r["attempts"], r["resends"], run_id, r["seq"]) for r in records]
        with store.transaction() as conn:
            conn.executemany(
                "UPDATE requests SET attempts = ?, resends = ? WHERE run_id = ? AND seq = ?",
                [c for c in counters if c[0] or c[1]],
            )
        rows += len(records)
    store.set_phase(run_id, "ready", rows=rows)
    return rows


# -- back in the driver: a shard database merged into the run's ---------------------


def merge(store: Store, run_id: str, shard_db: Path, tag: str) -> set[tuple[str, str]]:
    """Bring a shard database's outcomes, failed attempts and ledger entries into
    the run, and release its tenants' hand-offs, in one transaction. `tag` names
    the shard database uniquely (its ledger entries keep it, with their id).
    Returns the (tenant, period) pairs whose spend changed, for alerts."""
    Store(shard_db, create=False).close()  # migrated, if an older runner wrote it
    conn = store.db.conn
    try:
        conn.execute("ATTACH DATABASE ? AS shard", (str(shard_db),))
    except sqlite3.Error as exc:
        raise StateError(f"{shard_db}: cannot open the shard database: {exc}") from None
    try:
        with store.transaction() as conn:
            _merge_requests(conn, run_id)
            touched = _merge_ledger(conn, run_id, tag)
            tenants = {t for (t,) in conn.execute("SELECT DISTINCT tenant FROM shard.requests")}
            _release_hand_offs(conn, run_id, tenants)
        return touched
    finally:
        conn.execute("DETACH DATABASE shard")


def _merge_requests(conn: sqlite3.Connection, run_id: str) -> None:
    """Outcomes of rows the shard worked on; a row the run finished meanwhile
    (by another engine) keeps its outcome. Failed attempts and recent sends (for
    the limiters of runs to come) are added once; the bodies of rows now done
    are no longer needed."""
    assignments = ", ".join(f"{column} = s.{column}" for column in _OUTCOME_COLUMNS)
    conn.execute(
        f"UPDATE requests SET {assignments} FROM shard.requests AS s"
        " WHERE requests.run_id = :run AND s.run_id = :run AND requests.seq = s.seq"
        " AND s.status != 'pending' AND requests.status != 'done'"
        " AND s.attempts >= requests.attempts",
        {"run": run_id},
    )
    conn.execute(
        "DELETE FROM request_bodies WHERE run_id = :run AND seq IN"
        " (SELECT r.seq FROM shard.requests AS s JOIN requests AS r USING (run_id, seq)"
        " WHERE s.run_id = :run AND r.status = 'done')",
        {"run": run_id},
    )
    conn.execute(
        "INSERT INTO attempts (run_id, seq, attempt, at, http_status, error)"
        " SELECT s.run_id, s.seq, s.attempt, s.at, s.http_status, s.error FROM shard.attempts s"
        " WHERE s.run_id = :run AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.run_id = :run"
        " AND a.seq = s.seq AND a.attempt = s.attempt AND a.at = s.at)",
        {"run": run_id},
    )
    conn.execute(
        "INSERT INTO recent_sends (sent_at, tenant, requests, tokens)"
        " SELECT s.sent_at, s.tenant, s.requests, s.tokens FROM shard.recent_sends AS s"
        " WHERE s.sent_at > :since AND NOT EXISTS (SELECT 1 FROM recent_sends AS r"
        " WHERE r.sent_at = s.sent_at AND r.tenant = s.tenant)",
        {"since": time.time() - SENDS_KEPT_S},
    )


def _merge_ledger(conn: sqlite3.Connection, run_id: str, tag: str) -> set[tuple[str, str]]:
    """The shard's ledger entries after the last one merged, with their times."""
    last = conn.execute(
        "SELECT reason FROM ledger WHERE run_id = ? AND substr(reason, 1, ?) = ?"
        " ORDER BY id DESC LIMIT 1",
        (run_id, len(tag), tag),
    ).fetchone()
    after = int(last[0][len(tag) :]) if last else 0
    cursor = conn.execute(
        f"SELECT {_LEDGER_COLUMNS} FROM shard.ledger WHERE id > ? ORDER BY id", (after,)
    )
    touched: set[tuple[str, str]] = set()
    while page := cursor.fetchmany(_PAGE_ROWS):
        for at, entries in _by_time(page, tag):
            ledger.record(conn, entries, at)
            touched |= {(e.tenant, e.period) for e in entries if e.kind in (Kind.CHARGE, Kind.HOLD)}
    return touched


def _by_time(page: list[tuple[Any, ...]], tag: str) -> Iterator[tuple[str, list[Entry]]]:
    """Consecutive shard ledger rows grouped by their time, as tagged entries."""
    group: list[Entry] = []
    group_at = ""
    for (
        ident,
        tenant,
        period,
        kind,
        amount,
        model,
        run,
        seq,
        *tokens,
        p_in,
        p_cached,
        p_out,
        requests,
        at,
    ) in page:
        prices = None if p_in is None else (p_in, p_cached, p_out)
        entry = Entry(tenant, period, Kind(kind), amount, model, run, seq, f"{tag}{ident}", *tokens)
        entry = replace(entry, prices=prices, requests=requests)
        if group and at != group_at:
            yield group_at, group
            group = []
        group_at = at
        group.append(entry)
    if group:
        yield group_at, group


# -- shared ----------------------------------------------------------------------------


def shard_caps(job: Job, caps: Mapping[str, int]) -> Job:
    """The job a shard's worker runs: each handed-off tenant capped at what it was
    handed, no alerts (they fire in the driver, against the real cap, after
    the merge), and one process (Ray gives each worker its core)."""
    tenants = {
        name: tenant.model_copy(
            update={
                "alert_thresholds": [],
                "alert_webhook": None,
                **({"monthly_budget_usd": ledger_usd(caps[name])} if name in caps else {}),
            }
        )
        for name, tenant in job.tenants.items()
    }
    section = job.job.model_copy(update={"engine": "local", "processes": 1})
    return job.model_copy(update={"tenants": tenants, "job": section})


def ledger_usd(micros: int) -> Decimal:
    """Micro-dollars as the exact `Decimal` a job file's budget holds."""
    return Decimal(micros).scaleb(-6)
