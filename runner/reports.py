"""Money views as plain rows: the monthly report, a tenant's invoice, the
estimate of a job before it runs, and top-ups.

Every figure comes from the ledger (or, for an estimate, from the input and the
price table); amounts stay integer micro-dollars here and become dollars only
when rendered. A report's spend is the sum of the per-request costs charged that
month, so it equals the sum of `cost_usd` in the outputs of that month's runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from runner import ledger
from runner.config import Job
from runner.errors import ConfigError
from runner.ledger import Entry, InvoiceLine, Kind, period_of
from runner.pricing import usd_to_micros
from runner.records import Request
from runner.sources.discover import input_files
from runner.store import Store
from runner.validate import check_input

_MONTH = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")
_PERIOD = re.compile(r"^(\d{4}-(0[1-9]|1[0-2])(-\d{2})?|total)$")


def check_month(month: str) -> str:
    if not _MONTH.match(month):
        raise ConfigError(f"--period {month!r}: expected a month as YYYY-MM, e.g. 2026-12")
    return month


def current_month() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


@dataclass(frozen=True, slots=True)
class ReportRow:
    tenant: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    spend_micros: int
    budget_micros: int | None
    unknown_cost: int
    held_micros: int  # worst case held for the responses of unknown cost

    @property
    def percent_used(self) -> float | None:
        """Of the budget, as the budget guard counts it: spend plus what answers
        without usage hold."""
        if not self.budget_micros:
            return None
        return round((self.spend_micros + self.held_micros) * 100 / self.budget_micros, 2)

    @property
    def cost_per_million_micros(self) -> int | None:
        """Spend per million tokens (prompt and completion), in micro-dollars."""
        tokens = self.prompt_tokens + self.completion_tokens
        return None if tokens == 0 else round(self.spend_micros * 1_000_000 / tokens)


def month_report(store: Store, month: str) -> list[ReportRow]:
    """One row per tenant with spend in `month`, then a TOTAL row."""
    rows = [
        ReportRow(
            t.tenant,
            t.requests,
            t.prompt_tokens,
            t.cached_tokens,
            t.completion_tokens,
            t.charged_micros,
            None if t.cap_micros is None else t.cap_micros + t.topup_micros,
            t.unknown_cost,
            t.held_micros,
        )
        for t in store.read_ledger(lambda conn: ledger.month_summary(conn, check_month(month)))
    ]
    budgets = [row.budget_micros for row in rows if row.budget_micros is not None]
    total = ReportRow(
        "TOTAL",
        sum(row.requests for row in rows),
        sum(row.prompt_tokens for row in rows),
        sum(row.cached_tokens for row in rows),
        sum(row.completion_tokens for row in rows),
        sum(row.spend_micros for row in rows),
        sum(budgets) if budgets else None,
        sum(row.unknown_cost for row in rows),
        sum(row.held_micros for row in rows),
    )
    return [*rows, total]


@dataclass(frozen=True, slots=True)
class Invoice:
    tenant: str
    month: str
    lines: list[InvoiceLine]
    topups: list[tuple[str, int, str]]  # at, amount, reason
    unknown_cost: int

    @property
    def total_micros(self) -> int:
        return sum(line.amount_micros for line in self.lines)


def invoice(store: Store, tenant: str, month: str) -> Invoice:
    """Line items per model and prices, the month's top-ups, the total: one
    tenant's figures only."""
    check_month(month)
    lines = store.read_ledger(lambda conn: ledger.invoice_lines(conn, tenant, month))
    topups = store.read_ledger(lambda conn: ledger.topups(conn, tenant, month))
    summary = store.read_ledger(lambda conn: ledger.month_summary(conn, month))
    unknown = sum(t.unknown_cost for t in summary if t.tenant == tenant)
    return Invoice(tenant, month, lines, topups, unknown)


def topup(
    store: Store, tenant: str, amount_usd: str, *, reason: str, period: str | None = None
) -> Entry:
    """Add budget for a period (default: this month); a ledger row with the reason."""
    try:
        micros = usd_to_micros(Decimal(amount_usd))
    except (InvalidOperation, ValueError):
        raise ConfigError(
            f"top-up amount {amount_usd!r}: expected US dollars with at most six decimals"
        ) from None
    if micros <= 0:
        raise ConfigError(f"top-up amount {amount_usd!r}: must be more than zero")
    if not reason.strip():
        raise ConfigError("a top-up needs a --reason")
    period = period or current_period(store, tenant)
    if not _PERIOD.match(period):
        raise ConfigError(f"--period {period!r}: expected YYYY-MM, YYYY-MM-DD or 'total'")
    entry = Entry(tenant, period, Kind.TOPUP, micros, reason=reason.strip())
    store.add_entries([entry])
    return entry


