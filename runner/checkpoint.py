"""Group commit between the async lanes and the synchronous store.

A lane must not send a request before its budget is reserved and the row is
committed as `sent`, but one commit per request would make SQLite the bottleneck.
`reserve` and `mark_sent` queue their mark and wait for the next flush; the
flusher commits every mark queued meanwhile in one transaction, so a burst of N
sends costs one commit. Outcomes do not wait: they are queued and committed with
the next flush, at the latest `interval_s` later (a crash before that re-sends
them on resume, recorded as re-sends, never as a second `done`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio

from runner.ledger import Balance, Entry
from runner.records import Outcome
from runner.store import FailedAttempt, SendMark, Store

_BUSY_RETRY_S = 0.002


class _Flush:
    """One flush: the event its waiters wait on, and what it refused."""

    __slots__ = ("done", "refused")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.refused: dict[int, Balance] = {}


class Checkpointer:
    __slots__ = (
        "_entries",
        "_failures",
        "_interval_s",
        "_max_batch",
        "_next",
        "_on_commit",
        "_outcomes",
        "_run_id",
        "_sends",
        "_store",
        "_wakeup",
        "commits",
    )

    def __init__(
        self,
        store: Store,
        run_id: str,
        *,
        on_commit: Callable[[Sequence[Entry]], None] | None = None,
        interval_s: float = 0.2,
        max_batch: int = 1000,
    ) -> None:
        self._store = store
        self._run_id = run_id
        self._on_commit = on_commit
        self._interval_s = interval_s
        self._max_batch = max_batch
        self._sends: list[SendMark] = []
        self._outcomes: list[Outcome] = []
        self._failures: list[FailedAttempt] = []
        self._entries: list[Entry] = []
        self._wakeup = anyio.Event()
        self._next = _Flush()
        self.commits = 0

    def __repr__(self) -> str:
        return (
            f"Checkpointer(queued_sends={len(self._sends)}, queued_outcomes="
            f"{len(self._outcomes)}, commits={self.commits})"
        )

    async def reserve(self, seq: int, reservation: Entry, cap_micros: int) -> Balance | None:
        """Reserve a request's worst case; None once committed, or the balance
        that refused it because it does not fit under the cap."""
        return await self._commit(SendMark(seq, reservation=reservation, cap_micros=cap_micros))

    async def mark_sent(self, seq: int, attempt: int, tenant: str, tokens: int) -> None:
        """Return once the row is committed as `sent` with this attempt number,
        and its `tokens` are counted in `tenant`'s recent sends."""
        await self._commit(SendMark(seq, attempt=attempt, tenant=tenant, tokens=tokens))

    async def _commit(self, mark: SendMark) -> Balance | None:
        self._sends.append(mark)
        flush = self._next
        self._wakeup.set()
        await flush.done.wait()
        return flush.refused.get(mark.seq)

    def finish(self, outcome: Outcome, entries: Sequence[Entry] = ()) -> None:
        """Queue an outcome with its ledger entries (release, charge, hold)."""
        self._outcomes.append(outcome)
        self._entries.extend(entries)
        if len(self._outcomes) >= self._max_batch:
            self._wakeup.set()

    def fail_attempt(self, failure: FailedAttempt) -> None:
        self._failures.append(failure)

    async def run(self) -> None:
        """Flush whenever a send waits, or every `interval_s`; runs until cancelled.
        While another process writes, it retries every `_BUSY_RETRY_S` instead of
        waiting inside SQLite, so the event loop goes on meanwhile."""
        while True:
            with anyio.move_on_after(self._interval_s):
                await self._wakeup.wait()
            self._wakeup = anyio.Event()
            while not self.flush(wait=False):  # noqa: ASYNC110 (SQLite signals no release)
                await anyio.sleep(_BUSY_RETRY_S)

    def flush(self, *, wait: bool = True) -> bool:
        """Commit everything queued, then release the sends that waited for it.
        Without `wait`, False (everything still queued) while another process
        holds the database's write lock."""
        if not (self._sends or self._outcomes or self._failures or self._entries):
            return True
        refused = self._store.checkpoint(
            self._run_id,
            sends=self._sends,
            outcomes=self._outcomes,
            failures=self._failures,
            entries=self._entries,
            wait=wait,
        )
        if refused is None:
            return False
        flush, self._next = self._next, _Flush()
        entries = self._entries
        self._sends, self._outcomes, self._failures, self._entries = [], [], [], []
        flush.refused = refused
        self.commits += 1
        flush.done.set()
        if self._on_commit is not None and entries:
            self._on_commit(entries)
        return True
