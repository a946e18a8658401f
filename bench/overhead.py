"""Overhead: the runner against a bare aiohttp loop, side by side.

Zero-latency simulator without limits; short prompts over 10 tenants; the
runner does everything it always does (validation, registration, limiter,
budget, group-committed checkpoints, ledger, Parquet output). The yardstick
(`bare_loop.py`) sends the same requests through the same pool size with
nothing else. Both are timed as whole processes, start-up included. Rounds
alternate the two; the median of each is compared.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from common import (
    check,
    key_env,
    measure,
    runner_cli,
    short_rows,
    simulator,
    unlimited,
    write_job,
    write_jsonl,
)

TENANTS = [f"t{i}" for i in range(10)]
MAX_PARALLEL = 32  # per tenant; the bare loop gets the same 320 connections
TARGET = 0.60


def run(quick: bool) -> list[str]:
    rows, rounds = (2_000, 1) if quick else (50_000, 3)
    concurrency = MAX_PARALLEL * len(TENANTS)
    bare_s: list[float] = []
    runner_s: list[float] = []
    with tempfile.TemporaryDirectory() as folder, simulator() as sim:
        work = Path(folder)
        write_jsonl(work / "in.jsonl", short_rows(rows, TENANTS))
        job = write_job(work, sim.base_url, unlimited(TENANTS, MAX_PARALLEL), input_name="in.jsonl")
        bare_loop = str(Path(__file__).with_name("bare_loop.py"))
        for round_ in range(rounds):
            bare = measure(
                [sys.executable, bare_loop, sim.base_url, "in.jsonl", str(concurrency), "16"],
                cwd=work,
            )
            bare_s.append(check(bare, "the bare loop").wall_s)
            before = sim.stats()["requests"]
            submit = runner_cli("submit", str(job), "--run-id", f"overhead-{round_}")
            runner_s.append(check(measure(submit, cwd=work, env=key_env(TENANTS)), "runner").wall_s)
            stats = sim.stats()
            if stats["requests"] - before != rows:
                sys.exit(f"runner sent {stats['requests'] - before} requests for {rows} rows")
    bare, runner = statistics.median(bare_s), statistics.median(runner_s)
    ratio = bare / runner
    return [
        f"overhead: {rows} requests over {len(TENANTS)} tenants, {concurrency} connections, "
        f"zero latency, median of {rounds}",
        f"  bare aiohttp loop  {rows / bare:7.0f} req/s ({bare:.1f}s, process start to end)",
        f"  runner submit      {rows / runner:7.0f} req/s ({runner:.1f}s, process start to end,"
        f" registration and output included)",
        f"  ratio runner / bare {ratio:.2f} (target >= {TARGET:.2f}) "
        f"{'ok' if ratio >= TARGET else 'MISSED'}",
    ]
