"""Isolation: a tenant in trouble must not slow the others.

Runs the same healthy tenants through the CLI, side by side: alone, then beside
a tenant whose every request gets 429 (and again, 500). Prints each healthy
tenant's throughput in both runs and the worst ratio (target >= 0.95). Runs of
20 seconds of work, 4 for --quick.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from common import check, key, key_env, measure, runner_cli, write_job, write_jsonl

from runner.simulator import SimulatorConfig, SimulatorThread, key_label

HEALTHY = ("h1", "h2", "h3", "h4")
RPM = 1200
TARGET = 0.95


def run(quick: bool) -> list[str]:
    seconds = 4.0 if quick else 20.0
    alone = _run(seconds, trouble=None)
    lines = [f"isolation: {len(HEALTHY)} healthy tenants at {RPM} rpm, {seconds:.0f}s of work each"]
    for trouble in (429, 500):
        beside = _run(seconds, trouble=trouble)
        ratios = [beside[t] / alone[t] for t in HEALTHY]
        lines.append(
            f"  beside a tenant answered {trouble}: "
            + ", ".join(f"{t} {alone[t]:.1f} -> {beside[t]:.1f}/s" for t in HEALTHY)
            + f"; worst ratio {min(ratios):.3f} (target >= {TARGET})"
        )
    return lines


def _run(seconds: float, *, trouble: int | None) -> dict[str, float]:
    """Throughput (ok answers per second) per healthy tenant, as the server saw it."""
    tenants = [*HEALTHY, "troubled"] if trouble else list(HEALTHY)
    config = SimulatorConfig(troubled={key("troubled"): trouble} if trouble else {})
    rows = int(RPM * seconds / 60)
    # The troubled tenant gets enough rows to stay in trouble for the whole run
    # (each row spends about 6 attempts of about 1 s).
    troubled_rows = 16 * max(1, round(rows / RPM * 60 / 6))
    with tempfile.TemporaryDirectory() as folder, SimulatorThread(config) as sim:
        work = Path(folder)
        write_jsonl(
            work / "in.jsonl",
            (
                {"id": f"{tenant}-{i}", "tenant": tenant, "prompt": f"Question {i}?"}
                for tenant in tenants
                for i in range(troubled_rows if tenant == "troubled" else rows)
            ),
        )
        limits = {tenant: {"rpm": RPM, "tpm": 1_000_000, "max_parallel": 16} for tenant in tenants}
        job = write_job(
            work,
            sim.base_url,
            limits,
            input_name="in.jsonl",
            max_tokens=32,
            provider="max_attempts = 6\nmax_backoff_s = 1",
        )
        submit = runner_cli("submit", str(job), "--run-id", "iso")
        check(measure(submit, cwd=work, env=key_env(tenants)), "runner", allowed=(0, 3))
        stats: dict[str, Any] = sim.stats()
    rates = {}
    for tenant in HEALTHY:
        label = key_label(key(tenant))
        span = stats["last_ok_at"][label] - stats["first_ok_at"][label]
        rates[tenant] = (stats["per_key"][label]["ok"] - 1) / span
    return rates
