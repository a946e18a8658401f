"""Every benchmark scenario runs at its --quick size, so the scripts cannot rot.

The figures themselves are not judged here (timings on a shared CI machine
prove nothing); the shape of each report and the facts that must hold at any
size are.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.conftest import REPO


def quick_run(scenario: str) -> list[str]:
    """The lines `bench/run.py SCENARIO --quick` prints (it must exit 0)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), scenario, "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("# commit ") and lines[0].endswith("(quick sizes)")
    assert lines[-1].startswith(f"  ({scenario} took ")
    return lines[1:-1]


def test_overhead_compares_the_runner_with_a_bare_loop() -> None:
    lines = quick_run("overhead")
    assert lines[0].startswith("overhead: 2000 requests over 10 tenants")
    assert [line.split("  runner")[0].strip() for line in lines[1:3]] == [
        "while sending",
        "end to end",
    ]
    for line in lines[1:3]:
        assert "bare aiohttp loop on uvloop" in line and "on the standard loop" in line
        assert line.count(" ratio ") == 2
    if shutil.which("node"):
        assert lines[3].startswith("  against bench/fast_server.js (Node.js)")
        assert [line.split("  runner")[0].strip() for line in lines[4:]] == [
            "while sending",
            "end to end",
        ]
        assert all(line.count(" ratio ") == 1 for line in lines[4:])
    else:
        assert len(lines) == 3


def test_latency_compares_with_the_concurrency_bound() -> None:
    lines = quick_run("latency")
    assert lines[0] == "latency: 20 tenants x max_parallel 50 = 1000 in flight"
    blocks = [lines[start : start + 4] for start in range(1, len(lines), 4)]
    servers = ["200 ms per answer from the simulator"]
    if shutil.which("node"):
        servers.append("200 ms per answer from bench/fast_server.js (Node.js)")
    servers.append("1000 ms per answer from the simulator")
    assert [header.split(",")[0].strip() for header, *_ in blocks] == servers
    for header, runner_line, bare_line, cpu_line in blocks:
        assert header.endswith(f"bound {5000 if header.strip().startswith('200') else 1000} req/s")
        assert "runner submit" in runner_line and "ratio to the bound" in runner_line
        assert "bare aiohttp loop" in bare_line and "runner / bare" in bare_line
        assert "CPU ms per request, server / client: bare loop run" in cpu_line


def test_limits_are_never_passed_at_a_strict_server() -> None:
    lines = quick_run("limits")
    assert lines[0].startswith("limits: 5 tenants, rpm 3000, tpm 200000")
    assert len(lines) == 6
    assert all("(never over); 429s 0" in line for line in lines[1:])
    assert [line.split()[0] for line in lines[1:]] == ["r1", "r2", "r3", "t1", "t2"]
    assert all("binding tpm" in line for line in lines[4:])


def test_isolation_reports_both_kinds_of_trouble() -> None:
    lines = quick_run("isolation")
    assert lines[0].startswith("isolation: 4 healthy tenants")
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "beside a tenant answered 429",
        "beside a tenant answered 500",
    ]


def test_scale_reports_memory_registration_and_database_size() -> None:
    lines = quick_run("scale")
    assert lines[0].startswith("scale: 1000 and 5000 rows")
    assert "1000 rows:" in lines[1] and "5000 rows:" in lines[3]
    assert all("database" in line for line in (lines[2], lines[4]))
    assert lines[5].startswith("  peak RSS 5000 / 1000 rows: ")


def test_resume_after_a_kill_ends_with_every_row_done_without_the_input() -> None:
    lines = quick_run("resume")
    assert lines[0].startswith("resume: 6000 rows, killed after ")
    assert lines[-1] == "  output: 6000 rows for 6000 input rows, statuses ['done']"
