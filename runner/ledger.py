"""The money ledger: rows of reservations, releases, charges, holds and top-ups,
and a balance per tenant and budget period kept equal to the ledger's sums. The
entries of one minute that share their kind, tenant, run, model and price share
a row that counts its requests, so the ledger grows with time, not with requests
(a million answers add a few rows per tenant and minute, not a million).

Kinds and what they do to a balance:

- `reserve`  worst-case cost held before a request is sent     reserved += amount
- `release`  a reservation given back when the request ends    reserved -= amount
- `charge`   the real cost of a response, from its `usage`     charged  += amount
- `hold`     a response without `usage`: its worst case stays  held     += amount
- `topup`    budget added for a period, with a reason          topups   += amount

A balance is read and written inside the caller's transaction (the store's), so a
reservation that checks the cap and the reservation itself are one atomic step,
even when several processes share the state database. Reports read the ledger.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from runner.config import BudgetPeriod


class Kind(StrEnum):
    RESERVE = "reserve"
    RELEASE = "release"
    CHARGE = "charge"
    HOLD = "hold"
    TOPUP = "topup"


# kind -> (balance column, sign)
_EFFECT = {
    Kind.RESERVE: ("reserved_micros", 1),
    Kind.RELEASE: ("reserved_micros", -1),
    Kind.CHARGE: ("charged_micros", 1),
    Kind.HOLD: ("held_micros", 1),
    Kind.TOPUP: ("topup_micros", 1),
}


@dataclass(frozen=True, slots=True)
class Entry:
    """One ledger row. Charges carry the usage and prices they were computed from,
    so that invoices need nothing else."""

    tenant: str
    period: str
    kind: Kind
    amount_micros: int
    model: str | None = None
    run_id: str | None = None
    seq: int | None = None
    reason: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    prices: tuple[int, int, int] | None = None  # input, cached input, output per M
    requests: int = 1  # how many requests' entries the row sums


@dataclass(frozen=True, slots=True)
class Balance:
    tenant: str
    period: str
    topup_micros: int = 0
    charged_micros: int = 0
    reserved_micros: int = 0
    held_micros: int = 0

    @property
    def spent_micros(self) -> int:
        """Settled spend: real costs, plus the worst case of answers without usage."""
        return self.charged_micros + self.held_micros

    def available_micros(self, cap_micros: int) -> int:
        """What may still be reserved under `cap_micros` (plus this period's top-ups)."""
        return cap_micros + self.topup_micros - self.spent_micros - self.reserved_micros


def period_of(when: datetime, kind: BudgetPeriod) -> str:
    """The budget period `when` (UTC) falls in: "2026-12", "2026-12-03" or "total"."""
    if kind == "total":
        return "total"
    month = f"{when.year:04}-{when.month:02}"  # (strftime costs a settle 5x as much)
    return f"{month}-{when.day:02}" if kind == "day" else month


CREATE_TABLES = """
CREATE TABLE ledger (
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    period TEXT NOT NULL,
    kind TEXT NOT NULL,
    amount_micros INTEGER NOT NULL,
    model TEXT,
    run_id TEXT,
    seq INTEGER,
    reason TEXT,
    prompt_tokens INTEGER,
    cached_tokens INTEGER,
    completion_tokens INTEGER,
    price_input INTEGER,
    price_cached_input INTEGER,
    price_output INTEGER,
    at TEXT NOT NULL
);
CREATE INDEX ledger_tenant_period ON ledger(tenant, period, kind);
CREATE INDEX ledger_run ON ledger(run_id, kind);
CREATE TABLE balances (
    tenant TEXT NOT NULL,
    period TEXT NOT NULL,
    topup_micros INTEGER NOT NULL DEFAULT 0,
    charged_micros INTEGER NOT NULL DEFAULT 0,
    reserved_micros INTEGER NOT NULL DEFAULT 0,
    held_micros INTEGER NOT NULL DEFAULT 0,
    cap_micros INTEGER,                -- the cap the last run for this period applied
    PRIMARY KEY (tenant, period)
);
CREATE TABLE alerts (
    tenant TEXT NOT NULL,
    period TEXT NOT NULL,
    threshold INTEGER NOT NULL,
    spent_micros INTEGER NOT NULL,
    cap_micros INTEGER NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (tenant, period, threshold)
);
"""


def record(conn: sqlite3.Connection, entries: Iterable[Entry], at: str) -> None:
    """Append entries and move their balances; call inside a transaction.

    Entries that differ only in their request (`seq`), amount and tokens are
    summed into one row that counts its requests, and added to the row of the
    same minute (`at`, UTC) that they would share, if it is one of the latest:
    every total a report or invoice reads is unchanged, and so is the month a
    row falls in. The request rows keep each request's own cost and usage. A
    top-up is always a row of its own, as it was given."""
    summed: dict[tuple[object, ...], Entry] = {}
    deltas: dict[tuple[str, str, str], int] = {}
    for entry in entries:
        key = _sum_key(entry)
        earlier = summed.get(key)
        summed[key] = entry if earlier is None else _sum(earlier, entry)
        column, sign = _EFFECT[entry.kind]
        balance_key = (entry.tenant, entry.period, column)
        deltas[balance_key] = deltas.get(balance_key, 0) + sign * entry.amount_micros
    new_rows = [e for e in summed.values() if not _added_to_a_row_of_the_minute(conn, e, at)]
    conn.executemany(
        "INSERT INTO ledger (tenant, period, kind, amount_micros, model, run_id, seq, reason,"
        " prompt_tokens, cached_tokens, completion_tokens, price_input, price_cached_input,"
        " price_output, requests, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                e.tenant,
                e.period,
                e.kind.value,
                e.amount_micros,
                e.model,
                e.run_id,
                e.seq,
                e.reason,
                e.prompt_tokens,
                e.cached_tokens,
                e.completion_tokens,
                *(e.prices or (None, None, None)),
                e.requests,
                at,
            )
            for e in new_rows
        ],
    )
    for (tenant, period, column), delta in deltas.items():
        conn.execute(
            f"INSERT INTO balances (tenant, period, {column}) VALUES (?, ?, ?)"
            f" ON CONFLICT (tenant, period) DO UPDATE SET {column} = {column} + excluded.{column}",
            (tenant, period, delta),
        )


