"""The SQLite state database: runs, request rows, failed attempts, carried
columns and the money ledger.

One synchronous writer, WAL mode, short transactions. The store and `ledger.py`
(which it calls inside its transactions) are the only modules that speak SQL; no
bare `sqlite3` error leaves the store. Its contract with the engine:

- a request is marked `sent` (attempt counted) in a committed transaction before
  its bytes leave, so after a crash every `sent` row is known to be in flight
  and is re-sent on resume with its `resends` counter raised;
- outcomes are committed in batches (`checkpoint`), each with its ledger
  entries in the same transaction, so the ledger always equals the sum of the
  `done` rows' costs, and a budget reservation is checked and made atomically.

`synchronous=NORMAL` in WAL mode survives a killed process (SIGKILL) without loss:
only a power cut can drop the last commits, which then look like work in flight.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlite_utils import Database

from runner import ledger
from runner.errors import StateError
from runner.ledger import Balance, Entry, Kind
from runner.locks import runs_held_elsewhere, schema_lock
from runner.records import CarriedColumns, Outcome, Rejection, Request, Status
from runner.schema import migrations

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RunInfo:
    run_id: str
    job_name: str
    job_json: str
    input_path: str
    input_format: str
    input_hash: str
    output_path: str
    phase: str
    rows: int
    created_at: str
    updated_at: str


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """What a lane needs to send one registered request."""

    seq: int
    model: str
    body: str
    prompt_estimate: int
    max_tokens: int
    attempts: int

    @property
    def tpm_cost(self) -> int:
        return self.prompt_estimate + self.max_tokens


@dataclass(frozen=True, slots=True)
class TenantCounts:
    """One tenant's rows in a run, by status, with their usage and cost."""

    tenant: str
    by_status: dict[str, int]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_micros: int
    resends: int

    @property
    def total(self) -> int:
        return sum(self.by_status.values())


@dataclass(frozen=True, slots=True)
class SendMark:
    """A request about to be sent (`attempt` set: mark it `sent` and count its
    `tokens` in `tenant`'s recent sends), or about to be admitted (`reservation`
    set: reserve its worst case against `cap_micros`)."""

    seq: int
    attempt: int | None = None
    tenant: str = ""
    tokens: int = 0
    reservation: Entry | None = None
    cap_micros: int = 0

    def __post_init__(self) -> None:
        if self.attempt is not None and not (self.tenant and self.tokens > 0):
            raise ValueError(f"a send of request {self.seq} needs its tenant and TPM cost")


@dataclass(frozen=True, slots=True)
class FailedAttempt:
    seq: int
    attempt: int
    http_status: int | None
    error: str


