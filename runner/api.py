"""The Python API: what the CLI does, for Airflow, Prefect, cron wrappers and notebooks.

`run_job()` and `resume()` are synchronous and work from plain code as well as
from inside a running event loop (Jupyter, async task runners): there the run
happens in a worker thread with its own loop. `run_job_async()` and
`resume_async()` are the same for callers that are already async.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, get_args

from pydantic import ValidationError

from runner import eventloop
from runner.config import EngineName, Job, RaySection, load_job
from runner.engine import EngineSettings
from runner.errors import ConfigError, StateError
from runner.locks import RunLock
from runner.logs import log
from runner.runs import Execution, ProgressCallback, execute, register
from runner.sources import file_hash
from runner.sources.discover import candidates, combined_hash, is_pattern, settled
from runner.store import RunInfo, Store, TenantCounts

DEFAULT_STATE = Path("runner.db")
STATE_VARIABLE = "RUNNER_STATE"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a submit or resume ended."""

    run_id: str
    state: Path
    tenants: tuple[TenantCounts, ...]
    outputs: tuple[Path, ...]
    interrupted: bool
    requeued: int
    problems: tuple[tuple[str, str, str, int], ...] = ()  # tenant, status, error, rows

    @property
    def counts(self) -> dict[str, int]:
        """Rows by status over all tenants."""
        totals: dict[str, int] = {}
        for tenant in self.tenants:
            for status, count in tenant.by_status.items():
                totals[status] = totals.get(status, 0) + count
        return totals

    @property
    def cost_micros(self) -> int:
        return sum(tenant.cost_micros for tenant in self.tenants)

    @property
    def exit_code(self) -> int:
        """0 all rows done; 3 some failed, rejected or deferred; 130 interrupted."""
        if self.interrupted:
            return 130
        counts = self.counts
        return 0 if counts.get("done", 0) == sum(counts.values()) else 3


def state_path(explicit: Path | str | None, environ: Mapping[str, str] | None = None) -> Path:
    """`--state`, else `$RUNNER_STATE`, else `./runner.db`."""
    environ = os.environ if environ is None else environ
    if explicit is not None:
        return Path(explicit)
    return Path(environ[STATE_VARIABLE]) if environ.get(STATE_VARIABLE) else DEFAULT_STATE


def resolve_run_id(template: str, job: Job, input_hash: str) -> str:
    """A run id from a template: {job}, {date} (UTC, 2026-12-03), {datetime}
    (UTC, 20261203T020000Z) and {input_hash} (12 hex digits of the input's sha256).
    A nightly `{job}-{date}` makes a second submit the same night continue the
    first run instead of sending everything again."""
    now = datetime.now(UTC)
    values = {
        "job": job.job.name,
        "date": now.strftime("%Y-%m-%d"),
        "datetime": now.strftime("%Y%m%dT%H%M%SZ"),
        "input_hash": input_hash[:12],
    }
    try:
        run_id = template.format_map(values)
    except (KeyError, ValueError, IndexError, AttributeError, TypeError, OverflowError) as exc:
        raise ConfigError(
            f"run id template {template!r}: {exc}; use {{job}}, {{date}}, {{datetime}}, "
            "{input_hash}"
        ) from None
    if not run_id.strip():
        raise ConfigError(f"run id template {template!r} gives an empty run id")
    return run_id


async def run_job_async(
    job: Path | str | Job,
    *,
    run_id: str | None = None,
    state: Path | str | None = None,
    strict: bool = False,
    retry_failed: bool = False,
    restart: bool = False,
    on_progress: ProgressCallback | None = None,
    environ: Mapping[str, str] | None = None,
    handle_signals: bool = False,
    settings: EngineSettings | None = None,
    engine: EngineName | None = None,
    address: str | None = None,
    workers: int | None = None,
    merge: bool | None = None,
) -> RunResult:
    """Submit a job (a path to its TOML file, or a loaded `Job`) and run it to the
    end. `run_id` (or the job's `run_id`) may be a template (`resolve_run_id`).
    An existing run is continued instead, with this job's provider, tenants and
    prices (its rows stay as registered); if its input file changed since, the
    submit is refused, unless `restart` registers the input afresh (what was sent
    stays in the ledger). `engine`, `address`, `workers` and `merge` override the
    job file's `[job] engine` and `[ray]` settings, and are kept with the run;
    under the Ray engine, workers read keys from their own environment, never
    from `environ`."""
    environ = os.environ if environ is None else environ
    spec = with_engine(
        job if isinstance(job, Job) else load_job(job),
        engine=engine,
        address=address,
        workers=workers,
        merge=merge,
    )
    if spec.job.engine == "ray":
        from runner.distributed.driver import import_ray

        import_ray()  # before anything is registered: a missing Ray is a config error
    if state is None and spec.job.state is not None and not environ.get(STATE_VARIABLE):
        state = spec.job.state
    store = Store(state_path(state, environ))
    try:
        unfinished = store.unfinished_runs(spec.job.name) if is_pattern(spec.job.input) else []
        if run_id is None and unfinished and not restart:
            # A folder or glob job that stopped early finishes that run first; its
            # files count as processed, so discovery would never come back to it.
            run_id, files, input_hash = unfinished[0], [], ""
            log.info("continuing the unfinished run %s", run_id, extra={"event": "continue"})
        else:
            files = _new_input_files(spec, store)
            input_hash = combined_hash(files) if is_pattern(spec.job.input) else files[0][1]
            run_id = resolve_run_id(run_id or spec.job.run_id, spec, input_hash)
        with RunLock(store.path, run_id) as lock:
            info = store.run(run_id)
            if info is not None and (info.phase == "registering" or restart):
                store.delete_run(run_id)  # killed while registering, or asked to start over
                info = None
            if info is None:
                if not files:
                    return _nothing_new(store, run_id, spec)
                register(store, run_id, spec, files, strict=strict, input_hash=input_hash)
            else:
                _check_not_pruned(info)
                _check_same_input(info, spec, input_hash)
                _check_tenants_kept(store, info, spec)
                store.update_job(run_id, spec.to_json())
            return await _execute(
                store,
                run_id,
                lock,
                spec,
                environ,
                on_progress,
                handle_signals,
                settings,
                retry_failed,
            )
    finally:
        store.close()


