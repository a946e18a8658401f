"""The life of one run: register its input, execute it, write its outputs.

Registration streams the input through validation into the store before
anything is sent, so the set of rows is fixed and a resume never re-reads the
input. A submit refused half-way (bad input, unpriced model, Ctrl-C) leaves no
run behind. Execution wires the engine to the provider (or the bundled
simulator), the progress display and, in the main thread, SIGINT/SIGTERM: the
first signal stops gracefully, the second at once. A run with many rows over
several tenants runs its engines in child processes (`lane_processes.py`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import anyio

from runner import carried_columns, sources
from runner.config import BUILTIN_SIMULATOR, Job
from runner.control import Lanes, stop_on_signals
from runner.engine import Engine, EngineSettings
from runner.errors import InputError, sole_error
from runner.lane_processes import LaneProcesses, tenant_groups
from runner.locks import RunLock
from runner.logs import log
from runner.progress import TenantProgress
from runner.provider import ProviderClient
from runner.records import Rejection, Request, Status
from runner.secrets import resolve_keys
from runner.simulator import SimulatorConfig, running_simulator
from runner.sinks import write_batch_jsonl, write_parquet
from runner.store import Store
from runner.validate import check_input, input_format

ProgressCallback = Callable[[Sequence[TenantProgress]], None]
_STRICT_SHOWN = 20
# The in-process simulator answers after a short delay, so a demo looks like a
# real provider at work without taking long.
DEMO_SIMULATOR = SimulatorConfig(latency_s=0.05, latency_jitter_s=0.1)


def register(
    store: Store,
    run_id: str,
    job: Job,
    files: Sequence[tuple[Path, str]],
    *,
    input_hash: str,
    strict: bool = False,
) -> int:
    """Read, validate and register every row of the input files, given as
    (path, sha256); returns the row count."""
    source = job.job.input
    paths = [path for path, _ in files]
    store.create_run(
        run_id,
        job_name=job.job.name,
        job_json=job.to_json(),
        input_path=str(source),
        input_format=input_format(job, paths),
        input_hash=input_hash,
        output_path=str(job.job.output),
        files=files,
    )
    try:
        rows = 0
        for batch, checked in check_input(job, job.price_table(), paths):
            requests = [item for item in checked if isinstance(item, Request)]
            rejections = [item for item in checked if isinstance(item, Rejection)]
            carried = carried_columns.encode(batch.carried)
            store.register(run_id, requests, rejections, carried, batch.rows[0].seq)
            rows += len(batch.rows)
        store.reject_duplicate_ids(run_id)
        if strict:
            _refuse_rejections(store, run_id, source)
        store.set_phase(run_id, "ready", rows=rows)
    except BaseException:
        store.delete_run(run_id)
        raise
    finally:
        sources.release_memory()
    return rows


def _refuse_rejections(store: Store, run_id: str, source: Path) -> None:
    problems = store.rejections(run_id, limit=_STRICT_SHOWN + 1)
    if problems:
        shown = "\n".join(f"  {where}: {error}" for where, error in problems[:_STRICT_SHOWN])
        more = "\n  ..." if len(problems) > _STRICT_SHOWN else ""
        raise InputError(f"{source}: --strict refuses the file; rejected rows:\n{shown}{more}")


@dataclass(frozen=True, slots=True)
class Execution:
    interrupted: bool
    requeued: int
    outputs: tuple[Path, ...] = ()


async def execute(
    store: Store,
    run_id: str,
    job: Job,
    *,
    environ: Mapping[str, str],
    on_progress: ProgressCallback | None = None,
    handle_signals: bool = False,
    settings: EngineSettings | None = None,
    progress_interval_s: float = 0.5,
    retry_failed: bool = False,
    write: bool = True,
    run_lock: RunLock | None = None,
) -> Execution:
    """Send the run's pending rows, in this process or, when the job's
    `processes` say so, in child processes that hold `run_lock` with this one;
    on a clean end, write its outputs (unless `write` is False: a Ray shard's
    rows are written by the driver, after the merge)."""
    info = store.require_run(run_id)
    requeued = store.requeue(run_id, retry_failed=retry_failed)
    store.set_phase(run_id, "running")
    baseline = store.status_counts(run_id)
    settings = settings or EngineSettings(keep_raw_body=info.input_format == "openai_batch")
    groups = tenant_groups(store, run_id, job)
    async with AsyncExitStack() as stack:
        base_url = job.provider.base_url
        if base_url == BUILTIN_SIMULATOR:
            base_url = (await stack.enter_async_context(running_simulator(DEMO_SIMULATOR))).base_url
        lanes: Lanes
        if len(groups) > 1:
            log.info(
                "run %s: %d tenant(s) in %d processes",
                run_id,
                sum(map(len, groups)),
                len(groups),
                extra={"event": "processes", "run_id": run_id},
            )
            lanes = LaneProcesses(
                store.path,
                run_id,
                job,
                groups,
                base_url=base_url,
                settings=settings,
                environ=environ,
                lock_fd=None if run_lock is None else run_lock.fileno(),
                progress_interval_s=progress_interval_s,
            )
        else:
            client = ProviderClient(
                base_url,
                timeout_s=job.provider.timeout_s,
                pool_size=sum(tenant.max_parallel for tenant in job.tenants.values()),
            )
            stack.push_async_callback(client.aclose)
            lanes = Engine(
                store,
                run_id,
                job,
                keys=resolve_keys(job, store.lane_tenants(run_id), environ),
                client=client,
                prices=job.price_table(),
                settings=settings,
            )
        try:
            async with anyio.create_task_group() as group:
                if handle_signals:
                    group.start_soon(stop_on_signals, lanes, settings.grace_s)
                if on_progress is not None:
                    group.start_soon(_report, lanes, baseline, on_progress, progress_interval_s)
                await lanes.run()
                group.cancel_scope.cancel()
        except BaseExceptionGroup as failure:
            raise sole_error(failure) from None
        if on_progress is not None:
            on_progress(_snapshot(lanes, baseline))
    outputs: list[Path] = []
    if lanes.stopping:
        store.set_phase(run_id, "interrupted")
    elif write:
        outputs = write_outputs(store, run_id)
    else:
        store.set_phase(run_id, "finished")
    return Execution(interrupted=lanes.stopping, requeued=requeued, outputs=tuple(outputs))


def write_outputs(store: Store, run_id: str) -> list[Path]:
    """The run's Parquet (and OpenAI-batch JSONL) files, rewritten from the store."""
    info = store.require_run(run_id)
    output = Path(info.output_path)
    write_parquet(store, run_id, output)
    paths = [output]
    if info.input_format == "openai_batch":
        results, errors = batch_output_paths(output)
        write_batch_jsonl(store, run_id, results, errors)
        paths += [results, errors]
    store.set_phase(run_id, "finished")
    return paths


