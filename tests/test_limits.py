"""TenantLimiter (runner/limits.py), run on a virtual clock: minutes pass in milliseconds.

Async tests here run on `VirtualClockLoop` (see the `anyio_backend` fixture below);
the hypothesis tests start a fresh virtual loop per example with `run_virtual`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.limits import LimiterStatistics, TenantLimiter
from tests.virtual_clock import VirtualClockLoop, run_virtual

pytestmark = pytest.mark.anyio

Admission = tuple[float, int]  # (virtual time, tokens)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Callable[[], VirtualClockLoop]]]:
    return ("asyncio", {"loop_factory": VirtualClockLoop})


def make(
    rpm: int = 600,
    tpm: int = 100_000,
    max_request_tokens: int = 1_000,
    **kwargs: float,
) -> TenantLimiter:
    return TenantLimiter(
        rpm=rpm,
        tpm=tpm,
        max_request_tokens=max_request_tokens,
        **kwargs,
    )


async def admit_all(
    limiter: TenantLimiter, requests: Sequence[tuple[float, int]]
) -> list[Admission]:
    """Start one task per (arrival delay, tokens); return the admissions in order."""
    admitted: list[Admission] = []

    async def one(delay: float, tokens: int) -> None:
        await anyio.sleep(delay)
        await limiter.acquire(tokens)
        admitted.append((anyio.current_time(), tokens))

    async with anyio.create_task_group() as tg:
        for delay, tokens in requests:
            tg.start_soon(one, delay, tokens)
    return admitted


def worst_window(admitted: Sequence[Admission], length: float) -> tuple[int, int]:
    """The most requests and the most tokens in any window [t, t + length).

    A window's contents only change at admissions, so checking the windows that start
    at each admission covers them all.
    """
    times = sorted(admitted)
    most_requests = most_tokens = 0
    for i, (start, _) in enumerate(times):
        inside = [tok for at, tok in times[i:] if at < start + length]
        most_requests = max(most_requests, len(inside))
        most_tokens = max(most_tokens, sum(inside))
    return most_requests, most_tokens


# --- the virtual clock itself ---------------------------------------------------------


async def test_virtual_clock_jumps_over_idle_time() -> None:
    t0, wall0 = anyio.current_time(), time.perf_counter()
    await anyio.sleep(3600)
    assert anyio.current_time() == t0 + 3600
    assert time.perf_counter() - wall0 < 1


# --- the window property ------------------------------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, float], list[tuple[float, int]], float]:
    rpm = draw(st.integers(1, 300))
    tpm = draw(st.integers(100, 20_000))
    max_request_tokens = draw(st.integers(1, tpm))
    margin_s = draw(st.sampled_from([0.5, 0.0, 2.0]))
    arrival = st.just(0.0) | st.floats(0, 90)  # bursts at the start, and spread arrivals
    requests = draw(
        st.lists(st.tuples(arrival, st.integers(0, max_request_tokens)), min_size=1, max_size=60)
    )
    start = draw(st.sampled_from([0.0, 86_400.25]))
    knobs = {"rpm": rpm, "tpm": tpm, "max_request_tokens": max_request_tokens, "margin_s": margin_s}
    return knobs, requests, start


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_no_window_ever_overshoots(
    scenario: tuple[dict[str, float], list[tuple[float, int]], float],
) -> None:
    knobs, requests, start = scenario
    rpm, tpm = int(knobs["rpm"]), int(knobs["tpm"])
    limiter = make(
        rpm=rpm,
        tpm=tpm,
        max_request_tokens=int(knobs["max_request_tokens"]),
        margin_s=knobs["margin_s"],
    )

    admitted = run_virtual(lambda: admit_all(limiter, requests), start=start)

    assert sorted(tok for _, tok in admitted) == sorted(tok for _, tok in requests)
    assert min(at for at, _ in admitted) == start + min(delay for delay, _ in requests)
    # The sliding-window log: at most L in any window of W + m, hence also of W.
    most_requests, most_tokens = worst_window(admitted, 60.0 + knobs["margin_s"])
    assert most_requests <= rpm
    assert most_tokens <= tpm
    # The buckets: at most B at one instant, B + r*T in any T (the first second too).
    span = 60.0 + knobs["margin_s"]
    rpm_bucket = min(rpm, max(2, math.ceil(rpm / 60)))
    tpm_bucket = min(tpm, max(math.ceil(tpm / 60), 2 * int(knobs["max_request_tokens"])))
    assert worst_window(admitted, 1e-9)[0] <= rpm_bucket
    assert worst_window(admitted, 1e-9)[1] <= tpm_bucket
    in_one_second = worst_window(admitted, 1.0)
    assert in_one_second[0] <= rpm_bucket + rpm / span + 1e-9
    assert in_one_second[1] <= tpm_bucket + tpm / span + 1e-6


async def test_burst_is_one_seconds_worth_then_paced() -> None:
    limiter = make(rpm=600)  # bucket of 10, refilled at 600 / 60.5 per second
    t0 = anyio.current_time()
    admitted = await admit_all(limiter, [(0.0, 1)] * 12)
    gap = 60.5 / 600
    assert [at for at, _ in admitted[:10]] == [t0] * 10
    assert t0 + gap <= admitted[10][0] <= t0 + gap + limiter.poll_s
    assert t0 + 2 * gap <= admitted[11][0] <= t0 + 2 * gap + 2 * limiter.poll_s


async def test_full_log_waits_exactly_for_its_oldest_entry() -> None:
    limiter = make(rpm=120)  # bucket of 2: the log, not the bucket, binds at the minute
    t0 = anyio.current_time()
    admitted = await admit_all(limiter, [(0.0, 1)] * 122)
    times = [at for at, _ in admitted]
    assert times[:2] == [t0, t0]
    assert times[119] < t0 + 60.5
    # Requests 121 and 122 wait for the two admitted at t0 to leave the log.
    assert times[120] == times[121] == t0 + 60.5


async def test_tokens_are_limited_like_requests() -> None:
    limiter = make(rpm=10_000, tpm=6_000, max_request_tokens=1_000)
    t0 = anyio.current_time()
    admitted = await admit_all(limiter, [(0.0, 1_000)] * 7)
    times = [at for at, _ in admitted]
    # A bucket of two big requests drains 6000 / 60.5 per second: two at once, then
    # one each 10.08 s (give or take a poll); the log holds the seventh until the
    # first leaves its 60.5-second window.
    assert times[0] == times[1] == t0
    for index in range(2, 6):
        due = t0 + (index - 1) * 60.5 / 6
        assert due - 1e-9 <= times[index] <= due + limiter.poll_s
    assert t0 + 60.5 <= times[6] <= t0 + 60.5 + limiter.poll_s


# --- throughput ------------------------------------------------------------------------


async def run_flat_out(limiter: TenantLimiter, tokens: int, seconds: float) -> list[float]:
    """Acquire as fast as the limiter allows for `seconds`; return the admission times."""
    t0 = anyio.current_time()
    times: list[float] = []

    async def worker() -> None:
        while anyio.current_time() < t0 + seconds:
            await limiter.acquire(tokens)
            times.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        for _ in range(16):
            tg.start_soon(worker)
    return [at for at in times if at < t0 + seconds]


@pytest.mark.parametrize(
    ("rpm", "tpm", "tokens", "binding"),
    [
        (3_000, 10_000_000, 1, "rpm"),
        (120, 10_000_000, 1, "rpm"),
        (100_000, 60_000, 100, "tpm"),
        (100_000, 6_000, 100, "tpm"),  # a TPM bucket of only two requests
    ],
)
async def test_long_run_throughput_is_near_the_limit(
    rpm: int, tpm: int, tokens: int, binding: str
) -> None:
    seconds = 300.0
    times = await run_flat_out(make(rpm=rpm, tpm=tpm, max_request_tokens=100), tokens, seconds)
    limit = rpm if binding == "rpm" else tpm / tokens
    assert len(times) >= 0.97 * limit * seconds / 60


async def test_a_small_rpm_loses_nothing_to_polling() -> None:
    # rpm <= 120 gives the smallest RPM bucket, two requests: while one waits the
    # level stays above zero and keeps draining, so a late poll costs no capacity.
    limiter = make(rpm=60, tpm=10_000_000, max_request_tokens=100)
    seconds = 600.0
    times = await run_flat_out(limiter, 1, seconds)
    assert 60 * seconds / 60.5 - 2 <= len(times) <= 60 * seconds / 60.5 + 2


# --- pause ------------------------------------------------------------------------------


async def test_pause_blocks_admission_until_its_deadline() -> None:
    limiter = make()
    t0 = anyio.current_time()
    limiter.pause(10)
    assert limiter.statistics().paused_for_s == 10
    await limiter.acquire(1)
    assert anyio.current_time() == t0 + 10
    assert limiter.statistics().paused_for_s == 0


async def test_shorter_pause_does_not_shorten() -> None:
    limiter = make()
    t0 = anyio.current_time()
    limiter.pause(10)
    limiter.pause(3)
    limiter.pause(0)
    assert limiter.statistics().paused_for_s == 10
    await limiter.acquire(1)
    assert anyio.current_time() == t0 + 10


async def test_later_longer_pause_extends() -> None:
    limiter = make()
    t0 = anyio.current_time()
    limiter.pause(3)
    await anyio.sleep(1)
    limiter.pause(10)
    await limiter.acquire(1)
    assert anyio.current_time() == t0 + 11


async def test_pause_holds_a_request_already_waiting() -> None:
    limiter = make(rpm=6)  # bucket of 2: the third request waits about 10 s
    t0 = anyio.current_time()
    await limiter.acquire(1)
    await limiter.acquire(1)
    admitted: list[float] = []

    async def second() -> None:
        await limiter.acquire(1)
        admitted.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await anyio.sleep(5)
        limiter.pause(20)
        paused_until = anyio.current_time() + 20
    # (asyncio may run a timer up to its clock resolution early, so not exactly t0 + 5)
    assert paused_until == pytest.approx(t0 + 25, abs=1e-9)
    assert paused_until <= admitted[0] <= paused_until + limiter.poll_s


async def test_pause_is_per_lane() -> None:
    paused, other = make(), make()
    t0 = anyio.current_time()
    paused.pause(30)
    await other.acquire(1)
    assert anyio.current_time() == t0


@pytest.mark.parametrize("seconds", [-1.0, math.nan, math.inf])
async def test_pause_rejects_nonsense(seconds: float) -> None:
    with pytest.raises(ValueError, match="pause"):
        make().pause(seconds)


# --- statistics, order, cancellation ---------------------------------------------------


async def test_statistics_values() -> None:
    limiter = make(rpm=1, tpm=1_000, max_request_tokens=100)
    assert limiter.statistics() == LimiterStatistics(
        waiting=0, paused_for_s=0.0, admitted_requests=0, admitted_tokens=0
    )
    await limiter.acquire(40)
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(limiter.acquire, 5)
        await anyio.sleep(1)
        limiter.pause(2.5)
        assert limiter.statistics() == LimiterStatistics(
            waiting=3, paused_for_s=2.5, admitted_requests=1, admitted_tokens=40
        )
        tg.cancel_scope.cancel()
    stats = limiter.statistics()
    assert (stats.waiting, stats.admitted_requests, stats.admitted_tokens) == (0, 1, 40)


async def test_cancelled_waiter_leaves_the_lane_usable() -> None:
    limiter = make(rpm=1)
    t0 = anyio.current_time()
    await limiter.acquire(1)
    with anyio.move_on_after(5):
        await limiter.acquire(1)
    assert limiter.statistics().waiting == 0
    await limiter.acquire(1)  # the log frees the next request at t0 + 60.5
    assert anyio.current_time() == t0 + 60.5
    assert limiter.statistics().admitted_requests == 2


async def test_first_come_first_served_so_big_requests_do_not_starve() -> None:
    limiter = make(rpm=10_000, tpm=100, max_request_tokens=100)
    admitted = await admit_all(limiter, [(0.0, 60), (1.0, 100), (2.0, 1), (3.0, 1)])
    assert [tok for _, tok in admitted] == [60, 100, 1, 1]


def test_repr_shows_live_state_even_without_a_loop() -> None:
    limiter = make(rpm=120, tpm=5_000)
    text = repr(limiter)
    assert "rpm=120" in text
    assert "tpm=5000" in text
    assert "waiting=0" in text

    async def main() -> str:
        await limiter.acquire(30)
        limiter.pause(4)
        return repr(limiter)

    live = run_virtual(main)
    assert "admitted=1 req/30 tok" in live
    assert "paused_for=4.000s" in live


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"max_request_tokens": 2_000, "tpm": 1_000}, "exceeds tpm"),
        ({"rpm": 0}, ">= 1"),
        ({"tpm": 0, "max_request_tokens": 0}, ">= 1"),
        ({"window_s": 0.0}, "window_s"),
        ({"margin_s": -0.5}, "margin_s"),
    ],
)
def test_rejects_bad_settings(knobs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(**knobs)  # type: ignore[arg-type]


@pytest.mark.parametrize("tokens", [-1, 1_001])
async def test_acquire_rejects_tokens_out_of_range(tokens: int) -> None:
    limiter = make(max_request_tokens=1_000)
    with pytest.raises(ValueError, match="tokens must be"):
        await limiter.acquire(tokens)
    assert limiter.statistics().waiting == 0


async def test_sends_remembered_from_an_earlier_process_count_against_the_window() -> None:
    # rpm 3: three sends 10, 20 and 70 seconds ago; the last is out of the window.
    limiter = make(rpm=3, tpm=100_000)
    t0 = anyio.current_time()
    limiter.remember([(10.0, 5), (20.0, 5), (70.0, 5)])
    await limiter.acquire(1)
    assert anyio.current_time() == t0  # two in the window: one more fits now
    await limiter.acquire(1)
    # the oldest remembered send (20 s ago) leaves the 60.5 s window at t0 + 40.5
    assert anyio.current_time() == pytest.approx(t0 + 40.5, abs=limiter.poll_s)


# --- settling to the provider's count ------------------------------------------------


async def test_settling_gives_back_what_the_estimate_overcounted_to_the_window_and_bucket() -> None:
    # tpm 6000: the bucket holds 2 x 1000 tokens and refills 6000 / 60.5 per second.
    limiter = make(rpm=10_000, tpm=6_000, max_request_tokens=1_000)
    t0 = anyio.current_time()
    first = await limiter.acquire(1_000)
    second = await limiter.acquire(1_000)  # the bucket is full now
    limiter.settle(first, 400)
    limiter.settle(second, 400)  # the provider counted 800 of the 2000 charged
    await limiter.acquire(1_000)  # fits at once: 800 + 1000 <= 2000 in the bucket
    assert anyio.current_time() == t0
    assert limiter.settle(second, 900) is None and second.tokens == 400  # never charges more
    # The window counts what the provider counted: 800 + 1000, and 4 x 1000 more fit
    # within the minute; a fifth must wait for the first two to leave the window.
    for _ in range(4):
        await limiter.acquire(1_000)
    assert anyio.current_time() - t0 < 60.5
    assert sum(entry.tokens for entry in limiter._log) == 5_800
    await limiter.acquire(1_000)
    assert anyio.current_time() - t0 == pytest.approx(60.5)


async def test_a_settled_admission_that_left_the_window_changes_nothing() -> None:
    limiter = make(rpm=10_000, tpm=6_000, max_request_tokens=1_000)
    early = await limiter.acquire(1_000)
    await anyio.sleep(61)
    await limiter.acquire(500)  # drops `early` from the log
    limiter.settle(early, 100)
    assert limiter._log_tokens == 500
