"""The Ray driver: a run's tenants split over workers, and everything merged back.

Under `engine = "ray"` the run is registered as usual (the input is read and
validated once, by the driver). Then, holding the run's lock:

1. shard databases left by an earlier driver of this run (killed, interrupted)
   are merged first, so nothing they finished is sent again;
2. the rows to send are grouped by tenant (`plan`) into at most `workers`
   groups, each written as a Parquet shard under `STATE.shards/RUN/EPOCH/`;
3. each capped tenant's remaining budget is handed to its one worker;
4. one Ray task per shard runs the local engine (`worker.run_shard`); Ray
   retries a task whose worker process died, and it resumes from its shard
   database;
5. every shard database is merged into the run's (outcomes, attempts, ledger),
   spend alerts fire against the real caps, and the outputs are written
   (`dataset`).

This is the only module that imports Ray, and only when a run uses it.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import signal
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote

import anyio

from runner.alerts import Alerts
from runner.config import Job
from runner.distributed.dataset import write_dataset
from runner.distributed.plan import plan, tenant_work
from runner.distributed.shards import (
    hand_off,
    merge,
    release_hand_offs,
    shard_caps,
    write_shard,
)
from runner.distributed.worker import ShardTask, run_shard
from runner.engine import EngineSettings
from runner.errors import ConfigError, RunLocked, StateError
from runner.ledger import Entry, Kind
from runner.locks import RunLock
from runner.logs import log
from runner.runs import Execution, ProgressCallback
from runner.store import Store

INSTALL_HINT = "pip install 'runner[ray]'"
_POLL_S = 0.5
_WORKER_GONE_S = 60.0


def import_ray() -> ModuleType:
    """Ray, or a `ConfigError` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            f"engine 'ray' needs Ray, which is not installed; install it with {INSTALL_HINT} "
            "(or run with the local engine)"
        ) from None
    return ray


def shard_root(state: Path, run_id: str) -> Path:
    """`state/runner.db` -> `state/runner.db.shards/RUN/`: beside the state
    database, so a path every worker can reach when the state is shared."""
    state = state.resolve()  # workers do not share the driver's working directory
    return state.with_name(state.name + ".shards") / quote(run_id, safe="")


async def execute_on_ray(
    store: Store,
    run_id: str,
    job: Job,
    *,
    on_progress: ProgressCallback | None = None,
    handle_signals: bool = False,
    settings: EngineSettings | None = None,
    retry_failed: bool = False,
) -> Execution:
    """Run the run's pending rows on Ray workers (see the module docstring)."""
    del on_progress  # per-tenant progress lives in the shard databases until the merge
    ray = import_ray()
    grace_s = (settings or EngineSettings()).alert_grace_s
    await merge_leftover_shards(store, run_id, job, grace_s=grace_s)
    requeued = store.requeue(run_id, retry_failed=retry_failed)
    store.set_phase(run_id, "running")
    work = tenant_work(store, run_id)
    groups = plan(work, job.tenants, job.ray.workers)
    busy = [index for index, group in enumerate(groups) if any(work[t].rows for t in group)]
    started_ray = bool(busy) and _connect(ray, job.ray.address)  # before any budget moves
    try:
        caps = hand_off(store, run_id, job, [tenant for i in busy for tenant in groups[i]])
        epoch = shard_root(store.path, run_id) / uuid.uuid4().hex[:12]
        info = store.require_run(run_id)
        tasks = []
        for index in busy:
            shard = epoch / f"shard-{index}.parquet"
            write_shard(store, run_id, groups[index], shard)
            job_json = shard_caps(job, caps).to_json()
            db = shard.with_suffix(".db")
            # The caller's settings as given: None lets each worker pick the
            # engine's defaults for the input (raw bodies for OpenAI batch files).
            tasks.append(ShardTask(run_id, index, job_json, info.input_format, shard, db, settings))
        log.info(
            "run %s: %d tenant(s) in %d shard(s) on Ray",
            run_id,
            len(work),
            len(tasks),
            extra={"event": "shards", "run_id": run_id},
        )
        finished = await _run_tasks(ray, tasks, job, handle_signals=handle_signals)
    finally:
        # Whatever happened (a shard file that could not be written too), what the
        # workers finished comes in and no budget stays handed off.
        await merge_leftover_shards(store, run_id, job, grace_s=grace_s)
        if started_ray:
            ray.shutdown()
    if not finished:
        store.set_phase(run_id, "interrupted")
        return Execution(interrupted=True, requeued=requeued)
    outputs = write_dataset(store, run_id, groups, keep_merged=job.ray.merge)
    return Execution(interrupted=False, requeued=requeued, outputs=outputs)


