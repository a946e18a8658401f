"""Per-tenant admission control: RPM, TPM and the lane pause.

This module owns `TenantLimiter`, one per tenant lane. It decides *when* a request
may leave; it knows nothing of budgets (`budget.py`), of retrying (`retry.py`), or of
what a request is beyond its TPM cost (estimated prompt tokens + `max_tokens`).

Window maths. Take a limit `L` per window `W` (RPM or TPM, `W` = `window_s`, 60 s) and
a margin `m` (`margin_s`). Each limit has two guards that must admit at one instant:

* an `aiolimiter.AsyncLimiter` bucket of capacity `B` (one second's worth,
  `ceil(L / W)`, but at least two of the largest admission: two requests, or twice
  `max_request_tokens`, capped at `L`) that drains at `r = L / (W + m)` per second.
  Twice the largest admission keeps the bucket level above zero while a request
  waits, so the level keeps draining between polls and polling loses no capacity
  (`acquire(n)` above the capacity would raise `ValueError` besides). An
  admission needs `level + n <= B` and the level drains at most `r*T` in `T` seconds,
  so any interval of length `T` admits at most `B + r*T`. The bucket starts empty, so
  the first minute opens with at most `B` at once, not the whole minute's budget.
* a sliding-window log of the admissions in the last `W + m` seconds, which admits
  only while the log's count (or token sum) plus the request stays `<= L`. So any
  interval of length `W + m` admits at most `L`, whereas the bucket alone would allow
  `B + L`. A provider receives each request a little after we admit it; as long as
  that delay varies by less than `m`, every `W`-second window it measures maps onto
  an interval of at most `W + m` of our admission times and holds at most `L`.

Sustained throughput is `L / (W + m)` per second, `W / (W + m)` (99.2 %) of the limit.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import anyio
from aiolimiter import AsyncLimiter

__all__ = ["Admission", "LimiterStatistics", "TenantLimiter"]


class Admission:
    """One admitted request in the window log: when, and the tokens it counts."""

    __slots__ = ("at", "in_log", "tokens")

    def __init__(self, at: float, tokens: int) -> None:
        self.at = at
        self.tokens = tokens
        self.in_log = True  # False once it left the window


def _now() -> float:
    """The event loop's clock, aiolimiter's too (`anyio.current_time()` gives the
    same, after looking up the async library on every call: 1 % of a busy
    lane process's CPU)."""
    return asyncio.get_running_loop().time()


def _refund(bucket: AsyncLimiter, amount: float) -> None:
    """Take `amount` back out of a bucket: aiolimiter offers no public way, so
    this sets its level (covered by a test, so an aiolimiter that changes breaks
    loudly)."""
    bucket.has_capacity(0)  # brings the level up to date (it leaks with time)
    bucket._level = max(0.0, bucket._level - amount)


@dataclass(frozen=True, slots=True)
class LimiterStatistics:
    """A snapshot of one lane's limiter, for progress displays and tests."""

    waiting: int  # tasks inside `acquire()` (paused, paced, or queued on the lane lock)
    paused_for_s: float  # seconds until the lane's pause ends; 0.0 when not paused
    admitted_requests: int  # admissions since the limiter was made
    admitted_tokens: int


class TenantLimiter:
    """RPM + TPM pacing and a 429 pause for one tenant's lane.

    Use as::

        admission = await limiter.acquire(request.tpm_cost)  # the pause, RPM and TPM
        reply = await provider.send(request)
        limiter.settle(admission, reply.usage.prompt_tokens + request.max_tokens)

    (The lane's `max_parallel` cap is its number of workers, so it needs no limiter.)
    Admissions are first come, first served (a FIFO lane lock): a large request is not
    overtaken by small ones, so it cannot starve. Admission is joint: loop until the
    lane is not paused and both buckets and both logs admit at the same instant, then
    take from both buckets (no suspension: the capacity is there) and log it. When
    nobody waits and everything admits at once, that happens without the lock or any
    suspension: the hot path of an unthrottled lane costs a few comparisons.
    Taking from one bucket while waiting on the other would charge that capacity at
    the wrong time, and the provider could see an overshoot.

    While a log is the bottleneck we sleep exactly until its oldest entries expire.
    While a bucket refuses we poll every `poll_s` (a quarter of the mean gap between
    requests, in [1 ms, 50 ms]): aiolimiter offers no "when will `n` fit". Polling
    costs no capacity while the bucket's level stays above zero, because it keeps
    draining while we sleep and the late admission finds it that much lower. That
    fails only when a request needs (nearly) the whole bucket, `B - n < r * poll_s`:
    the RPM bucket when `rpm <= window_s` (B = 1), or a request nearly as large as the
    TPM bucket. The level can then reach zero, where draining stops, before we look
    again, so each admission may come up to `poll_s` late: at rpm = 60 that is about
    4 % of the throughput; from rpm = 120 on, nothing measurable.

    Time is the event loop's clock, so tests move it instead of sleeping.
    """

    __slots__ = (
        "_admitted_requests",
        "_admitted_tokens",
        "_lock",
        "_log",
        "_log_tokens",
        "_paused_until",
        "_rpm_bucket",
        "_span_s",
        "_tpm_bucket",
        "_waiting",
        "max_request_tokens",
        "poll_s",
        "rpm",
        "tpm",
    )

    def __init__(
        self,
        *,
        rpm: int,
        tpm: int,
        max_request_tokens: int,
        window_s: float = 60.0,
        margin_s: float = 0.5,
    ) -> None:
        if min(rpm, tpm, max_request_tokens) < 1:
            raise ValueError("rpm, tpm and max_request_tokens must be >= 1")
        if max_request_tokens > tpm:
            raise ValueError(f"max_request_tokens {max_request_tokens} exceeds tpm {tpm}")
        if not (window_s > 0 and margin_s >= 0 and math.isfinite(window_s + margin_s)):
            raise ValueError("window_s must be > 0 and margin_s >= 0")
        self.rpm, self.tpm, self.max_request_tokens = rpm, tpm, max_request_tokens
        self._span_s = window_s + margin_s
        rpm_size = min(rpm, max(2, math.ceil(rpm / window_s)))
        tpm_size = min(tpm, max(math.ceil(tpm / window_s), 2 * max_request_tokens))
        # AsyncLimiter(B, period) drains at B / period per second; we want L / (W + m).
        self._rpm_bucket = AsyncLimiter(rpm_size, rpm_size * self._span_s / rpm)
        self._tpm_bucket = AsyncLimiter(tpm_size, tpm_size * self._span_s / tpm)
        self.poll_s = min(0.05, max(0.001, self._span_s / rpm / 4))
        self._log: deque[Admission] = deque()
        self._log_tokens = 0
        self._lock = anyio.Lock()
        self._paused_until = -math.inf
        self._waiting = 0
        self._admitted_requests = 0
        self._admitted_tokens = 0

    async def acquire(self, tokens: int) -> Admission:
        """Wait out any pause, then until RPM and TPM both admit `tokens`; charge both.

        Raises `ValueError` if `tokens` is negative or above `max_request_tokens`
        (validation rejects such rows, so this is a programming error).
        """
        if not 0 <= tokens <= self.max_request_tokens:
            raise ValueError(f"tokens must be in [0, {self.max_request_tokens}], got {tokens}")
        admission = self.try_acquire(tokens)
        if admission is not None:
            return admission
        self._waiting += 1
        try:
            async with self._lock:
                while True:
                    now = _now()
                    ready_at = max(self._paused_until, self._log_ready_at(now, tokens))
                    if ready_at > now:
                        # Exactly until then, but at least 1 us: timers may fire a hair early.
                        await anyio.sleep(max(ready_at - now, 1e-6))
                    elif self._admits(now, tokens):
                        return self._take(now, tokens)
                    else:
                        await anyio.sleep(self.poll_s)
        finally:
            self._waiting -= 1

    def try_acquire(self, tokens: int) -> Admission | None:
        """Admit `tokens` now if nobody is queued and nothing stands in the way,
        without suspending; None means `acquire` must wait."""
        now = _now()
        if self._lock.locked() or not self._admits(now, tokens):
            return None  # (the lock hands over to its waiters: unlocked means none)
        return self._take(now, tokens)

    def settle(self, admission: Admission, tokens: int) -> None:
        """The provider counted `tokens` for an admission charged at its estimate
        (an upper bound): give the difference back to the window log and the TPM
        bucket, so an estimate that overcounts costs no throughput. The count is
        the provider's own (its `usage` prompt tokens plus the completion limit),
        taken after it answered, so the window then matches its accounting.
        Never charges more than the estimate."""
        refund = admission.tokens - tokens
        if refund <= 0:
            return
        admission.tokens = tokens
        if admission.in_log:
            self._log_tokens -= refund
        _refund(self._tpm_bucket, refund)

    def _admits(self, now: float, tokens: int) -> bool:
        """Whether the pause, both logs and both buckets admit `tokens` now."""
        return (
            self._paused_until <= now
            and self._log_ready_at(now, tokens) <= now
            and self._rpm_bucket.has_capacity(1)
            and self._tpm_bucket.has_capacity(tokens)
        )

    def _take(self, now: float, tokens: int) -> Admission:
        """Charge an admission that `_admits` just allowed."""
        # `AsyncLimiter.acquire` does not suspend once `has_capacity` said yes; driving
        # its coroutine by hand charges the bucket without a trip through the loop.
        for bucket, amount in ((self._rpm_bucket, 1), (self._tpm_bucket, tokens)):
            charge = bucket.acquire(amount)
            try:
                charge.send(None)
            except StopIteration:
                pass
            else:
                charge.close()
                raise AssertionError("the bucket refused what has_capacity admitted")
        admission = Admission(now, tokens)
        self._log.append(admission)
        self._log_tokens += tokens
        self._admitted_requests += 1
        self._admitted_tokens += tokens
        return admission

    def _log_ready_at(self, now: float, tokens: int) -> float:
        """Drop expired log entries; return when the log admits one more of `tokens`."""
        log, span = self._log, self._span_s
        while log and log[0].at + span <= now:
            expired = log.popleft()
            expired.in_log = False
            self._log_tokens -= expired.tokens
        # Entries that must expire first: enough for the count, then for the token sum.
        excess_requests = len(log) + 1 - self.rpm
        excess_tokens = self._log_tokens + tokens - self.tpm
        ready_at = now
        for entry in log:
            if excess_requests <= 0 and excess_tokens <= 0:
                break
            ready_at = entry.at + span
            excess_requests -= 1
            excess_tokens -= entry.tokens
        return ready_at

    def remember(self, earlier: Iterable[tuple[float, int]]) -> None:
        """Count admissions made before this limiter existed, as (seconds ago,
        tokens): a run resumed right after a stop must not spend again what the
        provider's window still holds. Call before the first `acquire()`."""
        now = _now()
        for age, tokens in sorted(earlier, reverse=True):
            if 0 <= age < self._span_s:
                self._log.append(Admission(now - age, tokens))
                self._log_tokens += tokens

    def pause(self, seconds: float) -> None:
        """Admit nothing until `seconds` from now; extends, never shortens, a pause.

        `seconds` must be finite and >= 0 (`ValueError` otherwise); 0 changes nothing.
        """
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"pause needs a finite number of seconds >= 0, got {seconds!r}")
        self._paused_until = max(self._paused_until, _now() + seconds)

    def statistics(self) -> LimiterStatistics:
        """A snapshot of the limiter's state (must be called in the event loop)."""
        return LimiterStatistics(
            waiting=self._waiting,
            paused_for_s=max(0.0, self._paused_until - _now()),
            admitted_requests=self._admitted_requests,
            admitted_tokens=self._admitted_tokens,
        )

    def __repr__(self) -> str:
        try:
            paused = f"{max(0.0, self._paused_until - _now()):.3f}s"
        except RuntimeError:  # no event loop running: a debugger or a log line
            paused = "?"
        return (
            f"<TenantLimiter rpm={self.rpm} tpm={self.tpm} "
            f"waiting={self._waiting} "
            f"paused_for={paused} window_log={len(self._log)} req/{self._log_tokens} tok "
            f"admitted={self._admitted_requests} req/{self._admitted_tokens} tok>"
        )
