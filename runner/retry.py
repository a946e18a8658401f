"""Retry timing: how long to wait before the next attempt, and what the server asked for.

This module owns the arithmetic of retrying: `RetryPolicy` (how many attempts, the
capped exponential backoff with jitter) and `parse_retry_after`, which turns a 429 or
503 reply's headers into a wait in seconds. It decides nothing about *whether* an
error is retryable (that is `provider.py`, through the error tree in `errors.py`) and
does no sleeping itself: the lane sleeps, or pauses its `TenantLimiter`, for the value
returned here.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

__all__ = ["RetryPolicy", "parse_retry_after"]

# 2.0 ** 1024 overflows a float; past this exponent the cap applies anyway.
_MAX_EXPONENT = 1023

_SECONDS = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)")
# OpenAI's reset durations: "1h2m3.5s", "6m0s", "250ms", "17s". Each unit at most once,
# in this order; "m" must not be the start of "ms".
_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_DURATION = re.compile(rf"(?:{_NUM}h)?(?:{_NUM}m(?!s))?(?:{_NUM}s)?(?:{_NUM}ms)?")
_DURATION_UNITS = (3600.0, 60.0, 1.0, 0.001)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often to try a request, and how long to wait between attempts.

    `max_attempts` counts every attempt, the first included. The wait after failed
    attempt `n` (1-based) is "equal jitter" exponential backoff::

        d    = min(max_backoff_s, base_s * 2 ** (n - 1))
        wait = d / 2 + uniform(0, d / 2)          # so d/2 <= wait <= d

    Half of the wait is guaranteed, so retries really do back off; the random half
    spreads out the many requests of a lane that failed together. A server's hint
    (`Retry-After` and friends, see `parse_retry_after`) replaces the backoff, but no
    wait of any kind exceeds `max_backoff_s`.
    """

    max_attempts: int = 6
    base_s: float = 0.5
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        for name in ("base_s", "max_backoff_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """The jittered wait after failed attempt `attempt` (1-based), in seconds.

        See the class docstring for the formula; `rng` makes the jitter reproducible.
        """
        if attempt < 1:
            raise ValueError(f"attempt is 1-based, got {attempt}")
        d = min(self.max_backoff_s, self.base_s * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
        half = d / 2
        jitter = (rng or random).uniform(0, half)
        # uniform() may round to just past its bound; the cap is a promise.
        return min(d, half + jitter)

    def wait_after(
        self, attempt: int, retry_after: float | None, rng: random.Random | None = None
    ) -> float:
        """The wait before the attempt after `attempt`, in seconds.

        The server's hint wins when it is usable (finite, >= 0), clamped to
        `max_backoff_s`; otherwise this is `backoff(attempt, rng)`.
        """
        if retry_after is not None and math.isfinite(retry_after) and retry_after >= 0:
            return min(retry_after, self.max_backoff_s)
        return self.backoff(attempt, rng)


def parse_retry_after(headers: Mapping[str, str], *, now: datetime | None = None) -> float | None:
    """The wait in seconds that a reply's headers ask for, or None if they ask for none.

    Header names are matched case-insensitively. The first usable source wins:

    1. `retry-after-ms`: milliseconds, integer or fractional.
    2. `Retry-After`: seconds ("2", "1.5") or an HTTP-date, counted from `now`
       (default: the current UTC time; a naive `now` or date is taken as UTC). A date
       already past gives 0.0.
    3. The larger of `x-ratelimit-reset-requests` and `x-ratelimit-reset-tokens`,
       in OpenAI's duration form ("1m30s", "250ms", "1h2m3.5s", "0.5s"); a bare
       number is taken as seconds.

    A header that is empty, negative, NaN, infinite or unreadable is skipped as if
    absent. The result is always a finite float >= 0; this function never raises,
    since it reads whatever a misbehaving server sent.
    """
    try:
        lowered = {str(k).lower(): v for k, v in headers.items() if isinstance(v, str)}
    except Exception:  # a broken mapping is "no hint", never a crash in the retry path
        return None

    if (ms := _number(lowered.get("retry-after-ms"))) is not None:
        return _finite(ms / 1000)
    if (value := lowered.get("retry-after")) is not None:
        seconds = _number(value)
        if seconds is None:
            seconds = _http_date_delay(value, now)
        if seconds is not None:
            return seconds
    resets = [
        d
        for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
        if (d := _duration(lowered.get(name))) is not None
    ]
    return max(resets) if resets else None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) and value >= 0 else None


def _number(text: str | None) -> float | None:
    """A plain non-negative decimal ("17", "1.5"); not "1e3", "nan", "-1" or "1_0"."""
    if text is None or not _SECONDS.fullmatch(text := text.strip()):
        return None
    return _finite(float(text))


def _duration(text: str | None) -> float | None:
    if text is None or not (text := text.strip()):
        return None
    if (plain := _number(text)) is not None:
        return plain
    match = _DURATION.fullmatch(text)
    if match is None:
        return None
    total = sum(
        float(part) * unit
        for part, unit in zip(match.groups(), _DURATION_UNITS, strict=True)
        if part is not None
    )
    return _finite(total)


def _http_date_delay(text: str, now: datetime | None) -> float | None:
    try:
        when = parsedate_to_datetime(text)
    except Exception:  # the stdlib parser raises several types on odd input
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return _finite(max(0.0, (when - now).total_seconds()))