def missing_body(path: Path, run_id: str, seq: int) -> StateError:
    """A row to send whose request is gone: never expected, never skipped."""
    return StateError(
        f"{path}: request {seq} of run {run_id!r} is still to be sent but its body"
        " is missing from the state database"
    )


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Store:
    """The state database at `path` (created, and migrated, on open)."""

    __slots__ = ("db", "path")

    def __init__(self, path: Path | str, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise StateError(
                f"{self.path}: no state database here; pass --state PATH or set RUNNER_STATE "
                "(a job keeps its state where its [job] state says)"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = Database(self.path)
            self.db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            if not int(self.db.execute("PRAGMA page_count").fetchone()[0]):
                # Set once, on a new database (on an old one it takes effect at its
                # next VACUUM, `runner prune`), so that freed pages can be handed
                # back without one; set on every open, it would take the write lock.
                self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{self.path}: cannot open the state database: {exc}") from None

    def _migrate(self) -> None:
        known = {migration.name for migration in migrations._migrations}
        applied = {migration.name for migration in migrations.applied(self.db)}
        if applied - known:
            raise StateError(
                f"{self.path}: the state database was written by a newer runner "
                f"(migrations {sorted(applied - known)}); upgrade runner to use it"
            )
        if known - applied:
            with schema_lock(self.path):
                if not migrations.pending(self.db):
                    return  # another process upgraded it while this one waited
                if holders := runs_held_elsewhere(self.path):
                    raise StateError(
                        f"{self.path}: the state database needs an upgrade to this runner's "
                        f"schema, but runs of an older runner are using it ({', '.join(holders)});"
                        " try again once they end"
                    )
                migrations.apply(self.db)

    def close(self) -> None:
        self.db.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # -- runs -----------------------------------------------------------------

    def create_run(
        self,
        run_id: str,
        *,
        job_name: str,
        job_json: str,
        input_path: str,
        input_format: str,
        output_path: str,
        input_hash: str,
        files: Sequence[tuple[Path, str]] = (),
    ) -> None:
        """A run in phase `registering`, with the input files (path, sha256) it reads."""
        now = utc_now()
        with self._write():
            self.db.conn.executemany(
                "INSERT INTO run_inputs (run_id, job_name, path, sha256) VALUES (?, ?, ?, ?)",
                [(run_id, job_name, str(path), digest) for path, digest in files],
            )
            self.db.execute(
                "INSERT INTO runs (run_id, job_name, job_json, input_path, input_format,"
                " input_hash, output_path, phase, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'registering', ?, ?)",
                [
                    run_id,
                    job_name,
                    job_json,
                    input_path,
                    input_format,
                    input_hash,
                    output_path,
                    now,
                    now,
                ],
            )

    def run(self, run_id: str) -> RunInfo | None:
        row = self.db.execute(
            f"SELECT {', '.join(RunInfo.__slots__)} FROM runs WHERE run_id = ?", [run_id]
        ).fetchone()
        return RunInfo(*row) if row else None

    def require_run(self, run_id: str) -> RunInfo:
        info = self.run(run_id)
        if info is None:
            raise StateError(f"{self.path}: no run {run_id!r} (see `runner status`)")
        return info

    def runs(self) -> list[RunInfo]:
        rows = self.db.execute(
            f"SELECT {', '.join(RunInfo.__slots__)} FROM runs ORDER BY created_at"
        ).fetchall()
        return [RunInfo(*row) for row in rows]

    def set_phase(self, run_id: str, phase: str, *, rows: int | None = None) -> None:
        with self._write():
            self.db.execute(
                "UPDATE runs SET phase = ?, rows = COALESCE(?, rows), updated_at = ?"
                " WHERE run_id = ?",
                [phase, rows, utc_now(), run_id],
            )

    def prune(self, older_than: str) -> tuple[list[str], int]:
        """Drop the request rows, failed attempts and carried columns of finished
        runs last touched before `older_than` (ISO time), keeping each run's
        per-tenant summary and every ledger row (billing needs them). Returns the
        pruned run ids and how many request rows went."""
        runs = [
            run_id
            for (run_id,) in self.db.execute(
                "SELECT run_id FROM runs WHERE phase = 'finished' AND updated_at < ?",
                [older_than],
            ).fetchall()
        ]
        removed = 0
        for run_id in runs:
            counts = self.counts(run_id)
            with self._write():
                self.db.conn.executemany(
                    "INSERT INTO run_summaries (run_id, tenant, by_status, prompt_tokens,"
                    " cached_tokens, completion_tokens, cost_micros, resends)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            run_id,
                            c.tenant,
                            json.dumps(c.by_status),
                            c.prompt_tokens,
                            c.cached_tokens,
                            c.completion_tokens,
                            c.cost_micros,
                            c.resends,
                        )
                        for c in counts
                    ],
                )
                removed += self.db.execute(
                    "DELETE FROM requests WHERE run_id = ?", [run_id]
                ).rowcount
                for table in ("request_bodies", "attempts", "carried", "run_tenants"):
                    self.db.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
                self.db.execute(
                    "UPDATE runs SET phase = 'pruned', updated_at = ? WHERE run_id = ?",
                    [utc_now(), run_id],
                )
        return runs, removed

    def release_free_pages(self, *, pages_per_step: int = 8192) -> int:
        """Hand the pages that deleted rows (answered requests' bodies) left free
        back to the file system, a few thousand per transaction so that the
        write-ahead log stays small. Returns how many were released; none on a
        database created before auto-vacuum until it is vacuumed once."""
        released = 0
        try:
            if int(self.db.execute("PRAGMA auto_vacuum").fetchone()[0]) != _INCREMENTAL:
                return 0
            while free := int(self.db.execute("PRAGMA freelist_count").fetchone()[0]):
                # Each page it frees is a result row without columns, after which
                # `execute` would stop; a script steps it to the end (autocommit).
                self.db.conn.executescript(f"PRAGMA incremental_vacuum({pages_per_step})")
                left = int(self.db.execute("PRAGMA freelist_count").fetchone()[0])
                if left >= free:
                    break
                released += free - left
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: {exc}") from None
        return released

    def vacuum(self) -> None:
        """Give the space of deleted rows back to the file system."""
        try:
            self.db.execute("VACUUM")
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: {exc}") from None

    def processed_inputs(self, job_name: str) -> set[tuple[str, str]]:
        """(path, sha256) of every file a run of this job registered."""
        rows = self.db.execute(
            "SELECT path, sha256 FROM run_inputs WHERE job_name = ?", [job_name]
        ).fetchall()
        return {(path, digest) for path, digest in rows}

    def update_job(self, run_id: str, job_json: str) -> None:
        """Settings for the run's next execution (provider, tenants, prices)."""
        with self._write():
            self.db.execute(
                "UPDATE runs SET job_json = ?, updated_at = ? WHERE run_id = ?",
                [job_json, utc_now(), run_id],
            )

    def delete_run(self, run_id: str) -> None:
        """Forget a run's rows (a refused, half-registered or restarted submit);
        budget its rows still held is released, what it spent stays in the ledger."""
        with self._write():
            self._release_reservations(run_id)
            for table in (
                "requests",
                "request_bodies",
                "attempts",
                "carried",
                "run_tenants",
                "run_summaries",
                "run_inputs",
                "runs",
            ):
                self.db.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])

    # -- registration ---------------------------------------------------------

    def register(
        self,
        run_id: str,
        requests: Sequence[Request],
        rejections: Sequence[Rejection],
        carried: CarriedColumns,
        first_seq: int,
    ) -> None:
        """One input batch: its rows and its carried columns, in one transaction."""
        with self._write():
            self.db.conn.executemany(
                "INSERT INTO requests (run_id, seq, row_id, tenant, model, source, status,"
                " prompt_estimate, max_tokens) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                [
                    (
                        run_id,
                        r.seq,
                        r.row_id,
                        r.tenant,
                        r.model,
                        "",  # (the source waits beside the body; see schema m005)
                        r.prompt_tokens_estimate,
                        r.max_tokens,
                    )
                    for r in requests
                ],
            )
            self.db.conn.executemany(
                "INSERT INTO request_bodies (run_id, seq, body, source) VALUES (?, ?, ?, ?)",
                [
                    (
                        run_id,
                        r.seq,
                        json.dumps(r.body, ensure_ascii=False, separators=(",", ":")),
                        r.where,
                    )
                    for r in requests
                ],
            )
            self.db.conn.executemany(
                "INSERT INTO requests (run_id, seq, row_id, tenant, model, source, status, error)"
                " VALUES (?, ?, ?, ?, ?, ?, 'rejected', ?)",
                [
                    (run_id, r.seq, r.row_id, r.tenant, r.model, r.where, r.error)
                    for r in rejections
                ],
            )
            largest: dict[str, int] = {}
            for r in requests:
                largest[r.tenant] = max(largest.get(r.tenant, 0), r.tpm_cost)
            self.db.conn.executemany(
                "INSERT INTO run_tenants (run_id, tenant, largest_cost) VALUES (?, ?, ?)"
                " ON CONFLICT (run_id, tenant)"
                " DO UPDATE SET largest_cost = MAX(largest_cost, excluded.largest_cost)",
                [(run_id, tenant, cost) for tenant, cost in largest.items()],
            )
            self.db.execute(
                "INSERT INTO carried (run_id, first_seq, num_rows, schema, data)"
                " VALUES (?, ?, ?, ?, ?)",
                [
                    run_id,
                    first_seq,
                    carried.num_rows,
                    carried.schema,
                    carried.data,
                ],
            )

    def rejections(self, run_id: str, *, limit: int) -> list[tuple[str, str]]:
        """(where, error) of the first `limit` rejected rows, in input order."""
        rows = self.db.execute(
            "SELECT source, error FROM requests WHERE run_id = ? AND status = 'rejected'"
            " ORDER BY seq LIMIT ?",
            [run_id, limit],
        ).fetchall()
        return [(where, error) for where, error in rows]

    def reject_duplicate_ids(self, run_id: str) -> int:
        """Every row whose id appeared earlier in the input is rejected, naming
        where it first appeared. Returns how many were rejected.

        Runs once, when every row is registered and none answered, so every
        source is still at hand. The ids are sorted here rather than indexed:
        an index would cost each row of every run its space for this one query."""
        with self._write():
            self.db.execute(
                f"""
                WITH duplicated AS (
                    SELECT row_id FROM requests WHERE run_id = :run
                    GROUP BY row_id HAVING COUNT(*) > 1
                ), ranked AS (
                    SELECT seq, row_id, {SOURCE} AS source,
                           ROW_NUMBER() OVER by_id AS nth,
                           FIRST_VALUE({SOURCE}) OVER by_id AS first
                    FROM requests LEFT JOIN request_bodies AS b USING (run_id, seq)
                    WHERE run_id = :run AND row_id IN duplicated
                    WINDOW by_id AS (PARTITION BY row_id ORDER BY seq)
                )
                UPDATE requests
                SET status = 'rejected',
                    source = ranked.source,
                    error = ranked.source || ': duplicate id ' || quote(ranked.row_id)
                            || ' (first seen at ' || ranked.first || ')'
                FROM ranked
                WHERE requests.run_id = :run AND requests.seq = ranked.seq AND ranked.nth > 1
                """,
                {"run": run_id},
            )
            # (a statement that starts with WITH reports no rowcount in sqlite3)
            rejected = int(self.db.execute("SELECT changes()").fetchone()[0])
            if rejected:
                self.db.execute(
                    "DELETE FROM request_bodies WHERE run_id = ? AND seq IN"
                    " (SELECT seq FROM requests WHERE run_id = ? AND status = 'rejected')",
                    [run_id, run_id],
                )
            return rejected

    # -- the run --------------------------------------------------------------

    def requeue(self, run_id: str, *, retry_failed: bool = False) -> int:
        """Prepare a (re)started run: rows left `sent` by a crash were in flight
        and are re-sent (counted in `resends`), their reservations released;
        `deferred` rows (and `failed` ones, if asked) get another chance.
        Returns how many rows were in flight."""
        with self._write():
            self._release_reservations(run_id)
            in_flight = self.db.execute(
                "UPDATE requests SET status = 'pending', resends = resends + 1"
                " WHERE run_id = ? AND status = 'sent'",
                [run_id],
            ).rowcount
            retried = "('deferred', 'failed')" if retry_failed else "('deferred')"
            self.db.execute(
                "UPDATE requests SET status = 'pending', error = NULL"
                f" WHERE run_id = ? AND status IN {retried}",
                [run_id],
            )
        return in_flight

    def recent_sends(self, tenant: str, *, within_s: float) -> list[tuple[float, int]]:
        """(seconds ago, TPM cost) of each of the tenant's sends in the last
        `within_s` seconds (at most `SENDS_KEPT_S`), by any run in this database.
        The sends of one checkpoint are kept together, so their costs come back
        evenly shared, with the same sum."""
        if within_s > SENDS_KEPT_S:
            raise ValueError(f"sends are kept {SENDS_KEPT_S:.0f}s, not {within_s}s")
        now = time.time()
        rows = self.db.execute(
            "SELECT sent_at, requests, tokens FROM recent_sends WHERE sent_at > ? AND tenant = ?",
            [now - within_s, tenant],
        ).fetchall()
        sends = []
        for sent_at, requests, tokens in rows:
            share, extra = divmod(tokens, requests)
            sends += [(now - sent_at, share + (i < extra)) for i in range(requests)]
        return sends

    def _release_reservations(self, run_id: str) -> None:
        """Release what the run's rows still hold (call inside a transaction)."""
        held = self.db.execute(
            "SELECT seq, tenant, model, reserved_period, reserved_micros FROM requests"
            " WHERE run_id = ? AND reserved_micros IS NOT NULL",
            [run_id],
        ).fetchall()
        releases = [
            Entry(tenant, period, Kind.RELEASE, micros, model, run_id, seq)
            for seq, tenant, model, period, micros in held
        ]
        ledger.record(self.db.conn, releases, utc_now())
        self.db.execute(
            "UPDATE requests SET reserved_micros = NULL, reserved_period = NULL"
            " WHERE run_id = ? AND reserved_micros IS NOT NULL",
            [run_id],
        )

    def open_tenants(self, run_id: str) -> set[str]:
        """Tenants with rows the run may still send (pending, sent, deferred, failed)."""
        rows = self.db.execute(
            "SELECT DISTINCT tenant FROM requests WHERE run_id = ?"
            " AND status IN ('pending', 'sent', 'deferred', 'failed')",
            [run_id],
        ).fetchall()
        return {tenant for (tenant,) in rows}

    def unfinished_runs(self, job_name: str) -> list[str]:
        """Runs of the job that stopped before their end (oldest first)."""
        rows = self.db.execute(
            "SELECT run_id FROM runs WHERE job_name = ?"
            " AND phase IN ('ready', 'running', 'interrupted') ORDER BY created_at",
            [job_name],
        ).fetchall()
        return [run_id for (run_id,) in rows]

    def lane_tenants(self, run_id: str) -> dict[str, int]:
        """Tenants with rows to send, and the largest TPM cost among their rows."""
        rows = self.db.execute(
            "SELECT tenant, largest_cost FROM run_tenants AS t WHERE run_id = ? AND EXISTS"
            " (SELECT 1 FROM requests WHERE run_id = t.run_id AND status = 'pending'"
            " AND tenant = t.tenant) ORDER BY tenant",
            [run_id],
        ).fetchall()
        return {tenant: int(largest) for tenant, largest in rows}

    def pending_work(self, run_id: str) -> dict[str, tuple[int, int]]:
        """Every tenant of the run: (rows to send, their TPM cost in total)."""
        try:
            rows = self.db.execute(
                "SELECT tenant, TOTAL(status = 'pending'),"
                " TOTAL(CASE WHEN status = 'pending' THEN prompt_estimate + max_tokens END)"
                " FROM requests WHERE run_id = ? GROUP BY tenant ORDER BY tenant",
                [run_id],
            ).fetchall()
        except sqlite3.Error as exc:  # (a run's planning, before anything is sent)
            raise StateError(f"{self.path}: {exc}") from None
        return {tenant: (int(count), int(tokens)) for tenant, count, tokens in rows}

    def pending_page(
        self, run_id: str, tenant: str, *, after_seq: int, limit: int
    ) -> list[PendingRequest]:
        rows = self.db.execute(
            f"SELECT seq, model, {BODY}, prompt_estimate, max_tokens, attempts"
            " FROM requests LEFT JOIN request_bodies AS b USING (run_id, seq)"
            " WHERE run_id = ? AND tenant = ? AND status = 'pending' AND seq > ?"
            " ORDER BY seq LIMIT ?",
            [run_id, tenant, after_seq, limit],
        ).fetchall()
        for seq, _, body, *_ in rows:
            if body is None:
                raise missing_body(self.path, run_id, seq)
        return [PendingRequest(*row) for row in rows]

    def checkpoint(
        self,
        run_id: str,
        *,
        sends: Sequence[SendMark] = (),
        outcomes: Sequence[Outcome] = (),
        failures: Iterable[FailedAttempt] = (),
        entries: Iterable[Entry] = (),
        wait: bool = True,
    ) -> dict[int, Balance] | None:
        """One transaction: rows about to be sent, outcomes, failed attempts and
        ledger entries. A send whose reservation does not fit its tenant's
        available budget is refused (not marked); the refused are returned with
        the balance that refused them. Without `wait`, None at once (nothing
        written) while another process holds the write lock."""
        try:
            with self._write(wait=wait):
                return _checkpoint(self.db.conn, run_id, sends, outcomes, failures, entries)
        except _Busy:
            return None

    def balance(self, tenant: str, period: str) -> Balance:
        return ledger.balance(self.db.conn, tenant, period)

    def set_cap(self, tenant: str, period: str, cap_micros: int) -> None:
        with self._write():
            ledger.set_cap(self.db.conn, tenant, period, cap_micros)

    def read_ledger(self, read: Callable[[sqlite3.Connection], T]) -> T:
        """Run one of `ledger`'s report queries."""
        try:
            return read(self.db.conn)
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: {exc}") from None

    def add_entries(self, entries: Iterable[Entry]) -> None:
        """Ledger entries outside a run (top-ups)."""
        with self._write():
            ledger.record(self.db.conn, entries, utc_now())

    def record_alert(self, balance: Balance, threshold: int, cap_micros: int) -> bool:
        with self._write():
            return ledger.record_alert(self.db.conn, balance, threshold, cap_micros, utc_now())

    def defer_tenant(self, run_id: str, tenant: str, reason: str) -> int:
        """Every row of `tenant` not yet sent is deferred with `reason`."""
        with self._write():
            return self.db.execute(
                "UPDATE requests SET status = 'deferred', error = ?"
                " WHERE run_id = ? AND tenant = ? AND status = 'pending'",
                [reason, run_id, tenant],
            ).rowcount

    # -- reading results --------------------------------------------------------

    def status_counts(self, run_id: str) -> dict[str, dict[str, int]]:
        """Rows per tenant and status: `counts` without the sums, from the index
        alone, so cheap even for a million rows."""
        rows = self.db.execute(
            "SELECT tenant, status, COUNT(*) FROM requests WHERE run_id = ?"
            " GROUP BY tenant, status",
            [run_id],
        ).fetchall()
        counts: dict[str, dict[str, int]] = {}
        for tenant, status, count in rows:
            counts.setdefault(tenant, {})[status] = count
        return counts

    def counts(self, run_id: str) -> list[TenantCounts]:
        """Per-tenant rows by status, tokens and cost (a pruned run's from its summary)."""
        summary = self.db.execute(
            "SELECT tenant, by_status, prompt_tokens, cached_tokens, completion_tokens,"
            " cost_micros, resends FROM run_summaries WHERE run_id = ? ORDER BY tenant",
            [run_id],
        ).fetchall()
        if summary:
            return [TenantCounts(row[0], json.loads(row[1]), *row[2:]) for row in summary]
        rows = self.db.execute(
            "SELECT tenant, status, COUNT(*), TOTAL(prompt_tokens), TOTAL(cached_tokens),"
            " TOTAL(completion_tokens), TOTAL(cost_micros), TOTAL(resends)"
            " FROM requests WHERE run_id = ? GROUP BY tenant, status ORDER BY tenant",
            [run_id],
        ).fetchall()
        merged: dict[str, list[Any]] = {}
        for tenant, status, count, prompt, cached, completion, cost, resends in rows:
            entry = merged.setdefault(tenant, [{}, 0, 0, 0, 0, 0])
            entry[0][status] = count
            for index, value in enumerate((prompt, cached, completion, cost, resends), start=1):
                entry[index] += int(value)
        return [TenantCounts(tenant, *values) for tenant, values in merged.items()]

    def problems(self, run_id: str, *, per_status: int = 3) -> list[tuple[str, str, str, int]]:
        """(tenant, status, error, rows) for the commonest errors of each tenant's
        failed, deferred and rejected rows."""
        rows = self.db.execute(
            "SELECT tenant, status, error, COUNT(*) AS n FROM requests"
            " WHERE run_id = ? AND status IN ('failed', 'deferred', 'rejected')"
            " GROUP BY tenant, status, error ORDER BY tenant, status, n DESC, MIN(seq)",
            [run_id],
        ).fetchall()
        shown: dict[tuple[str, str], int] = {}
        kept = []
        for tenant, status, error, count in rows:
            if shown.get((tenant, status), 0) < per_status:
                shown[(tenant, status)] = shown.get((tenant, status), 0) + 1
                kept.append((tenant, status, error or "", count))
        return kept

    def carried_batches(self, run_id: str) -> Iterator[tuple[int, bytes]]:
        """(first seq, carried columns' `CarriedColumns.data`) per input batch, in
        input order."""
        yield from self.db.execute(
            "SELECT first_seq, data FROM carried WHERE run_id = ? ORDER BY first_seq", [run_id]
        )

    def carried_schemas(self, run_id: str) -> list[bytes]:
        """Each input batch's `CarriedColumns.schema`."""
        rows = self.db.execute("SELECT schema FROM carried WHERE run_id = ?", [run_id])
        return [blob for (blob,) in rows]

    def results(self, run_id: str, first_seq: int, count: int) -> list[tuple[Any, ...]]:
        """Result columns (see `RESULT_COLUMNS`) of rows first_seq .. first_seq+count-1."""
        return self.db.execute(
            f"SELECT {', '.join(RESULT_COLUMNS)} FROM requests"
            " WHERE run_id = ? AND seq >= ? AND seq < ? ORDER BY seq",
            [run_id, first_seq, first_seq + count],
        ).fetchall()

    def iter_results(self, run_id: str, *, page_rows: int = 5000) -> Iterator[tuple[Any, ...]]:
        """Every row's result columns in input order, read a page at a time."""
        first_seq = 0
        while page := self.results(run_id, first_seq, page_rows):
            yield from page
            first_seq = page[-1][0] + 1

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (as `_write`) on the store's connection, for a module
        that keeps its own tables in step with the store's (the Ray merge)."""
        with self._write():
            yield self.db.conn

    @contextlib.contextmanager
    def _write(self, *, wait: bool = True) -> Iterator[None]:
        """An IMMEDIATE transaction: it takes the write lock first, so a balance it
        reads cannot change before it writes, even with other processes. A locked
        or broken database becomes a `StateError`; without `wait`, a write lock
        another process holds is `_Busy` at once (SQLite's own wait blocks the
        thread, and with it the event loop, in steps of up to 100 ms)."""
        conn = self.db.conn
        try:
            if wait:
                conn.execute("BEGIN IMMEDIATE")
            else:
                conn.execute("PRAGMA busy_timeout=0")
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as exc:
                    if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                        raise
                    raise _Busy from None
                finally:
                    conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            try:
                yield
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StateError(f"{self.path}: {exc}") from None


