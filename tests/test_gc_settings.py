"""The processes the runner owns run with the collector tuned for throughput;
a process that only imports the library keeps CPython's defaults."""

from __future__ import annotations

from pathlib import Path

from runner.gc_settings import YOUNG_THRESHOLD
from tests.conftest import python_then_report

_REPORT = "import gc, sys; sys.stderr.write(f'{gc.get_threshold()[0]} {gc.get_freeze_count() > 0}')"


def _python(code: str, *, cwd: Path) -> str:
    """`code` in a fresh interpreter, then its collector settings."""
    return python_then_report(code, _REPORT, cwd=cwd)


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
