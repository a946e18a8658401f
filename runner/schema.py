"""The state database's schema, as sqlite-utils migrations.

A migration is never edited once released: a change is a new `mNNN_` function.
`Store` refuses a database with migrations it does not know (a newer runner's).
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from runner import ledger

migrations = Migrations("runner")


@migrations()
def m001_initial(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            job_name TEXT NOT NULL,
            job_json TEXT NOT NULL,
            input_path TEXT NOT NULL,
            input_format TEXT NOT NULL,
            input_hash TEXT NOT NULL,     -- sha256 of the input file(s) as registered
            output_path TEXT NOT NULL,
            phase TEXT NOT NULL,          -- registering, ready, finished
            rows INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE requests (
            run_id TEXT NOT NULL REFERENCES runs(run_id),
            seq INTEGER NOT NULL,         -- position in the input, from 0
            row_id TEXT NOT NULL,
            tenant TEXT NOT NULL,
            model TEXT NOT NULL,
            source TEXT NOT NULL,         -- file:line or file: row N
            status TEXT NOT NULL,
            body TEXT,                    -- the request as sent (JSON), NULL if rejected
            prompt_estimate INTEGER,
            max_tokens INTEGER,
            attempts INTEGER NOT NULL DEFAULT 0,
            resends INTEGER NOT NULL DEFAULT 0,
            response TEXT,
            finish_reason TEXT,
            prompt_tokens INTEGER,
            cached_tokens INTEGER,
            completion_tokens INTEGER,
            reasoning_tokens INTEGER,
            cost_micros INTEGER,
            latency_ms INTEGER,
            error TEXT,
            raw_body TEXT,                -- kept for OpenAI-batch output only
            reserved_micros INTEGER,      -- the budget reservation while sent
            reserved_period TEXT,
            sent_at REAL,                 -- unix time of the last attempt
            PRIMARY KEY (run_id, seq)
        );
        CREATE INDEX requests_lane ON requests(run_id, tenant, status, seq);
        CREATE INDEX requests_row_id ON requests(run_id, row_id);
        CREATE INDEX requests_recent ON requests(tenant, sent_at);
        CREATE TABLE attempts (           -- failed attempts; the last one is on the row
            run_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            attempt INTEGER NOT NULL,
            at TEXT NOT NULL,
            http_status INTEGER,
            error TEXT NOT NULL
        );
        CREATE INDEX attempts_request ON attempts(run_id, seq);
        CREATE TABLE run_inputs (         -- the files a run registered, for input discovery
            run_id TEXT NOT NULL,
            job_name TEXT NOT NULL,
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            PRIMARY KEY (run_id, path)
        );
        CREATE INDEX run_inputs_job ON run_inputs(job_name);
        CREATE TABLE run_summaries (      -- per-tenant counts of a pruned run
            run_id TEXT NOT NULL,
            tenant TEXT NOT NULL,
            by_status TEXT NOT NULL,      -- JSON: status -> rows
            prompt_tokens INTEGER NOT NULL,
            cached_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            cost_micros INTEGER NOT NULL,
            resends INTEGER NOT NULL,
            PRIMARY KEY (run_id, tenant)
        );
        CREATE TABLE carried (            -- pass-through columns, one Arrow batch per input batch
            run_id TEXT NOT NULL,
            first_seq INTEGER NOT NULL,
            num_rows INTEGER NOT NULL,
            schema BLOB NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (run_id, first_seq)
        );
        """
        + ledger.CREATE_TABLES
    )


@migrations()
def m002_indexes_for_a_million_rows(db: Database) -> None:
    """A resume of a big run must not scan it: rows are found by status first
    (in flight, pending), held reservations by a partial index, and each lane's
    largest request from a per-tenant row written at registration."""
    db.executescript(
        """
        DROP INDEX requests_lane;
        CREATE INDEX requests_status ON requests(run_id, status, tenant, seq);
        CREATE INDEX requests_reserved ON requests(run_id) WHERE reserved_micros IS NOT NULL;
        CREATE TABLE run_tenants (        -- per tenant of a run: its largest TPM cost
            run_id TEXT NOT NULL,
            tenant TEXT NOT NULL,
            largest_cost INTEGER NOT NULL,
            PRIMARY KEY (run_id, tenant)
        );
        INSERT INTO run_tenants
            SELECT run_id, tenant, MAX(prompt_estimate + max_tokens) FROM requests
            WHERE prompt_estimate IS NOT NULL GROUP BY run_id, tenant;
        """
    )


@migrations()
def m003_bodies_until_answered(db: Database) -> None:
    """A request's payload is kept only until it is answered: the bodies move to
    their own table, whose rows are deleted as their requests end `done`, so
    the pages they held are reused and, at a run's end, given back to the file
    system. A database holding a finished run then holds its responses and
    state, not a second copy of the input."""
    db.executescript(
        """
        CREATE TABLE request_bodies (     -- the request as sent (JSON), while not done
            run_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            body TEXT NOT NULL,
            PRIMARY KEY (run_id, seq)
        );
        INSERT INTO request_bodies
            SELECT run_id, seq, body FROM requests
            WHERE body IS NOT NULL AND status NOT IN ('done', 'rejected');
        -- requests.body stays, always NULL from now on: dropping a column needs
        -- SQLite 3.35, which some supported systems do not have.
        UPDATE requests SET body = NULL WHERE body IS NOT NULL;
        """
    )


@migrations()
def m004_ledger_rows_sum_requests(db: Database) -> None:
    """A ledger row may sum the entries of many requests (see `ledger.record`); it
    says how many. Every row written before covers one."""
    db.execute("ALTER TABLE ledger ADD COLUMN requests INTEGER NOT NULL DEFAULT 1")


@migrations()
def m005_sources_until_answered(db: Database) -> None:
    """Where a row came from ("file:line") is read only to name it in an error: a
    rejection, found as the row is registered, or a duplicate id, found once all
    rows are. So a request's source is kept beside its body until it is answered,
    and the request row holds ''; rows registered before keep theirs. The index by
    row id, read only by that duplicate search, goes: the search sorts the run's
    ids instead, once, and a million rows stop paying ~25 bytes each for it."""
    db.executescript(
        """
        ALTER TABLE request_bodies ADD COLUMN source TEXT;
        DROP INDEX requests_row_id;
        """
    )


@migrations()
def m006_recent_sends(db: Database) -> None:
    """The next run's limiters need each tenant's sends of the last minute; they
    move from an index over every request ever sent to a table of the last two
    minutes' sends, a row per tenant and checkpoint (see `Store.recent_sends`).
    requests.sent_at stays, unused."""
    db.executescript(
        """
        CREATE TABLE recent_sends (       -- sends of the last minutes, for limiters to come
            sent_at REAL NOT NULL,        -- unix time
            tenant TEXT NOT NULL,
            requests INTEGER NOT NULL,
            tokens INTEGER NOT NULL       -- the TPM cost the limiter charged them
        );
        CREATE INDEX recent_sends_at ON recent_sends(sent_at);
        INSERT INTO recent_sends
            SELECT sent_at, tenant, 1, prompt_estimate + max_tokens FROM requests
            WHERE sent_at > (julianday('now') - 2440587.5) * 86400.0 - 120;
        DROP INDEX requests_recent;
        """
    )