def with_engine(
    job: Job,
    *,
    engine: EngineName | None = None,
    address: str | None = None,
    workers: int | None = None,
    merge: bool | None = None,
) -> Job:
    """The job with the given engine settings in place of its own (None keeps
    the job's), checked like the job file's."""
    given = {"address": address, "workers": workers, "merge": merge}
    overrides = {key: value for key, value in given.items() if value is not None}
    if engine not in (None, *get_args(EngineName)):
        raise ConfigError(f"engine {engine!r}: use one of {list(get_args(EngineName))}")
    try:
        ray = RaySection.model_validate({**job.ray.model_dump(), **overrides})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"Ray options: {problems}") from None
    section = job.job.model_copy(update={"engine": engine or job.job.engine})
    return job.model_copy(update={"job": section, "ray": ray})


def _check_tenants_kept(store: Store, info: RunInfo, job: Job) -> None:
    missing = sorted(store.open_tenants(info.run_id) - set(job.tenants))
    if missing:
        raise ConfigError(
            f"run {info.run_id!r} has rows to send for tenant(s) {missing}, which the job "
            "file no longer configures; add them back, or use another --run-id"
        )


def _new_input_files(job: Job, store: Store) -> list[tuple[Path, str]]:
    """(path, sha256) of the input: the job's one file, or for a folder or glob
    each settled file that no run of this job has registered yet."""
    if not is_pattern(job.job.input):
        return [(job.job.input, file_hash(job.job.input))]
    processed = store.processed_inputs(job.job.name)
    ready, busy = settled(candidates(job.job.input), job.input.settle_s)
    for path in busy:
        log.warning("skipping %s: it is still being written", path, extra={"event": "skip"})
    empty = [path for path in ready if path.stat().st_size == 0]
    for path in empty:
        log.warning("skipping %s: it is empty", path, extra={"event": "skip"})
    hashed = [(path, file_hash(path)) for path in ready if path not in empty]
    return [(path, digest) for path, digest in hashed if (str(path), digest) not in processed]


def _nothing_new(store: Store, run_id: str, job: Job) -> RunResult:
    log.info(
        "no new input files for job %r in %s; nothing to do",
        job.job.name,
        job.job.input,
        extra={"event": "nothing_new"},
    )
    return RunResult(run_id, store.path, (), (), interrupted=False, requeued=0)


async def resume_async(
    run_id: str,
    *,
    state: Path | str | None = None,
    retry_failed: bool = False,
    on_progress: ProgressCallback | None = None,
    environ: Mapping[str, str] | None = None,
    handle_signals: bool = False,
    settings: EngineSettings | None = None,
) -> RunResult:
    """Resume a run by id with the job it recorded: resend what was in flight,
    retry what was deferred (and failed, with `retry_failed`), send what is
    pending, and rewrite the outputs."""
    environ = os.environ if environ is None else environ
    store = Store(state_path(state, environ), create=False)
    try:
        with RunLock(store.path, run_id) as lock:
            info = store.require_run(run_id)
            if info.phase == "registering":
                raise StateError(
                    f"run {run_id!r} was stopped while registering its input, before anything "
                    f"was sent; submit it again: runner submit JOB.toml --run-id {run_id}"
                )
            _check_not_pruned(info)
            spec = Job.from_json(info.job_json)
            return await _execute(
                store,
                run_id,
                lock,
                spec,
                environ,
                on_progress,
                handle_signals,
                settings,
                retry_failed,
            )
    finally:
        store.close()


def _check_not_pruned(info: RunInfo) -> None:
    if info.phase == "pruned":
        raise StateError(
            f"run {info.run_id!r} was pruned: its rows are gone, its summary and ledger "
            "remain; submit with --restart, or another --run-id, to run the input again"
        )


