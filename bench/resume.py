"""Fast resume: a 1,000,000-row run is killed (SIGKILL) once the server has
answered half of it; then `runner resume` runs with the input file moved away,
so it can only work from the state database.

Prints how long the resume took to send its first request (target < 10 s), how
many requests it sent against the rows that were left (the pending ones plus
those in flight at the kill, which are re-sent), and the end state: one output
row per input row, all done.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from common import (
    Running,
    answered,
    check,
    first_request_after,
    key_env,
    kill_tree,
    runner_cli,
    simulator,
    unlimited,
    write_job,
    write_long_prompts_parquet,
)

TENANTS = [f"t{i}" for i in range(10)]
MAX_PARALLEL = 32
TARGET_S = 10.0


def run(quick: bool) -> list[str]:
    rows = 6_000 if quick else 1_000_000
    with tempfile.TemporaryDirectory() as folder, simulator() as sim:
        work = Path(folder)
        write_long_prompts_parquet(work / "in.parquet", rows, TENANTS)
        limits = unlimited(TENANTS, MAX_PARALLEL)
        job = write_job(work, sim.base_url, limits, input_name="in.parquet", max_tokens=64)
        env = key_env(TENANTS)
        first = Running(runner_cli("submit", str(job), "--run-id", "big"), cwd=work, env=env)
        while answered(sim.stats(brief=True)) < rows / 2:
            if first.process.poll() is not None:
                raise SystemExit(f"the run ended before half of it:\n{first.wait().stderr[-2000:]}")
            time.sleep(0.2)
        kill_tree(first)
        answered_before = answered(sim.stats(brief=True))
        (work / "in.parquet").rename(work / "moved-away.parquet")
        seen = sim.stats(brief=True)["requests"]
        resume = runner_cli("resume", "big", "--state", str(work / "state.db"))
        running = Running(resume, cwd=work, env=env)
        first_request = first_request_after(sim, running, seen=seen, poll_s=0.05)
        done = check(running.wait(), "runner resume")
        sent_after = sim.stats(brief=True)["requests"] - seen
        output = pq.read_table(work / "out.parquet", columns=["id", "status"])
    left = rows - answered_before
    statuses = set(output.column("status").to_pylist())
    return [
        f"resume: {rows} rows, killed after {answered_before} answers; input moved away",
        f"  first request {first_request:.2f}s after `runner resume` started"
        f" (target < {TARGET_S:.0f}s) {'ok' if first_request < TARGET_S else 'MISSED'}",
        f"  sent {sent_after} requests for the {left} rows not answered before the kill"
        f" (+{sent_after - left} answered but not yet checkpointed at the kill, re-sent);"
        f" resume took {done.wall_s:.1f}s",
        f"  output: {output.num_rows} rows for {rows} input rows, statuses {sorted(statuses)}",
    ]
