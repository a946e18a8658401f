"""Per-tenant progress while a run works, and the summary table when it ends.

On a terminal the table redraws in place (rich); elsewhere (cron, CI, a log
file) a plain line per tenant is printed every `interval_s`, so logs stay
readable. Both read `TenantProgress` snapshots; neither touches the engine.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from runner.logs import log
from runner.pricing import micros_to_usd
from runner.store import TenantCounts

_STATUSES = ("done", "failed", "rejected", "deferred", "pending", "sent")


@dataclass(frozen=True, slots=True)
class TenantProgress:
    """One tenant's rows in a running run."""

    run_id: str
    tenant: str
    total: int
    done: int
    failed: int
    rejected: int
    deferred: int
    in_flight: int
    waiting: int
    paused_for_s: float

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.rejected + self.deferred


class ProgressDisplay:
    """Call `update()` with snapshots; `close()` when the run ends."""

    __slots__ = ("_console", "_interval_s", "_json", "_last_print", "_live", "_stream")

    def __init__(
        self, stream: TextIO | None = None, *, interval_s: float = 10.0, json_lines: bool = False
    ) -> None:
        self._stream = stream or sys.stderr
        self._console = Console(file=self._stream)
        self._interval_s = interval_s
        self._json = json_lines
        self._last_print = 0.0
        self._live: Live | None = None
        if self._console.is_terminal and not json_lines:
            self._live = Live(console=self._console, refresh_per_second=4, transient=True)
            self._live.start()

    def update(self, snapshot: Sequence[TenantProgress]) -> None:
        if self._live is not None:
            self._live.update(_progress_table(snapshot))
            return
        now = time.monotonic()
        complete = all(tenant.finished >= tenant.total for tenant in snapshot)
        if complete and self._last_print == math.inf:
            return  # the final state was printed already
        if now - self._last_print < self._interval_s and not complete:
            return
        self._last_print = math.inf if complete else now
        for tenant in snapshot:
            if self._json:
                counts = {
                    "total": tenant.total,
                    "done": tenant.done,
                    "failed": tenant.failed,
                    "deferred": tenant.deferred,
                    "rejected": tenant.rejected,
                    "in_flight": tenant.in_flight,
                }
                log.info(
                    "progress",
                    extra={
                        "event": "progress",
                        "run_id": tenant.run_id,
                        "tenant": tenant.tenant,
                        "counts": counts,
                    },
                )
                continue
            paused = f", paused {tenant.paused_for_s:.1f}s" if tenant.paused_for_s > 0 else ""
            print(
                f"progress {tenant.tenant}: {tenant.finished}/{tenant.total} finished "
                f"({tenant.done} done, {tenant.failed} failed, {tenant.deferred} deferred, "
                f"{tenant.rejected} rejected), {tenant.in_flight} in flight{paused}",
                file=self._stream,
                flush=True,
            )

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()


def _progress_table(snapshot: Sequence[TenantProgress]) -> Table:
    table = Table(title="runner: progress per tenant")
    for column in (
        "tenant",
        "finished",
        "done",
        "failed",
        "deferred",
        "rejected",
        "in flight",
        "waiting",
        "paused",
    ):
        table.add_column(column, justify="left" if column == "tenant" else "right")
    for t in snapshot:
        table.add_row(
            t.tenant,
            f"{t.finished}/{t.total}",
            str(t.done),
            str(t.failed),
            str(t.deferred),
            str(t.rejected),
            str(t.in_flight),
            str(t.waiting),
            f"{t.paused_for_s:.1f}s" if t.paused_for_s > 0 else "",
        )
    return table


def summary_table(title: str, tenants: Sequence[TenantCounts]) -> Table:
    """Rows by status, tokens and cost per tenant, with a totals row."""
    table = Table(title=title)
    table.add_column("tenant")
    for status in _STATUSES:
        table.add_column(status, justify="right")
    for column in ("prompt tok", "cached tok", "completion tok", "cost USD", "re-sent"):
        table.add_column(column, justify="right")
    for t in tenants:
        table.add_row(t.tenant, *_row_values(t))
    if len(tenants) > 1:
        total = TenantCounts(
            "TOTAL",
            {s: sum(t.by_status.get(s, 0) for t in tenants) for s in _STATUSES},
            sum(t.prompt_tokens for t in tenants),
            sum(t.cached_tokens for t in tenants),
            sum(t.completion_tokens for t in tenants),
            sum(t.cost_micros for t in tenants),
            sum(t.resends for t in tenants),
        )
        table.add_row(total.tenant, *_row_values(total), style="bold")
    return table


def _row_values(t: TenantCounts) -> list[str]:
    return [
        *(str(t.by_status.get(status, 0)) for status in _STATUSES),
        str(t.prompt_tokens),
        str(t.cached_tokens),
        str(t.completion_tokens),
        f"{micros_to_usd(t.cost_micros):.6f}",
        str(t.resends),
    ]


def print_table(table: Table, stream: TextIO | None = None) -> None:
    Console(file=stream or sys.stdout, width=160).print(table)


def rows_table(title: str, rows: Sequence[Mapping[str, object]]) -> Table:
    """Any list of flat records as a table (reports, invoices, estimates)."""
    table = Table(title=title)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*(_text(row.get(column)) for column in columns))
    return table


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list | set):
        return ", ".join(map(str, value))
    return str(value)
