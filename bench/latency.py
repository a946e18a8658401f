"""Latency-bound: 20 tenants with `max_parallel` 50, so at most 1,000 requests
are in flight, against a simulator that answers after a fixed latency; the
concurrency bound is 1,000 / latency requests per second.

At the issue's 200 ms the bound is 5,000 requests/s, more than this machine's
simulator and any Python client on it can serve (see the bare aiohttp loop,
measured side by side with the same 1,000 connections); at 1 s the bound is
1,000/s, within what the machine can do, so that run shows whether the runner
keeps every slot busy. Rates are the server's, from its first to its last
answer (start-up and registration excluded); the end-to-end rate of the whole
process is printed too. Target: >= 0.90 of the bound.

The CPU each request costs the simulator and each client shows which one
limits: at 1 ms of CPU per request a process on one core serves at most 1,000
requests/s, whatever the latency.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import Sending, bare_loop, runner_submit, short_rows, write_jsonl

TENANTS = [f"t{i:02}" for i in range(20)]
MAX_PARALLEL = 50
CONCURRENCY = MAX_PARALLEL * len(TENANTS)
TARGET = 0.90


def run(quick: bool) -> list[str]:
    lines = [
        f"latency: {len(TENANTS)} tenants x max_parallel {MAX_PARALLEL} = {CONCURRENCY} in flight"
    ]
    for latency_s, seconds in ((0.2, 12), (1.0, 30)):
        bound = CONCURRENCY / latency_s
        rows = int(bound * seconds * (0.1 if quick else 1))
        with tempfile.TemporaryDirectory() as folder:
            work = Path(folder)
            write_jsonl(work / "in.jsonl", short_rows(rows, TENANTS))
            latency = ("--latency", str(latency_s))
            done = bare_loop(work, *latency, concurrency=CONCURRENCY)
            bare = done.answers / done.sending_s
            sent = runner_submit(
                work, *latency, tenants=TENANTS, max_parallel=MAX_PARALLEL, run_id="latency"
            )
            runner, wall = sent.answers / (sent.sending_s + latency_s), sent.wall_s
        ratio = runner / bound
        lines += [
            f"  {latency_s * 1000:.0f} ms per answer, {rows} requests: bound {bound:.0f} req/s",
            f"    runner submit      {runner:6.0f} req/s while sending ({rows / wall:.0f} end to"
            f" end): ratio to the bound {ratio:.2f} (target >= {TARGET})"
            f" {'ok' if ratio >= TARGET else 'MISSED'}",
            f"    bare aiohttp loop  {bare:6.0f} req/s (on uvloop, as the runner):"
            f" ratio to the bound {bare / bound:.2f};"
            f" runner / bare {runner / bare:.2f}",
            f"    CPU ms per request, simulator / client: bare loop run {_cpu_ms(done)},"
            f" runner run {_cpu_ms(sent)} (the runner's whole process, registration included)",
        ]
    return lines


def _cpu_ms(sending: Sending) -> str:
    """Simulator / client CPU milliseconds per answered request."""
    per_answer = 1000 / sending.answers
    return f"{sending.server_cpu_s * per_answer:.2f} / {sending.client_cpu_s * per_answer:.2f}"
