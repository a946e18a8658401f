"""The public Python API: pinned names, sync use inside a running loop."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import runner
from runner.api import state_path, with_engine
from tests.conftest import SHARED_DATA, JobWriter


def test_the_public_api_is_pinned() -> None:
    assert runner.__all__ == [
        "BudgetExhausted",
        "ConfigError",
        "InputError",
        "Job",
        "ProviderError",
        "RateLimited",
        "RequestRejected",
        "Retryable",
        "RunResult",
        "RunnerError",
        "StateError",
        "Status",
        "TenantRefused",
        "load_job",
        "resume",
        "resume_async",
        "run_job",
        "run_job_async",
        "status",
    ]
    for name in runner.__all__:
        assert getattr(runner, name) is not None


def test_run_job_works_from_inside_a_running_event_loop(
    write_job: JobWriter, tmp_path: Path
) -> None:
    job = write_job(
        SHARED_DATA / "vicuna_bench_questions.jsonl",
        input_section='id = "question_id"\nprompt = "turns"',
        tenants={"acme": {"rpm": 6000, "tpm": 1_000_000, "max_parallel": 16}},
    )

    async def notebook_cell() -> runner.RunResult:
        return runner.run_job(job, run_id="cell")

    result = asyncio.run(notebook_cell())
    assert result.exit_code == 0 and result.counts == {"done": 80}
    table = pq.read_table(result.outputs[0])
    assert table.column("id").to_pylist() == [str(n) for n in range(1, 81)]
    assert table.column("category").to_pylist()[0] == "generic"
    ((info, tenants),) = runner.status(state=tmp_path / "state.db")
    assert info.run_id == "cell" and info.phase == "finished"
    assert sum(t.cost_micros for t in tenants) == result.cost_micros > 0


def test_state_path_prefers_the_flag_then_the_environment_then_the_default() -> None:
    assert state_path("a.db", {"RUNNER_STATE": "b.db"}) == Path("a.db")
    assert state_path(None, {"RUNNER_STATE": "b.db"}) == Path("b.db")
    assert state_path(None, {}) == Path("runner.db")


def test_the_sync_api_passes_every_option_of_the_async_one() -> None:
    for sync, asynchronous, positional in (
        (runner.run_job, runner.run_job_async, "job"),
        (runner.resume, runner.resume_async, "run_id"),
    ):
        options = set(inspect.signature(sync).parameters) - {positional}
        async_options = set(inspect.signature(asynchronous).parameters) - {positional}
        assert options == async_options - {"handle_signals", "settings"}
        source = inspect.getsource(sync)
        assert [option for option in options if f"{option}={option}" not in source] == []


def test_engine_options_override_the_job_file_and_bad_ones_are_config_errors(
    write_job: JobWriter, tmp_path: Path
) -> None:
    job = runner.load_job(write_job(tmp_path / "in.jsonl", extra="[ray]\nworkers = 3\n"))
    assert with_engine(job) == job
    ray = with_engine(job, engine="ray", address="auto", merge=True)
    assert (ray.job.engine, ray.ray.address, ray.ray.workers, ray.ray.merge) == (
        "ray",
        "auto",
        3,  # kept from the job file
        True,
    )
    assert ray.input == job.input and ray.tenants == job.tenants
    with pytest.raises(runner.ConfigError, match="workers: Input should be greater than"):
        with_engine(job, workers=0)
    with pytest.raises(runner.ConfigError, match="engine 'spark'"):
        with_engine(job, engine="spark")  # type: ignore[arg-type]


def test_the_package_exports_every_name_of_its_all_in_a_fresh_interpreter(tmp_path: Path) -> None:
    # runner.api is imported on first use of its names (lane processes never use them)
    script = (
        "import sys, runner\n"
        "loaded_early = 'runner.api' in sys.modules\n"
        "from runner import *\n"
        "missing = [name for name in runner.__all__ if name not in globals()]\n"
        "print(loaded_early, missing, runner.run_job is sys.modules['runner.api'].run_job)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["False", "[]", "True"]
    assert set(runner.__all__) <= set(dir(runner))
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        runner.nonsense  # noqa: B018
