"""The money ledger: one row per reservation, release, charge, hold and top-up,
and a balance per tenant and budget period kept equal to the ledger's sums.

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
    return when.strftime("%Y-%m-%d" if kind == "day" else "%Y-%m")


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
    """Append entries and move their balances; call inside a transaction."""
    rows = []
    deltas: dict[tuple[str, str, str], int] = {}
    for entry in entries:
        prices = entry.prices or (None, None, None)
        rows.append(
            (entry.tenant, entry.period, entry.kind.value, entry.amount_micros, entry.model,
             entry.run_id, entry.seq, entry.reason, entry.prompt_tokens, entry.cached_tokens,
             entry.completion_tokens, *prices, at)
        )  # fmt: skip
        column, sign = _EFFECT[entry.kind]
        key = (entry.tenant, entry.period, column)
        deltas[key] = deltas.get(key, 0) + sign * entry.amount_micros
    conn.executemany(
        "INSERT INTO ledger (tenant, period, kind, amount_micros, model, run_id, seq, reason,"
        " prompt_tokens, cached_tokens, completion_tokens, price_input, price_cached_input,"
        " price_output, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    for (tenant, period, column), delta in deltas.items():
        conn.execute(
            f"INSERT INTO balances (tenant, period, {column}) VALUES (?, ?, ?)"
            f" ON CONFLICT (tenant, period) DO UPDATE SET {column} = {column} + excluded.{column}",
            (tenant, period, delta),
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