# How many of a tenant's latest rows of a period and kind an entry may be added
# to: enough for a few models or runs at once, few enough to stay a short read.
_LATEST_ROWS = 8
_MINUTE = len("2026-12-03T10:34")


def _added_to_a_row_of_the_minute(conn: sqlite3.Connection, entry: Entry, at: str) -> bool:
    """Add `entry` to one of its tenant's latest rows of its period and kind that
    it would be summed with and that began in the same minute as `at`; False if
    there is none."""
    if entry.kind is Kind.TOPUP:
        return False
    latest = conn.execute(
        "SELECT id, at, model, run_id, reason, price_input, price_cached_input, price_output,"
        " prompt_tokens, cached_tokens, completion_tokens FROM ledger"
        " WHERE tenant = ? AND period = ? AND kind = ? ORDER BY id DESC LIMIT ?",
        (entry.tenant, entry.period, entry.kind.value, _LATEST_ROWS),
    ).fetchall()
    key = _sum_key(entry)
    for ident, row_at, model, run_id, reason, p_in, p_cached, p_out, *tokens in latest:
        prices = None if p_in is None else (p_in, p_cached, p_out)
        row_key = (entry.tenant, entry.period, entry.kind, model, run_id, reason, prices)
        if row_key != key or row_at[:_MINUTE] != at[:_MINUTE]:
            continue
        adding = (entry.prompt_tokens, entry.cached_tokens, entry.completion_tokens)
        conn.execute(
            "UPDATE ledger SET seq = NULL, amount_micros = amount_micros + ?,"
            " requests = requests + ?, prompt_tokens = ?, cached_tokens = ?,"
            " completion_tokens = ? WHERE id = ?",
            (
                entry.amount_micros,
                entry.requests,
                *(_plus(a, b) for a, b in zip(tokens, adding, strict=True)),
                ident,
            ),
        )
        return True
    return False


def _sum_key(entry: Entry) -> tuple[object, ...]:
    """What entries share to be summed into one row."""
    e = entry
    return (e.tenant, e.period, e.kind, e.model, e.run_id, e.reason, e.prices)


def _sum(a: Entry, b: Entry) -> Entry:
    """One entry for both (of the same tenant, period, kind, model, run, reason and
    prices); it names no single request. (Built field by field: `replace`
    costs several times more, and a checkpoint sums an entry per request.)"""
    return Entry(
        a.tenant,
        a.period,
        a.kind,
        a.amount_micros + b.amount_micros,
        model=a.model,
        run_id=a.run_id,
        seq=None,
        reason=a.reason,
        prompt_tokens=_plus(a.prompt_tokens, b.prompt_tokens),
        cached_tokens=_plus(a.cached_tokens, b.cached_tokens),
        completion_tokens=_plus(a.completion_tokens, b.completion_tokens),
        prices=a.prices,
        requests=a.requests + b.requests,
    )


def _plus(a: int | None, b: int | None) -> int | None:
    return None if a is None and b is None else (a or 0) + (b or 0)


def set_cap(conn: sqlite3.Connection, tenant: str, period: str, cap_micros: int) -> None:
    """Remember the cap a run applies to the period, for reports."""
    conn.execute(
        "INSERT INTO balances (tenant, period, cap_micros) VALUES (?, ?, ?)"
        " ON CONFLICT (tenant, period) DO UPDATE SET cap_micros = excluded.cap_micros",
        (tenant, period, cap_micros),
    )


