"""Benchmark: a tenant in trouble must not slow the others.

    python bench/isolation.py            # 20-second runs
    python bench/isolation.py --quick    # 4-second runs (the test suite runs it)

Runs the same healthy tenants twice through the CLI, side by side: alone, then
beside a tenant whose every request gets 429 (and again, 500). Prints each healthy
tenant's throughput in both runs and the ratio, which should stay >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from runner.simulator import SimulatorConfig, SimulatorThread, key_label

HEALTHY = ("h1", "h2", "h3", "h4")
RPM = 1200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4-second runs")
    seconds = 4.0 if parser.parse_args().quick else 20.0
    alone = _run(seconds, trouble=None)
    print(f"isolation: {len(HEALTHY)} healthy tenants at {RPM} rpm, {seconds:.0f}s of work each")
    for trouble in (429, 500):
        beside = _run(seconds, trouble=trouble)
        ratios = [beside[t] / alone[t] for t in HEALTHY]
        print(
            f"  beside a tenant answered {trouble}: "
            + ", ".join(f"{t} {alone[t]:.1f} -> {beside[t]:.1f}/s" for t in HEALTHY)
            + f"; worst ratio {min(ratios):.3f}"
        )


def _run(seconds: float, *, trouble: int | None) -> dict[str, float]:
    """Throughput (ok answers per second) per healthy tenant, as the server saw it."""
    tenants = [*HEALTHY, "troubled"] if trouble else list(HEALTHY)
    keys = {tenant: f"sk-bench-{tenant}" for tenant in tenants}
    config = SimulatorConfig(troubled={keys["troubled"]: trouble} if trouble else {})
    with tempfile.TemporaryDirectory() as folder, SimulatorThread(config) as sim:
        work = Path(folder)
        job = _write_job(work, sim.base_url, tenants, int(RPM * seconds / 60))
        done = subprocess.run(
            [sys.executable, "-m", "runner", "submit", str(job), "--run-id", "iso"],
            cwd=work,
            capture_output=True,
            text=True,
            env={**os.environ, **{f"{t.upper()}_API_KEY": k for t, k in keys.items()}},
        )
        if done.returncode not in (0, 3):
            sys.exit(f"runner exited {done.returncode}:\n{done.stderr[-2000:]}")
        stats: dict[str, Any] = sim.stats()
    rates = {}
    for tenant in HEALTHY:
        label = key_label(keys[tenant])
        span = stats["last_ok_at"][label] - stats["first_ok_at"][label]
        rates[tenant] = (stats["per_key"][label]["ok"] - 1) / span
    return rates


def _write_job(work: Path, base_url: str, tenants: list[str], rows: int) -> Path:
    """Healthy tenants get `rows` each; the troubled one enough to stay in trouble
    for the whole run (each row spends about 6 attempts of about 1 s)."""
    troubled_rows = 16 * max(1, round(rows / RPM * 60 / 6))
    with (work / "in.jsonl").open("w", encoding="utf-8") as handle:
        for tenant in tenants:
            for i in range(troubled_rows if tenant == "troubled" else rows):
                row = {"id": f"{tenant}-{i}", "tenant": tenant, "prompt": f"Question {i}?"}
                handle.write(json.dumps(row) + "\n")
    limits = "".join(
        f"[tenants.{t}]\nrpm = {RPM}\ntpm = 1000000\nmax_parallel = 16\n" for t in tenants
    )
    (work / "job.toml").write_text(
        '[job]\nname = "iso"\ninput = "in.jsonl"\noutput = "out.parquet"\nstate = "s.db"\n'
        '[defaults]\nmodel = "gpt-4.1-mini"\nmax_tokens = 32\n'
        f'[provider]\nbase_url = "{base_url}"\nmax_attempts = 6\nmax_backoff_s = 1\n{limits}',
        encoding="utf-8",
    )
    return work / "job.toml"


if __name__ == "__main__":
    main()
