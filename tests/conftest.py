"""Shared fixtures: an isolated environment per test, job files, the real data."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from runner.store import Store

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_DATA = REPO / "sample_data"

JobWriter = Callable[..., Path]


def new_run(store: Store, run_id: str = "r", *, job_name: str = "j") -> None:
    """A bare run in phase `registering`, for tests that fill the store by hand."""
    store.create_run(
        run_id,
        job_name=job_name,
        job_json="{}",
        input_path="in.jsonl",
        input_format="jsonl",
        input_hash="h",
        output_path="out.parquet",
    )


def ledger_charges(store: Store, run_id: str) -> int:
    """The run's charges in the ledger (which must equal its rows' costs)."""
    (total,) = store.db.execute(
        "SELECT TOTAL(amount_micros) FROM ledger WHERE run_id = ? AND kind = 'charge'", [run_id]
    ).fetchone()
    return int(total)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m runner ARGS` in a subprocess, as a user or a scheduler runs it."""
    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        env=os.environ.copy(),
    )


def python_then_report(code: str, report: str, *, cwd: Path) -> str:
    """Run `code` in a fresh interpreter with its stdin at its end, then `report`
    (which writes to stderr: a lane process keeps stdout for its progress),
    whatever exit `code` took; the report's last line."""
    script = f"try:\n    {code}\nexcept SystemExit:\n    pass\n{report}"
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        input="",  # a pipe at its end (epoll cannot watch /dev/null)
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stderr.strip().splitlines()[-1]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No key or state location leaks in from the developer's shell; cwd is tmp."""
    for name in list(os.environ):
        if name.endswith("_API_KEY") or name == "RUNNER_STATE":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


TENANTS = {
    "acme": {"rpm": 600, "tpm": 200_000, "max_parallel": 8},
    "globex": {"rpm": 600, "tpm": 200_000, "max_parallel": 8},
    "initech": {"rpm": 600, "tpm": 200_000, "max_parallel": 8},
}


@pytest.fixture
def write_job(tmp_path: Path) -> JobWriter:
    """Write a job file into tmp_path; returns its path.

    `tenants` maps name -> settings; `input_section`, `defaults`, `provider` and
    `extra` are TOML text appended to their tables.
    """

    def write(
        input_path: Path,
        *,
        base_url: str = "builtin:simulator",
        tenants: dict[str, dict[str, object]] | None = None,
        input_section: str = "",
        defaults: str = 'model = "deepseek-v3.2"\nmax_tokens = 64',
        provider: str = "max_attempts = 4\nbackoff_base_s = 0.01\nmax_backoff_s = 0.05",
        job: str = 'default_tenant = "acme"',
        extra: str = "",
        name: str = "job.toml",
    ) -> Path:
        lines = [
            "[job]",
            'name = "test"',
            f'input = "{input_path}"',
            'output = "out/result.parquet"',
            'state = "state.db"',
            job,
            "[input]",
            input_section,
            "[defaults]",
            defaults,
            "[provider]",
            f'base_url = "{base_url}"',
            provider,
        ]
        for tenant, settings in (tenants or TENANTS).items():
            lines.append(f'[tenants."{tenant}"]')
            lines += [f"{key} = {_toml(value)}" for key, value in settings.items()]
        lines.append(textwrap.dedent(extra))
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return write


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return str(value)
