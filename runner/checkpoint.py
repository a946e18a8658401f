"""Group commit between the async lanes and the synchronous store.

A lane must not send a request before the row is committed as `sent`, but one
commit per request would make SQLite the bottleneck. `Checkpointer.mark_sent`
queues the mark and waits for the next flush; the flusher commits every mark
queued meanwhile in one transaction, so a burst of N sends costs one commit.
Outcomes do not wait: they are queued and committed with the next flush, at
the latest `interval_s` later (a crash before that re-sends them on resume,
recorded as re-sends, never as a second `done`).
"""

from __future__ import annotations

import anyio

from runner.records import Outcome
from runner.store import FailedAttempt, Store

Charge = tuple[str, str, str, int, int]


class Checkpointer:
    __slots__ = (
        "_charges", "_failures", "_flushed", "_interval_s", "_max_batch", "_outcomes",
        "_run_id", "_sent", "_store", "_wakeup", "commits",
    )  # fmt: skip

    def __init__(
        self, store: Store, run_id: str, *, interval_s: float = 0.2, max_batch: int = 1000
    ) -> None:
        self._store = store
        self._run_id = run_id
        self._interval_s = interval_s
        self._max_batch = max_batch
        self._sent: list[tuple[int, int]] = []
        self._outcomes: list[Outcome] = []
        self._failures: list[FailedAttempt] = []
        self._charges: list[Charge] = []
        self._wakeup = anyio.Event()
        self._flushed = anyio.Event()
        self.commits = 0

    def __repr__(self) -> str:
        return (
            f"Checkpointer(queued_sent={len(self._sent)}, queued_outcomes="
            f"{len(self._outcomes)}, commits={self.commits})"
        )

    async def mark_sent(self, seq: int, attempt: int) -> None:
        """Return once the row is committed as `sent` with this attempt number."""
        self._sent.append((seq, attempt))
        flushed = self._flushed
        self._wakeup.set()
        await flushed.wait()

    def finish(self, outcome: Outcome, charge: Charge | None = None) -> None:
        """Queue an outcome, and its ledger charge as (tenant, period, model, seq, micros)."""
        self._outcomes.append(outcome)
        if charge is not None:
            self._charges.append(charge)
        if len(self._outcomes) >= self._max_batch:
            self._wakeup.set()

    def fail_attempt(self, failure: FailedAttempt) -> None:
        self._failures.append(failure)

    async def run(self) -> None:
        """Flush whenever a send waits, or every `interval_s`; runs until cancelled."""
        while True:
            with anyio.move_on_after(self._interval_s):
                await self._wakeup.wait()
            self._wakeup = anyio.Event()
            self.flush()

    def flush(self) -> None:
        """Commit everything queued, then release the sends that waited for it."""
        if not (self._sent or self._outcomes or self._failures or self._charges):
            return
        flushed, self._flushed = self._flushed, anyio.Event()
        sent, self._sent = self._sent, []
        outcomes, self._outcomes = self._outcomes, []
        failures, self._failures = self._failures, []
        charges, self._charges = self._charges, []
        self._store.checkpoint(
            self._run_id, sent=sent, outcomes=outcomes, failures=failures, charges=charges
        )
        self.commits += 1
        flushed.set()
