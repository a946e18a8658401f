"""Spend alerts: when a tenant's settled spend crosses one of its thresholds
(percent of its cap plus top-ups), one alert per tenant, threshold and period:
logged, recorded in the state database, and POSTed as JSON to the tenant's
`alert_webhook` when it has one.

A webhook is tried `attempts` times with backoff, in the background; one that
is down is logged and never stops or slows the run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio

from runner.config import Job
from runner.ledger import Entry, Kind
from runner.logs import log
from runner.pricing import micros_to_usd
from runner.store import Store


@dataclass(frozen=True, slots=True)
class Alert:
    tenant: str
    period: str
    threshold: int
    spent_micros: int
    cap_micros: int

    def payload(self) -> dict[str, Any]:
        return {
            "event": "budget_threshold",
            "tenant": self.tenant,
            "period": self.period,
            "threshold_percent": self.threshold,
            "spent_usd": micros_to_usd(self.spent_micros),
            "budget_usd": micros_to_usd(self.cap_micros),
        }

    def __str__(self) -> str:
        spent, cap = micros_to_usd(self.spent_micros), micros_to_usd(self.cap_micros)
        return (
            f"tenant {self.tenant!r} crossed {self.threshold}% of its budget for {self.period}: "
            f"spent ${spent:.6f} of ${cap:.6f}"
        )


class Alerts:
    """Checks balances after each commit; delivers webhooks from `deliver()`."""

    __slots__ = (
        "_delivered",
        "_job",
        "_pending",
        "_receive",
        "_recorded",
        "_send",
        "_store",
        "attempts",
        "backoff_s",
        "fired",
    )

    def __init__(
        self, store: Store, job: Job, *, attempts: int = 3, backoff_s: float = 1.0
    ) -> None:
        self._store = store
        self._job = job
        self._send, self._receive = anyio.create_memory_object_stream[tuple[str, Alert]](1000)
        self._delivered = anyio.Event()
        self._pending: set[Alert] = set()
        self._recorded: set[tuple[str, str, int]] = set()  # (tenant, period, threshold)
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.fired: list[Alert] = []

    def __repr__(self) -> str:
        return f"Alerts(fired={len(self.fired)})"

    def check(self, entries: Sequence[Entry]) -> None:
        """Fire the thresholds that the spend recorded by `entries` crossed."""
        touched = {(e.tenant, e.period) for e in entries if e.kind in (Kind.CHARGE, Kind.HOLD)}
        for tenant, period in sorted(touched):
            config = self._job.tenants.get(tenant)
            if config is None or config.cap_micros is None:
                continue
            balance = self._store.balance(tenant, period)
            cap = config.cap_micros + balance.topup_micros
            spent = balance.spent_micros
            percent = spent * 100 / cap if cap else (math.inf if spent else 0.0)
            for threshold in sorted(config.alert_thresholds):
                if percent < threshold or (tenant, period, threshold) in self._recorded:
                    continue
                # Recorded once (here or by an earlier run): no write per commit after.
                self._recorded.add((tenant, period, threshold))
                if self._store.record_alert(balance, threshold, cap):
                    self._fire(Alert(tenant, period, threshold, spent, cap), config.alert_webhook)

    def _fire(self, alert: Alert, webhook: str | None) -> None:
        self.fired.append(alert)
        log.warning(
            "budget alert: %s",
            alert,
            extra={"event": "budget_alert", "tenant": alert.tenant, "counts": alert.payload()},
        )
        if webhook is not None:
            try:
                self._send.send_nowait((webhook, alert))
            except anyio.WouldBlock:
                log.error("budget alert webhook queue full; not posted: %s", alert)

    async def deliver(self) -> None:
        """POST queued alerts until `close()`; runs in the engine's task group."""
        timeout = aiohttp.ClientTimeout(total=10)
        # Each alert posts on its own, so one webhook that hangs holds up no other.
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            self._receive,
            anyio.create_task_group() as posts,
        ):
            async for url, alert in self._receive:
                posts.start_soon(self._post, session, url, alert)
        self._delivered.set()

    def close(self) -> None:
        """No more alerts: `deliver()` ends once the queue is empty."""
        self._send.close()

    async def delivered(self) -> None:
        """Wait until every queued alert was posted (or given up on)."""
        await self._delivered.wait()

    async def _post(self, session: aiohttp.ClientSession, url: str, alert: Alert) -> None:
        self._pending.add(alert)
        try:
            await self._post_with_retries(session, url, alert)
        finally:
            self._pending.discard(alert)

    def unsent(self) -> list[Alert]:
        """Alerts whose webhook post had not finished (when the run gave up waiting)."""
        return sorted(self._pending, key=lambda alert: (alert.tenant, alert.threshold))

    async def _post_with_retries(
        self, session: aiohttp.ClientSession, url: str, alert: Alert
    ) -> None:
        for attempt in range(1, self.attempts + 1):
            try:
                async with session.post(url, json=alert.payload()) as response:
                    if response.status < 300:
                        return
                    problem = f"HTTP {response.status}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                problem = type(exc).__name__
            if attempt < self.attempts:
                await anyio.sleep(self.backoff_s * 2 ** (attempt - 1))
        log.error(
            "budget alert webhook for tenant %r failed after %d attempts (%s)",
            alert.tenant,
            self.attempts,
            problem,
        )
