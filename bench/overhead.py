"""Overhead: the runner against a bare aiohttp loop, side by side.

Zero-latency simulator without limits; short prompts over 10 tenants; the
runner does everything it always does (validation, registration, limiter,
budget, group-committed checkpoints, ledger, Parquet output). The yardstick
(`bare_loop.py`) sends the same requests through the same pool size with
nothing else. Each gets a fresh simulator, and rounds alternate the two.

Two ratios of medians: while sending (the bare loop's first request to its last
answer, against the runner's first to last answer as the server saw them), and
end to end (both as whole processes; the runner's includes start-up,
registration of the input and writing the output). Target: >= 0.60.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from common import bare_loop, runner_submit, short_rows, write_jsonl

TENANTS = [f"t{i}" for i in range(10)]
MAX_PARALLEL = 32  # per tenant; the bare loop gets the same 320 connections
CONCURRENCY = MAX_PARALLEL * len(TENANTS)
TARGET = 0.60


def run(quick: bool) -> list[str]:
    rows, rounds = (2_000, 1) if quick else (50_000, 3)
    bare_sending, bare_whole, runner_sending, runner_whole = [], [], [], []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        write_jsonl(work / "in.jsonl", short_rows(rows, TENANTS))
        for round_ in range(rounds):
            bare = bare_loop(work, concurrency=CONCURRENCY)
            bare_sending.append(bare.sending_s)
            bare_whole.append(bare.wall_s)
            runner = runner_submit(
                work, tenants=TENANTS, max_parallel=MAX_PARALLEL, run_id=f"overhead-{round_}"
            )
            if runner.requests != rows:
                sys.exit(f"runner sent {runner.requests} requests for {rows} rows")
            runner_sending.append(runner.sending_s)
            runner_whole.append(runner.wall_s)
    lines = [
        f"overhead: {rows} requests over {len(TENANTS)} tenants, {CONCURRENCY} connections,"
        f" zero latency, median of {rounds}"
    ]
    for label, bare_s, runner_s in (
        ("while sending", bare_sending, runner_sending),
        ("end to end", bare_whole, runner_whole),
    ):
        bare_rate, runner_rate = (
            rows / statistics.median(bare_s),
            rows / statistics.median(runner_s),
        )
        ratio = runner_rate / bare_rate
        lines.append(
            f"  {label:13}  bare aiohttp loop {bare_rate:5.0f} req/s,"
            f" runner {runner_rate:5.0f} req/s:"
            f" ratio {ratio:.2f} (target >= {TARGET:.2f}) {'ok' if ratio >= TARGET else 'MISSED'}"
        )
    return lines
