"""RetryPolicy backoff arithmetic and Retry-After parsing (runner/retry.py)."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from runner.retry import RetryPolicy, parse_retry_after

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)

HEADER_NAMES = [
    "retry-after-ms",
    "Retry-After",
    "retry-after",
    "RETRY-AFTER",
    "x-ratelimit-reset-requests",
    "X-RateLimit-Reset-Tokens",
    "x-ratelimit-reset-tokens",
    "content-type",
]


# --- parse_retry_after: every header form, exact values ---------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "20.5"}, 0.0205),
        ({"retry-after-ms": "0"}, 0.0),
        ({"Retry-After": "2"}, 2.0),
        ({"Retry-After": " 17 "}, 17.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"Retry-After": "0.25"}, 0.25),
        ({"Retry-After": "0"}, 0.0),
        ({"Retry-After": "Sat, 01 Mar 2025 12:00:30 GMT"}, 30.0),
        ({"Retry-After": "Saturday, 01-Mar-25 12:01:00 GMT"}, 60.0),  # RFC 850
        ({"Retry-After": "Sat Mar  1 12:00:05 2025"}, 5.0),  # asctime, naive = UTC
        ({"Retry-After": "Sat, 01 Mar 2025 11:59:00 GMT"}, 0.0),  # already past
        ({"Retry-After": "Thu, 01 Jan 1970 00:00:00 GMT"}, 0.0),
        ({"x-ratelimit-reset-requests": "1m30s"}, 90.0),
        ({"x-ratelimit-reset-requests": "250ms"}, 0.25),
        ({"x-ratelimit-reset-requests": "6m0s"}, 360.0),
        ({"x-ratelimit-reset-requests": "1h2m3.5s"}, 3723.5),
        ({"x-ratelimit-reset-requests": "20ms"}, 0.02),
        ({"x-ratelimit-reset-requests": "0.5s"}, 0.5),
        ({"x-ratelimit-reset-requests": "17s"}, 17.0),
        ({"x-ratelimit-reset-requests": "2h"}, 7200.0),
        ({"x-ratelimit-reset-requests": "1s500ms"}, 1.5),
        ({"x-ratelimit-reset-requests": "3"}, 3.0),  # bare number: seconds
        ({"x-ratelimit-reset-tokens": "6m0s"}, 360.0),
    ],
)
def test_parse_retry_after_exact_values(headers: dict[str, str], expected: float) -> None:
    assert parse_retry_after(headers, now=NOW) == pytest.approx(expected, abs=1e-12)


def test_http_date_relative_to_naive_now_taken_as_utc() -> None:
    naive = datetime(2025, 3, 1, 12, 0, 0)
    assert parse_retry_after({"Retry-After": "Sat, 01 Mar 2025 12:00:42 GMT"}, now=naive) == 42.0


def test_http_date_defaults_to_current_time() -> None:
    soon = datetime.now(UTC) + timedelta(seconds=120)
    got = parse_retry_after({"Retry-After": format_datetime(soon, usegmt=True)})
    assert got is not None
    assert 100 < got <= 120


def test_reset_headers_take_the_larger() -> None:
    headers = {"x-ratelimit-reset-requests": "250ms", "x-ratelimit-reset-tokens": "1m30s"}
    assert parse_retry_after(headers) == 90.0
    headers = {"x-ratelimit-reset-requests": "6m0s", "x-ratelimit-reset-tokens": "20ms"}
    assert parse_retry_after(headers) == 360.0


def test_unusable_reset_header_leaves_the_other() -> None:
    headers = {"x-ratelimit-reset-requests": "soon", "x-ratelimit-reset-tokens": "17s"}
    assert parse_retry_after(headers) == 17.0


def test_precedence_ms_then_retry_after_then_resets() -> None:
    everything = {
        "retry-after-ms": "500",
        "Retry-After": "7",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-reset-tokens": "2m0s",
    }
    assert parse_retry_after(everything) == 0.5
    del everything["retry-after-ms"]
    assert parse_retry_after(everything) == 7.0
    del everything["Retry-After"]
    assert parse_retry_after(everything) == 120.0


def test_unusable_source_falls_through_to_the_next() -> None:
    assert parse_retry_after({"retry-after-ms": "-5", "Retry-After": "3"}) == 3.0
    headers = {"Retry-After": "whenever", "x-ratelimit-reset-tokens": "250ms"}
    assert parse_retry_after(headers) == 0.25


@pytest.mark.parametrize("name", ["retry-after", "RETRY-AFTER", "Retry-After", "rEtRy-AfTeR"])
def test_header_names_are_case_insensitive(name: str) -> None:
    assert parse_retry_after({name: "4"}) == 4.0
    assert parse_retry_after({name.upper() + "-MS": "4000"}) == 4.0


def test_reads_aiohttp_style_multidict() -> None:
    headers = CIMultiDictProxy(CIMultiDict({"Retry-After": "9", "Content-Type": "json"}))
    assert parse_retry_after(headers) == 9.0
    reset = CIMultiDictProxy(CIMultiDict({"X-RateLimit-Reset-Tokens": "1m30s"}))
    assert parse_retry_after(reset) == 90.0


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "-1",
        "-0.5",
        "nan",
        "NaN",
        "inf",
        "Infinity",
        "1e3",
        "1_000",
        "0x10",
        "abc",
        "1.5.5",
        "soon",
        "1m30",
        "ms",
        "h",
        "30s1m",
        "1m 30s",
        "9" * 400,  # overflows a float to inf
        "Sat, 32 Mar 2025 12:00:30 GMT",
    ],
)
@pytest.mark.parametrize("name", ["retry-after-ms", "Retry-After", "x-ratelimit-reset-requests"])
def test_garbage_is_none(name: str, value: str) -> None:
    assert parse_retry_after({name: value}, now=NOW) is None


def test_no_relevant_headers_is_none() -> None:
    assert parse_retry_after({}) is None
    assert parse_retry_after({"content-type": "application/json"}) is None


@given(st.dictionaries(st.sampled_from(HEADER_NAMES) | st.text(max_size=30), st.text()))
def test_parse_never_raises_on_arbitrary_text(headers: dict[str, str]) -> None:
    result = parse_retry_after(headers, now=NOW)
    assert result is None or (math.isfinite(result) and result >= 0)


_NUMBERISH = st.text(alphabet="0123456789.hms -+eE:,naifGMTSatMrJ", max_size=25)


@given(st.dictionaries(st.sampled_from(HEADER_NAMES), _NUMBERISH))
def test_parse_never_raises_on_numberish_text(headers: dict[str, str]) -> None:
    result = parse_retry_after(headers)
    assert result is None or (math.isfinite(result) and result >= 0)


@given(st.datetimes(min_value=datetime(1900, 1, 1), timezones=st.just(UTC)))
def test_http_date_is_seconds_until_that_date(when: datetime) -> None:
    # (two-digit years are RFC 850's and read as 19xx/20xx, hence 1900 and later)
    when = when.replace(microsecond=0)
    got = parse_retry_after({"Retry-After": format_datetime(when, usegmt=True)}, now=NOW)
    assert got == max(0.0, (when - NOW).total_seconds())


# --- RetryPolicy ---------------------------------------------------------------------


def test_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.base_s, policy.max_backoff_s) == (6, 0.5, 30.0)


def test_is_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        RetryPolicy(3)  # type: ignore[call-arg]
    policy = RetryPolicy()
    with pytest.raises(AttributeError):
        policy.base_s = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"base_s": -1.0}, {"max_backoff_s": math.inf}, {"base_s": math.nan}],
)
def test_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message names the field
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_backoff_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError, match="1-based"):
        RetryPolicy().backoff(0)


@pytest.mark.parametrize(
    ("attempt", "d"), [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (6, 16.0), (7, 30.0), (50, 30.0)]
)
def test_backoff_exact_with_seeded_rng(attempt: int, d: float) -> None:
    got = RetryPolicy().backoff(attempt, random.Random(7))
    assert got == d / 2 + random.Random(7).uniform(0, d / 2)


def test_backoff_without_rng_uses_module_random() -> None:
    assert 0.25 <= RetryPolicy().backoff(1) <= 0.5


def test_backoff_huge_attempt_does_not_overflow() -> None:
    assert 15.0 <= RetryPolicy().backoff(10**9) <= 30.0


def test_zero_base_means_no_wait() -> None:
    assert RetryPolicy(base_s=0.0).backoff(5) == 0.0


@given(
    base=st.floats(0, 100, allow_nan=False),
    cap=st.floats(0, 1000, allow_nan=False),
    attempt=st.integers(1, 3000),
    seed=st.integers(0, 2**32),
)
def test_backoff_stays_in_half_to_full_of_capped_doubling(
    base: float, cap: float, attempt: int, seed: int
) -> None:
    policy = RetryPolicy(base_s=base, max_backoff_s=cap)
    d = min(cap, base * 2.0 ** min(attempt - 1, 1023))
    got = policy.backoff(attempt, random.Random(seed))
    assert d / 2 <= got <= d <= cap


@given(
    base=st.floats(0.001, 10),
    cap=st.floats(0, 1000, allow_nan=False),
    attempt=st.integers(1, 100),
)
def test_backoff_bounds_grow_with_attempt(base: float, cap: float, attempt: int) -> None:
    # With the jitter pinned to each end, the wait never shrinks as attempts go up.
    policy = RetryPolicy(base_s=base, max_backoff_s=cap)

    class Low(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return a

    class High(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    for rng in (Low(), High()):
        assert policy.backoff(attempt, rng) <= policy.backoff(attempt + 1, rng)


def test_wait_after_prefers_the_server_hint() -> None:
    policy = RetryPolicy()
    assert policy.wait_after(1, 7.5) == 7.5
    assert policy.wait_after(1, 0.0) == 0.0
    assert policy.wait_after(1, 3600.0) == 30.0  # clamped


@pytest.mark.parametrize("hint", [None, -1.0, math.nan, math.inf, -math.inf])
def test_wait_after_falls_back_to_backoff(hint: float | None) -> None:
    policy = RetryPolicy()
    assert policy.wait_after(3, hint, random.Random(1)) == policy.backoff(3, random.Random(1))


@given(
    cap=st.floats(0, 1000, allow_nan=False),
    base=st.floats(0, 1e6, allow_nan=False),
    attempt=st.integers(1, 10**6),
    hint=st.none() | st.floats(),
)
def test_wait_after_never_exceeds_the_cap(
    cap: float, base: float, attempt: int, hint: float | None
) -> None:
    wait = RetryPolicy(base_s=base, max_backoff_s=cap).wait_after(attempt, hint)
    assert 0 <= wait <= cap


@given(st.dictionaries(st.sampled_from(HEADER_NAMES), _NUMBERISH | st.text()))
def test_parsed_hints_never_push_the_wait_past_the_cap(headers: dict[str, str]) -> None:
    policy = RetryPolicy(max_backoff_s=5.0)
    assert 0 <= policy.wait_after(2, parse_retry_after(headers, now=NOW)) <= 5.0