def _check_same_input(info: RunInfo, job: Job, input_hash: str) -> None:
    if Path(info.input_path) != job.job.input:
        raise StateError(
            f"run {info.run_id!r} was registered from {info.input_path}, not {job.job.input}; "
            "use another --run-id for another input"
        )
    if input_hash and info.input_hash != input_hash and not is_pattern(job.job.input):
        raise StateError(
            f"run {info.run_id!r}: {info.input_path} changed since the run was registered; "
            "submit with --restart to register it afresh (rows already sent stay paid for), "
            "or use another --run-id"
        )


async def _execute(
    store: Store,
    run_id: str,
    lock: RunLock,
    job: Job,
    environ: Mapping[str, str],
    on_progress: ProgressCallback | None,
    handle_signals: bool,
    settings: EngineSettings | None,
    retry_failed: bool,
) -> RunResult:
    execution: Execution
    if job.job.engine == "ray":
        from runner.distributed.driver import execute_on_ray  # imports Ray only when used

        execution = await execute_on_ray(
            store,
            run_id,
            job,
            on_progress=on_progress,
            handle_signals=handle_signals,
            settings=settings,
            retry_failed=retry_failed,
        )
    else:
        from runner.distributed.driver import merge_leftover_shards  # (no Ray needed)

        # A Ray run of this id whose driver was killed may have left finished work.
        grace_s = (settings or EngineSettings()).alert_grace_s
        await merge_leftover_shards(store, run_id, job, grace_s=grace_s)
        execution = await execute(
            store,
            run_id,
            job,
            environ=environ,
            on_progress=on_progress,
            handle_signals=handle_signals,
            settings=settings,
            retry_failed=retry_failed,
            run_lock=lock,
        )
    if not execution.interrupted:
        _release_free_pages(store)
    return RunResult(
        run_id=run_id,
        state=store.path,
        tenants=tuple(store.counts(run_id)),
        outputs=execution.outputs,
        interrupted=execution.interrupted,
        requeued=execution.requeued,
        problems=tuple(store.problems(run_id)),
    )


def _release_free_pages(store: Store) -> None:
    """Give back the space of the answered requests' bodies: housekeeping, so a
    busy database (another process's VACUUM) costs a warning, not the run."""
    try:
        store.release_free_pages()
    except StateError as exc:
        log.warning(
            "space of answered requests not released yet: %s", exc, extra={"event": "vacuum"}
        )


def run_job(
    job: Path | str | Job,
    *,
    run_id: str | None = None,
    state: Path | str | None = None,
    strict: bool = False,
    retry_failed: bool = False,
    restart: bool = False,
    on_progress: ProgressCallback | None = None,
    environ: Mapping[str, str] | None = None,
    engine: EngineName | None = None,
    address: str | None = None,
    workers: int | None = None,
    merge: bool | None = None,
) -> RunResult:
    """Synchronous `run_job_async`. Called inside a running event loop it runs in
    a worker thread and blocks the caller until done; async code should await
    `run_job_async` instead."""
    return _run_sync(
        lambda: run_job_async(
            job,
            run_id=run_id,
            state=state,
            strict=strict,
            retry_failed=retry_failed,
            restart=restart,
            on_progress=on_progress,
            environ=environ,
            engine=engine,
            address=address,
            workers=workers,
            merge=merge,
        )
    )


def resume(
    run_id: str,
    *,
    state: Path | str | None = None,
    retry_failed: bool = False,
    on_progress: ProgressCallback | None = None,
    environ: Mapping[str, str] | None = None,
) -> RunResult:
    """Synchronous `resume_async` (see `run_job` for use inside an event loop)."""
    return _run_sync(
        lambda: resume_async(
            run_id,
            state=state,
            retry_failed=retry_failed,
            on_progress=on_progress,
            environ=environ,
        )
    )


def status(
    run_id: str | None = None, *, state: Path | str | None = None
) -> list[tuple[RunInfo, list[TenantCounts]]]:
    """Each run (or the one named) with its per-tenant counts, tokens and cost."""
    store = Store(state_path(state), create=False)
    try:
        runs = [store.require_run(run_id)] if run_id else store.runs()
        return [(info, store.counts(info.run_id)) for info in runs]
    finally:
        store.close()


@dataclass(frozen=True, slots=True)
class PruneResult:
    runs: tuple[str, ...]
    rows: int
    bytes_before: int
    bytes_after: int


def prune(older_than_s: float, *, state: Path | str | None = None) -> PruneResult:
    """Remove the request rows of finished runs untouched for `older_than_s`
    seconds; summaries and the ledger stay. The database is vacuumed after."""
    store = Store(state_path(state), create=False)
    try:
        before = _size(store.path)
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        runs, rows = store.prune(cutoff.isoformat(timespec="milliseconds"))
        store.vacuum()
        return PruneResult(tuple(runs), rows, before, _size(store.path))
    finally:
        store.close()


def _size(path: Path) -> int:
    """The database's bytes on disk, its write-ahead log included."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def _run_sync(start: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to the end with anyio; in a thread if a loop already runs here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return eventloop.run(start)
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(eventloop.run(start))
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)

    thread = threading.Thread(target=target, name="runner-run")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]
