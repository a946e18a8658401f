"""Scale: flat memory and the cost of registering, at a million rows.

Runs a 100,000-row and a 1,000,000-row Parquet input (prompts of 200-2,000
characters stitched from real questions, 10 tenants) through `runner submit`
against the zero-latency simulator, and prints:

- peak RSS of the runner, its child processes included (target < 500 MB),
  and the ratio of the two peaks (target <= 1.3);
- registration: the time from starting the process to the server seeing its
  first request (interpreter start-up included), as a share of the whole run
  (target < 20 %);
- the state database's size after the run against the responses it holds
  (target < 2x), and what each row costs beyond its response text.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

from common import (
    Measured,
    Running,
    Simulator,
    check,
    first_request_after,
    key_env,
    runner_cli,
    simulator,
    unlimited,
    write_job,
    write_long_prompts_parquet,
)

TENANTS = [f"t{i}" for i in range(10)]
MAX_TOKENS = 64
MB = 1024 * 1024


def run(quick: bool) -> list[str]:
    small, big = (1_000, 5_000) if quick else (100_000, 1_000_000)
    lines = [f"scale: {small} and {big} rows of 200-2,000 character prompts, 10 tenants"]
    peaks = {}
    with tempfile.TemporaryDirectory() as folder, simulator() as sim:
        for rows in (small, big):
            work = Path(folder) / str(rows)
            work.mkdir()
            done, registered = _submit(sim, work, rows)
            peaks[rows] = done.peak_rss_mb
            share = registered / done.wall_s
            lines.append(
                f"  {rows:>9} rows: {rows / done.wall_s:6.0f} rows/s, wall {done.wall_s:6.1f}s,"
                f" peak RSS {done.peak_rss_mb:5.0f} MB"
                f" ({'ok' if done.peak_rss_mb < 500 else 'OVER'} < 500 MB);"
                f" first request after {registered:5.1f}s = {share:.1%} of the run"
                f" ({'ok' if share < 0.2 else 'OVER'} < 20%)"
            )
            lines.append("  " + _database_sizes(work / "state.db"))
    ratio = peaks[big] / peaks[small]
    lines.append(
        f"  peak RSS {big} / {small} rows: {ratio:.2f} ({'ok' if ratio <= 1.3 else 'OVER'} <= 1.3)"
    )
    return lines


def _submit(sim: Simulator, work: Path, rows: int) -> tuple[Measured, float]:
    """The finished submit of `rows` rows, and when its first request arrived."""
    write_long_prompts_parquet(work / "in.parquet", rows, TENANTS)
    limits = unlimited(TENANTS, 32)
    job = write_job(work, sim.base_url, limits, input_name="in.parquet", max_tokens=MAX_TOKENS)
    seen = sim.stats(brief=True)["requests"]
    submit = runner_cli("submit", str(job), "--run-id", "scale")
    running = Running(submit, cwd=work, env=key_env(TENANTS))
    registered = first_request_after(sim, running, seen=seen, poll_s=0.2)
    return check(running.wait(), "runner"), registered


def _database_sizes(path: Path) -> str:
    """The state database after the run against the response text it holds; the
    requests themselves are dropped as they are answered."""
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())
    with sqlite3.connect(path) as db:
        responses, rows = db.execute(
            "SELECT TOTAL(LENGTH(CAST(response AS BLOB))), COUNT(*) FROM requests"
        ).fetchone()
        (kept,) = db.execute("SELECT COUNT(*) FROM request_bodies").fetchone()
    ratio = size / responses
    return (
        f"           database {size / MB:7.1f} MB = {ratio:.2f}x the responses it holds"
        f" ({responses / MB:.1f} MB, {responses / rows:.0f} bytes each)"
        f" ({'ok' if ratio < 2 else 'OVER'} < 2x); beyond the response text"
        f" {(size - responses) / rows:.0f} bytes per row; {kept} requests kept"
    )