def batch_output_paths(output: Path) -> tuple[Path, Path]:
    """`out/x.parquet` -> `out/x.output.jsonl`, `out/x.errors.jsonl`."""
    return output.with_suffix(".output.jsonl"), output.with_suffix(".errors.jsonl")


async def _report(
    lanes: Lanes,
    baseline: Mapping[str, Mapping[str, int]],
    on_progress: ProgressCallback,
    interval_s: float,
) -> None:
    while True:
        on_progress(_snapshot(lanes, baseline))
        await anyio.sleep(interval_s)


def _snapshot(lanes: Lanes, baseline: Mapping[str, Mapping[str, int]]) -> list[TenantProgress]:
    """Counts from before the run plus what each lane finished since."""
    by_tenant = {lane.tenant: lane for lane in lanes.progress()}
    snapshot = []
    for tenant, by_status in baseline.items():
        lane = by_tenant.get(tenant)
        merged = Counter(by_status)
        for status, count in (lane.finished if lane else {}).items():
            merged[status.value] += count
        snapshot.append(
            TenantProgress(
                run_id=lanes.run_id,
                tenant=tenant,
                total=sum(by_status.values()),
                done=merged[Status.DONE.value],
                failed=merged[Status.FAILED.value],
                rejected=merged[Status.REJECTED.value],
                deferred=merged[Status.DEFERRED.value],
                in_flight=lane.in_flight if lane else 0,
                waiting=lane.waiting if lane else 0,
                paused_for_s=lane.paused_for_s if lane else 0.0,
            )
        )
    return snapshot
