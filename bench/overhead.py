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

import json
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
CONCURRENCY = MAX_PARALLEL * len(TENANTS)
TARGET = 0.60


def run(quick: bool) -> list[str]:
    rows, rounds = (2_000, 1) if quick else (50_000, 3)
    bare_sending, bare_whole, runner_sending, runner_whole = [], [], [], []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        write_jsonl(work / "in.jsonl", short_rows(rows, TENANTS))
        for round_ in range(rounds):
            sending, whole = _bare(work)
            bare_sending.append(sending)
            bare_whole.append(whole)
            sending, whole = _runner(work, f"overhead-{round_}", rows)
            runner_sending.append(sending)
            runner_whole.append(whole)
    lines = [
        f"overhead: {rows} requests over {len(TENANTS)} tenants, {CONCURRENCY} connections,"
        f" zero latency, median of {rounds}"
    ]
    for label, bare_s, runner_s in (
        ("while sending", bare_sending, runner_sending),
        ("end to end", bare_whole, runner_whole),
    ):
        bare, runner = rows / statistics.median(bare_s), rows / statistics.median(runner_s)
        ratio = runner / bare
        lines.append(
            f"  {label:13}  bare aiohttp loop {bare:5.0f} req/s, runner {runner:5.0f} req/s:"
            f" ratio {ratio:.2f} (target >= {TARGET:.2f}) {'ok' if ratio >= TARGET else 'MISSED'}"
        )
    return lines


def _bare(work: Path) -> tuple[float, float]:
    """(seconds from the first request to the last answer, seconds of the process)."""
    with simulator() as sim:
        bare_loop = str(Path(__file__).with_name("bare_loop.py"))
        args = [sys.executable, bare_loop, sim.base_url, "in.jsonl", str(CONCURRENCY), "16"]
        done = check(measure(args, cwd=work), "the bare loop")
    return float(json.loads(done.stdout)["seconds"]), done.wall_s


def _runner(work: Path, run_id: str, rows: int) -> tuple[float, float]:
    """The same two spans for `runner submit`, the first as the server saw it."""
    with simulator() as sim:
        job = write_job(work, sim.base_url, unlimited(TENANTS, MAX_PARALLEL), input_name="in.jsonl")
        submit = runner_cli("submit", str(job), "--run-id", run_id)
        done = check(measure(submit, cwd=work, env=key_env(TENANTS)), "runner")
        stats = sim.stats(brief=True)
    if stats["requests"] != rows:
        sys.exit(f"runner sent {stats['requests']} requests for {rows} rows")
    span = max(stats["last_ok_at"].values()) - min(stats["first_ok_at"].values())
    return span, done.wall_s