async def _run_tasks(
    ray: ModuleType, tasks: Sequence[ShardTask], job: Job, *, handle_signals: bool
) -> bool:
    """One Ray task per shard, until each has ended; False when any did not
    finish (stopped by a signal, or its worker died more often than Ray retries)."""
    if not tasks:
        return True
    remote = ray.remote(run_shard).options(max_retries=job.ray.max_retries, retry_exceptions=False)
    pending: dict[Any, ShardTask] = {remote.remote(task): task for task in tasks}
    finished = True
    async with anyio.create_task_group() as group:
        if handle_signals:
            group.start_soon(_cancel_on_signals, ray, pending)
        while pending:
            wait = functools.partial(ray.wait, list(pending), num_returns=1, timeout=_POLL_S)
            ready, _ = await anyio.to_thread.run_sync(wait)
            for ref in ready:
                task = pending.pop(ref)
                finished &= _outcome(ray, ref, task)
        group.cancel_scope.cancel()
    return finished


def _connect(ray: ModuleType, address: str | None) -> bool:
    """Join the cluster at `address` (None: `$RAY_ADDRESS`, else a new local
    instance); True if this call started Ray. A process already connected (a
    notebook, a test session) keeps its connection."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"address": address, "configure_logging": False}
    if address is None:
        options["include_dashboard"] = False
    try:
        ray.init(**options)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"cannot join the Ray cluster at {address or 'default'}: {exc}") from None
    return True


def _outcome(ray: ModuleType, ref: Any, task: ShardTask) -> bool:
    """True if the shard's task ran to the end; a failure is logged (its rows
    stay resumable)."""
    try:
        execution: Execution = ray.get(ref)
    except ray.exceptions.TaskCancelledError:
        return False  # stopped on a signal, which was logged
    except (ray.exceptions.RayError, StateError) as exc:
        log.error(
            "shard %d of run %s did not finish: %s; its progress is kept, resume the run",
            task.index,
            task.run_id,
            str(exc).strip().splitlines()[-1],  # the error itself, after its traceback
            extra={"event": "error", "run_id": task.run_id},
        )
        return False
    return not execution.interrupted


async def _cancel_on_signals(ray: ModuleType, pending: dict[Any, ShardTask]) -> None:
    """SIGINT/SIGTERM: stop every shard (its requests in flight are re-sent on
    resume); a second signal stops them forcibly."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        force = False
        async for _ in signals:
            log.warning(
                "stopping the Ray workers; the run resumes where they stopped",
                extra={"event": "stopping"},
            )
            for ref in list(pending):
                ray.cancel(ref, force=force)
            force = True


async def merge_leftover_shards(store: Store, run_id: str, job: Job, *, grace_s: float) -> None:
    """Merge every shard database a Ray run of `run_id` left (finished, stopped or
    with its driver killed) into the run, release what is still handed off, fire
    the alerts the merged spend crossed, then remove the shards. Needs no Ray:
    any engine that continues the run calls it first."""
    root = shard_root(store.path, run_id)
    if not root.exists():
        return
    touched = _merge_shards(store, run_id, root)
    release_hand_offs(store, run_id)
    await _alert(store, job, touched, grace_s)
    shutil.rmtree(root, ignore_errors=True)


def _merge_shards(store: Store, run_id: str, root: Path) -> set[tuple[str, str]]:
    """Each shard database of each driver epoch, tagged by epoch and shard."""
    touched: set[tuple[str, str]] = set()
    for epoch in sorted(path for path in root.glob("*") if path.is_dir()):
        for db in sorted(epoch.glob("shard-*.db")):
            with _shard_lock(db, run_id):
                touched |= merge(store, run_id, db, f"ray:{epoch.name}:{db.stem}#")
    return touched


@contextlib.contextmanager
def _shard_lock(db: Path, run_id: str) -> Iterator[None]:
    """The lock its worker holds on a shard: a worker of a driver that was killed
    may run on for a moment (Ray stops a dead driver's tasks within seconds), and
    its shard is merged only once it has stopped."""
    deadline = time.monotonic() + _WORKER_GONE_S
    while True:
        try:
            lock = RunLock(db, run_id).__enter__()
        except RunLocked:
            if time.monotonic() > deadline:
                raise
            time.sleep(_POLL_S)
            continue
        try:
            yield
        finally:
            lock.__exit__(None, None, None)
        return


async def _alert(store: Store, job: Job, touched: set[tuple[str, str]], grace_s: float) -> None:
    """Spend alerts for the merged spend, against each tenant's real cap."""
    if not touched:
        return
    alerts = Alerts(store, job)
    async with anyio.create_task_group() as group:
        group.start_soon(alerts.deliver)
        alerts.check([Entry(tenant, period, Kind.CHARGE, 0) for tenant, period in touched])
        alerts.close()
        with anyio.move_on_after(grace_s):
            await alerts.delivered()
        group.cancel_scope.cancel()