_INCREMENTAL = 2  # what PRAGMA auto_vacuum reads for INCREMENTAL
_BUSY_TIMEOUT_MS = 10_000


class _Busy(Exception):
    """Another process holds the database's write lock."""


# How long a send is remembered for the limiters of runs to come: longer than a
# provider's one-minute window, so a run started just after another (or resumed
# after a crash) does not spend again what that window still holds.
SENDS_KEPT_S = 120.0

# Where a request came from, in a query joining `request_bodies AS b`: beside its
# body while it waits (schema m005), or on the row if registered before that.
SOURCE = "COALESCE(b.source, requests.source)"
# What to send, likewise: its own table since m003, or the row's own column for
# a row an older runner registered after it had opened a database that a newer
# one then upgraded (it kept writing where it always had).
BODY = "COALESCE(b.body, requests.body)"

RESULT_COLUMNS = (
    "seq",
    "row_id",
    "tenant",
    "model",
    "status",
    "response",
    "finish_reason",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cost_micros",
    "attempts",
    "resends",
    "latency_ms",
    "error",
    "raw_body",
)


def _checkpoint(
    conn: sqlite3.Connection,
    run_id: str,
    sends: Sequence[SendMark],
    outcomes: Sequence[Outcome],
    failures: Iterable[FailedAttempt],
    entries: Iterable[Entry],
) -> dict[int, Balance]:
    """`Store.checkpoint`'s writes, inside its transaction."""
    now = utc_now()
    sent_at = time.time()
    refused: dict[int, Balance] = {}
    # Settle first, so budget released by this batch is there for its sends.
    conn.executemany(
        "UPDATE requests SET status = ?, attempts = ?, response = ?, finish_reason = ?,"
        " prompt_tokens = ?, cached_tokens = ?, completion_tokens = ?,"
        " reasoning_tokens = ?, cost_micros = ?, latency_ms = ?, error = ?, raw_body = ?,"
        " reserved_micros = NULL, reserved_period = NULL"
        " WHERE run_id = ? AND seq = ?",
        [(*_outcome_values(outcome), run_id, outcome.seq) for outcome in outcomes],
    )
    conn.executemany(
        "DELETE FROM request_bodies WHERE run_id = ? AND seq = ?",
        [(run_id, outcome.seq) for outcome in outcomes if outcome.status is Status.DONE],
    )
    conn.executemany(
        "INSERT INTO attempts (run_id, seq, attempt, at, http_status, error)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [(run_id, f.seq, f.attempt, now, f.http_status, f.error) for f in failures],
    )
    ledger.record(conn, entries, now)
    marked = []
    sending: dict[str, list[int]] = {}  # tenant -> [requests, tokens]
    reservations: list[Entry] = []
    reserving: dict[tuple[str, str], int] = {}  # (tenant, period) -> micros
    for mark in sends:
        reservation = mark.reservation
        if reservation is not None:
            key = (reservation.tenant, reservation.period)
            current = ledger.balance(conn, *key)
            current = replace(
                current, reserved_micros=current.reserved_micros + reserving.get(key, 0)
            )
            if current.available_micros(mark.cap_micros) < reservation.amount_micros:
                refused[mark.seq] = current
                continue
            reserving[key] = reserving.get(key, 0) + reservation.amount_micros
            reservations.append(reservation)
            conn.execute(
                "UPDATE requests SET reserved_micros = ?, reserved_period = ?"
                " WHERE run_id = ? AND seq = ?",
                (reservation.amount_micros, reservation.period, run_id, mark.seq),
            )
        if mark.attempt is not None:
            marked.append((mark.attempt, run_id, mark.seq))
            counted = sending.setdefault(mark.tenant, [0, 0])
            counted[0] += 1
            counted[1] += mark.tokens
    ledger.record(conn, reservations, now)
    conn.executemany(
        "UPDATE requests SET status = 'sent', attempts = ? WHERE run_id = ? AND seq = ?",
        marked,
    )
    if sending:
        conn.executemany(
            "INSERT INTO recent_sends (sent_at, tenant, requests, tokens) VALUES (?, ?, ?, ?)",
            [(sent_at, tenant, *counted) for tenant, counted in sending.items()],
        )
        conn.execute("DELETE FROM recent_sends WHERE sent_at < ?", [sent_at - SENDS_KEPT_S])
    return refused


def _outcome_values(outcome: Outcome) -> tuple[Any, ...]:
    usage = outcome.usage
    return (
        outcome.status.value,
        outcome.attempts,
        outcome.response,
        outcome.finish_reason,
        usage.prompt_tokens if usage else None,
        usage.cached_tokens if usage else None,
        usage.completion_tokens if usage else None,
        usage.reasoning_tokens if usage else None,
        outcome.cost_micros,
        outcome.latency_ms,
        outcome.error,
        outcome.raw_body,
    )
