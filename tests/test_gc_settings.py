"""The processes the runner owns run with the collector tuned for throughput;
a process that only imports the library keeps CPython's defaults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from runner.gc_settings import YOUNG_THRESHOLD

_REPORT = "import gc, sys; sys.stderr.write(f'{gc.get_threshold()[0]} {gc.get_freeze_count() > 0}')"


def _python(code: str, *, cwd: Path) -> str:
    """Run `code` in a fresh interpreter with its stdin at its end, then report its
    collector settings, whatever exit `code` took; the report."""
    script = f"try:\n    {code}\nexcept SystemExit:\n    pass\n{_REPORT}"
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


def test_a_cli_command_freezes_start_up_and_raises_the_young_threshold(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    command = f"from runner.cli import main; main(['status', '--state', {str(state)!r}])"
    assert _python(command, cwd=tmp_path) == f"{YOUNG_THRESHOLD} True"


def test_a_lane_process_runs_tuned_too(tmp_path: Path) -> None:
    # With stdin at its end the child returns at once, as when its parent is gone.
    command = "from runner.lane_processes import main; main()"
    assert _python(command, cwd=tmp_path) == f"{YOUNG_THRESHOLD} True"


def test_importing_the_library_changes_nothing(tmp_path: Path) -> None:
    assert _python("import runner.api", cwd=tmp_path) == "700 False"