def balance(conn: sqlite3.Connection, tenant: str, period: str) -> Balance:
    row = conn.execute(
        "SELECT topup_micros, charged_micros, reserved_micros, held_micros FROM balances"
        " WHERE tenant = ? AND period = ?",
        (tenant, period),
    ).fetchone()
    return Balance(tenant, period, *row) if row else Balance(tenant, period)


def record_alert(
    conn: sqlite3.Connection, balance: Balance, threshold: int, cap_micros: int, at: str
) -> bool:
    """Remember that `threshold` fired for the balance's tenant and period; False if
    it had fired already (an alert fires once per tenant, threshold and period)."""
    cursor = conn.execute(
        "INSERT OR IGNORE INTO alerts (tenant, period, threshold, spent_micros, cap_micros, at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (balance.tenant, balance.period, threshold, balance.spent_micros, cap_micros, at),
    )
    return cursor.rowcount == 1


# -- report queries: spend by the UTC month of its ledger row ------------------------


@dataclass(frozen=True, slots=True)
class TenantMonth:
    tenant: str
    requests: int  # charged or held responses
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    charged_micros: int
    unknown_cost: int  # responses without usage (held at their worst case)
    held_micros: int
    topup_micros: int
    cap_micros: int | None  # the monthly cap, when the tenant has one


def month_summary(conn: sqlite3.Connection, month: str) -> list[TenantMonth]:
    rows = conn.execute(
        """
        SELECT l.tenant,
               TOTAL(CASE WHEN l.kind IN ('charge', 'hold') THEN l.requests END),
               TOTAL(CASE WHEN l.kind = 'charge' THEN l.prompt_tokens END),
               TOTAL(CASE WHEN l.kind = 'charge' THEN l.cached_tokens END),
               TOTAL(CASE WHEN l.kind = 'charge' THEN l.completion_tokens END),
               TOTAL(CASE WHEN l.kind = 'charge' THEN l.amount_micros END),
               TOTAL(CASE WHEN l.kind = 'hold' THEN l.requests END),
               TOTAL(CASE WHEN l.kind = 'hold' THEN l.amount_micros END),
               TOTAL(CASE WHEN l.kind = 'topup' AND l.period = :month THEN l.amount_micros END),
               (SELECT cap_micros FROM balances b WHERE b.tenant = l.tenant AND b.period = :month)
        FROM ledger l
        WHERE substr(l.at, 1, 7) = :month OR (l.kind = 'topup' AND l.period = :month)
        GROUP BY l.tenant ORDER BY l.tenant
        """,
        {"month": month},
    ).fetchall()
    return [
        TenantMonth(
            tenant,
            int(requests or 0),
            int(prompt),
            int(cached),
            int(completion),
            int(charged),
            int(unknown or 0),
            int(held),
            int(topup),
            cap,
        )
        for tenant, requests, prompt, cached, completion, charged, unknown, held, topup, cap in rows
    ]


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    model: str
    prices: tuple[int, int, int]  # input, cached input, output: micro-USD per million
    requests: int
    prompt_tokens: int  # cached ones included
    cached_tokens: int
    completion_tokens: int
    amount_micros: int


def invoice_lines(conn: sqlite3.Connection, tenant: str, month: str) -> list[InvoiceLine]:
    rows = conn.execute(
        "SELECT model, price_input, price_cached_input, price_output, TOTAL(requests),"
        " TOTAL(prompt_tokens), TOTAL(cached_tokens), TOTAL(completion_tokens),"
        " TOTAL(amount_micros) FROM ledger"
        " WHERE tenant = ? AND kind = 'charge' AND substr(at, 1, 7) = ?"
        " GROUP BY model, price_input, price_cached_input, price_output ORDER BY model",
        (tenant, month),
    ).fetchall()
    return [
        InvoiceLine(
            model,
            (p_in, p_cached, p_out),
            int(n),
            int(prompt),
            int(cached),
            int(completion),
            int(amount),
        )
        for model, p_in, p_cached, p_out, n, prompt, cached, completion, amount in rows
    ]


def topups(conn: sqlite3.Connection, tenant: str, month: str) -> list[tuple[str, int, str]]:
    """(at, amount, reason) of the top-ups for `month` (or days of it)."""
    return conn.execute(
        "SELECT at, amount_micros, reason FROM ledger WHERE tenant = ? AND kind = 'topup'"
        " AND substr(period, 1, 7) = ? ORDER BY at",
        (tenant, month),
    ).fetchall()


def latest_period(conn: sqlite3.Connection, tenant: str) -> str | None:
    """The period a run most recently applied a cap for, for this tenant."""
    row = conn.execute(
        "SELECT period FROM balances WHERE tenant = ? AND cap_micros IS NOT NULL"
        " ORDER BY rowid DESC LIMIT 1",
        (tenant,),
    ).fetchone()
    return None if row is None else str(row[0])