def current_period(store: Store, tenant: str) -> str:
    """The tenant's budget period now, in the form its runs used (day, month or
    total); a month for a tenant this database has no budget for yet."""
    latest = store.read_ledger(lambda conn: ledger.latest_period(conn, tenant))
    now = datetime.now(UTC)
    if latest == "total":
        return "total"
    if latest is not None and len(latest) == len("2026-12-03"):
        return now.strftime("%Y-%m-%d")
    return now.strftime("%Y-%m")


@dataclass(slots=True)
class EstimateRow:
    tenant: str
    rows: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    max_tokens: int = 0
    worst_case_micros: int = 0
    remaining_micros: int | None = None
    models: set[str] = field(default_factory=set)

    @property
    def fits(self) -> bool | None:
        if self.remaining_micros is None:
            return None
        return self.worst_case_micros <= self.remaining_micros


def estimate(job: Job, store: Store | None) -> list[EstimateRow]:
    """A dry run over the input: rows, estimated tokens and the worst-case cost
    per tenant, against what each tenant's budget has left. Nothing is sent and
    nothing is written."""
    prices = job.price_table()
    rows: dict[str, EstimateRow] = {}
    for _, checked_rows in check_input(job, prices, input_files(job)):
        for checked in checked_rows:
            entry = rows.setdefault(checked.tenant, EstimateRow(checked.tenant))
            if isinstance(checked, Request):
                entry.rows += 1
                entry.prompt_tokens += checked.prompt_tokens_estimate
                entry.max_tokens += checked.max_tokens
                entry.worst_case_micros += prices[checked.model].worst_case(
                    checked.prompt_tokens_estimate, checked.max_tokens
                )
                entry.models.add(checked.model)
            else:
                entry.rejected += 1
    for entry in rows.values():
        entry.remaining_micros = _remaining(job, entry.tenant, store)
    return sorted(rows.values(), key=lambda row: row.tenant)


def _remaining(job: Job, tenant: str, store: Store | None) -> int | None:
    config = job.tenants.get(tenant)
    if config is None or config.cap_micros is None:
        return None
    if store is None:
        return config.cap_micros
    balance = store.balance(tenant, period_of(datetime.now(UTC), config.budget_period))
    return balance.available_micros(config.cap_micros)


def as_dicts(rows: list[ReportRow]) -> list[dict[str, object]]:
    """Report rows for JSON and CSV: dollars as decimal strings, exact."""
    return [
        {
            "tenant": row.tenant,
            "requests": row.requests,
            "prompt_tokens": row.prompt_tokens,
            "cached_tokens": row.cached_tokens,
            "completion_tokens": row.completion_tokens,
            "spend_usd": usd(row.spend_micros),
            "budget_usd": None if row.budget_micros is None else usd(row.budget_micros),
            "percent_used": row.percent_used,
            "cost_per_million_tokens_usd": None
            if row.cost_per_million_micros is None
            else usd(row.cost_per_million_micros),
            "unknown_cost": row.unknown_cost,
            "unknown_cost_held_usd": usd(row.held_micros),
        }
        for row in rows
    ]


def usd(micros: int) -> str:
    """Exact dollars as text: 1234567 -> "1.234567"."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole}.{fraction:06d}"


def invoice_dict(bill: Invoice) -> dict[str, object]:
    return {
        "tenant": bill.tenant,
        "period": bill.month,
        "lines": [
            {
                "model": line.model,
                "requests": line.requests,
                "prompt_tokens": line.prompt_tokens - line.cached_tokens,
                "cached_prompt_tokens": line.cached_tokens,
                "completion_tokens": line.completion_tokens,
                "input_usd_per_million": usd(line.prices[0]),
                "cached_input_usd_per_million": usd(line.prices[1]),
                "output_usd_per_million": usd(line.prices[2]),
                "amount_usd": usd(line.amount_micros),
            }
            for line in bill.lines
        ],
        "topups": [
            {"at": at, "amount_usd": usd(amount), "reason": reason}
            for at, amount, reason in bill.topups
        ],
        "unknown_cost_requests": bill.unknown_cost,
        "total_usd": usd(bill.total_micros),
    }


def estimate_dicts(rows: list[EstimateRow]) -> list[dict[str, object]]:
    return [
        {
            "tenant": row.tenant,
            "rows": row.rows,
            "rejected": row.rejected,
            "models": sorted(row.models),
            "prompt_tokens": row.prompt_tokens,
            "max_tokens": row.max_tokens,
            "worst_case_usd": usd(row.worst_case_micros),
            "budget_left_usd": None if row.remaining_micros is None else usd(row.remaining_micros),
            "fits": row.fits,
        }
        for row in rows
    ]
