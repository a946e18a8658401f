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
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from common import Sending, bare_loop, runner_submit, short_rows, write_jsonl

TENANTS = [f"t{i}" for i in range(10)]
MAX_PARALLEL = 32  # per tenant; the bare loop gets the same 320 connections
CONCURRENCY = MAX_PARALLEL * len(TENANTS)
TARGET = 0.60


def run(quick: bool) -> list[str]:
    rows, rounds = (2_000, 1) if quick else (50_000, 3)
    runs: dict[str, list[Sending]] = {"uvloop": [], "asyncio": [], "runner": []}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        write_jsonl(work / "in.jsonl", short_rows(rows, TENANTS))
        for round_ in range(rounds):
            for loop in ("uvloop", "asyncio"):
                runs[loop].append(bare_loop(work, concurrency=CONCURRENCY, loop=loop))
            runner = runner_submit(
                work, tenants=TENANTS, max_parallel=MAX_PARALLEL, run_id=f"overhead-{round_}"
            )
            if runner.requests != rows:
                sys.exit(f"runner sent {runner.requests} requests for {rows} rows")
            runs["runner"].append(runner)
    lines = [
        f"overhead: {rows} requests over {len(TENANTS)} tenants, {CONCURRENCY} connections,"
        f" zero latency, median of {rounds}"
    ]
    for label, seconds in (("while sending", "sending_s"), ("end to end", "wall_s")):
        rate = {
            name: rows / statistics.median(getattr(s, seconds) for s in done)
            for name, done in runs.items()
        }
        ratio = rate["runner"] / rate["uvloop"]
        lines.append(
            f"  {label:13}  runner {rate['runner']:5.0f} req/s;"
            f" bare aiohttp loop on uvloop {rate['uvloop']:5.0f} req/s:"
            f" ratio {ratio:.2f} (target >= {TARGET:.2f}) {'ok' if ratio >= TARGET else 'MISSED'};"
            f" on the standard loop {rate['asyncio']:5.0f} req/s:"
            f" ratio {rate['runner'] / rate['asyncio']:.2f}"
        )
    return lines
