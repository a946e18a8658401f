"""Overhead: the runner against a bare aiohttp loop, side by side.

Zero-latency simulator without limits; short prompts over 10 tenants; the
runner does everything it always does (validation, registration, limiter,
budget, group-committed checkpoints, ledger, Parquet output). The yardstick
(`bare_loop.py`) sends the same requests through the same pool size with
nothing else, on uvloop as the runner does, and again on the standard asyncio
loop, which a script that calls `asyncio.run` gets. Each gets a fresh simulator,
and rounds alternate the three.

Two ratios of medians: while sending (the bare loop's first request to its last
answer, against the runner's first to last answer as the server saw them), and
end to end (both as whole processes; the runner's includes start-up,
registration of the input and writing the output). The target (>= 0.60) is
judged against the bare loop on the runner's own loop, uvloop; the ratio to the
standard loop's is printed beside it.

The simulator is Python and takes about as much CPU per request as the bare
loop, so on a 2-core machine it bounds both. Where Node.js is installed, the
runner and the bare loop (on uvloop) run again against `fast_server.js`, which
takes a fraction of that: there the runner, which sends from one process per
core from 10,000 rows on, is measured with the CPU a real provider would leave
it.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from common import Sending, bare_loop, have_node, runner_submit, short_rows, write_jsonl

TENANTS = [f"t{i}" for i in range(10)]
MAX_PARALLEL = 32  # per tenant; the bare loop gets the same 320 connections
CONCURRENCY = MAX_PARALLEL * len(TENANTS)
TARGET = 0.60


def run(quick: bool) -> list[str]:
    rows, rounds = (2_000, 1) if quick else (50_000, 3)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        write_jsonl(work / "in.jsonl", short_rows(rows, TENANTS))
        runs = _measure(work, rows, rounds, loops=("uvloop", "asyncio"), fast=False)
        fast_runs = {}
        if have_node():
            fast_runs = _measure(work, rows, rounds, loops=("uvloop",), fast=True)
    lines = [
        f"overhead: {rows} requests over {len(TENANTS)} tenants, {CONCURRENCY} connections,"
        f" zero latency, median of {rounds}"
    ]
    lines += _ratios(runs, rows)
    if fast_runs:
        lines.append("  against bench/fast_server.js (Node.js), which leaves the clients more CPU:")
        lines += _ratios(fast_runs, rows)
    return lines


def _measure(
    work: Path, rows: int, rounds: int, *, loops: tuple[str, ...], fast: bool
) -> dict[str, list[Sending]]:
    """`rounds` rounds of the bare loop on each of `loops`, then the runner."""
    runs: dict[str, list[Sending]] = {loop: [] for loop in (*loops, "runner")}
    for round_ in range(rounds):
        for loop in loops:
            runs[loop].append(bare_loop(work, concurrency=CONCURRENCY, loop=loop, fast=fast))
        runner = runner_submit(
            work,
            tenants=TENANTS,
            max_parallel=MAX_PARALLEL,
            run_id=f"overhead-{'fast-' if fast else ''}{round_}",
            fast=fast,
        )
        if runner.requests != rows:
            sys.exit(f"runner sent {runner.requests} requests for {rows} rows")
        runs["runner"].append(runner)
    return runs


def _ratios(runs: dict[str, list[Sending]], rows: int) -> list[str]:
    lines = []
    for label, seconds in (("while sending", "sending_s"), ("end to end", "wall_s")):
        rate = {
            name: rows / statistics.median(getattr(s, seconds) for s in done)
            for name, done in runs.items()
        }
        ratio = rate["runner"] / rate["uvloop"]
        line = (
            f"  {label:13}  runner {rate['runner']:5.0f} req/s;"
            f" bare aiohttp loop on uvloop {rate['uvloop']:5.0f} req/s:"
            f" ratio {ratio:.2f} (target >= {TARGET:.2f}) {'ok' if ratio >= TARGET else 'MISSED'}"
        )
        if "asyncio" in rate:
            line += (
                f"; on the standard loop {rate['asyncio']:5.0f} req/s:"
                f" ratio {rate['runner'] / rate['asyncio']:.2f}"
            )
        lines.append(line)
    return lines
