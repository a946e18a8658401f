"""The benchmarks' --quick sizes run here, so the scripts cannot rot."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def quick_run(script: str) -> list[str]:
    """The lines a benchmark prints for its --quick size (it must exit 0)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_limits_benchmark_quick_run_reports_every_tenant_without_429s() -> None:
    lines = quick_run("limits.py")
    assert lines[0].startswith("limits: 3 tenants")
    assert len(lines) == 4
    assert all(line.endswith("429s 0") for line in lines[1:])


def test_isolation_benchmark_quick_run_reports_both_kinds_of_trouble() -> None:
    lines = quick_run("isolation.py")
    assert lines[0].startswith("isolation: 4 healthy tenants")
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "beside a tenant answered 429",
        "beside a tenant answered 500",
    ]
    assert all("worst ratio" in line for line in lines[1:])
