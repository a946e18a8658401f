"""Latency-bound: the simulator answers after 200 ms; 20 tenants with
`max_parallel` 50, so at most 1,000 requests are in flight and the concurrency
bound is 1,000 / 0.2 s = 5,000 requests/s.

Prints the runner's throughput (process start to end) as a ratio of that bound
(target >= 0.90), and, measured side by side, the bare aiohttp loop's with the
same 1,000 connections: what a Python client and this simulator reach on this
machine at all, and the runner's ratio to it.
"""

from __future__ import annotations

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

TENANTS = [f"t{i:02}" for i in range(20)]
MAX_PARALLEL = 50
LATENCY_S = 0.2
TARGET = 0.90


def run(quick: bool) -> list[str]:
    rows = 4_000 if quick else 60_000
    concurrency = MAX_PARALLEL * len(TENANTS)
    bound = concurrency / LATENCY_S
    with tempfile.TemporaryDirectory() as folder, simulator("--latency", str(LATENCY_S)) as sim:
        work = Path(folder)
        write_jsonl(work / "in.jsonl", short_rows(rows, TENANTS))
        job = write_job(work, sim.base_url, unlimited(TENANTS, MAX_PARALLEL), input_name="in.jsonl")
        bare_loop = str(Path(__file__).with_name("bare_loop.py"))
        bare = measure(
            [sys.executable, bare_loop, sim.base_url, "in.jsonl", str(concurrency), "16"], cwd=work
        )
        bare_rate = rows / check(bare, "the bare loop").wall_s
        submit = runner_cli("submit", str(job), "--run-id", "latency")
        runner_rate = rows / check(measure(submit, cwd=work, env=key_env(TENANTS)), "runner").wall_s
    ratio = runner_rate / bound
    return [
        f"latency: {rows} requests, {len(TENANTS)} tenants x max_parallel {MAX_PARALLEL}, "
        f"{LATENCY_S * 1000:.0f} ms per answer; concurrency bound {bound:.0f} req/s",
        f"  runner submit      {runner_rate:7.0f} req/s: ratio to the bound {ratio:.2f}"
        f" (target >= {TARGET}) {'ok' if ratio >= TARGET else 'MISSED'}",
        f"  bare aiohttp loop  {bare_rate:7.0f} req/s: ratio to the bound {bare_rate / bound:.2f};"
        f" runner / bare {runner_rate / bare_rate:.2f}",
    ]
