"""One Ray task: the ordinary local engine on one shard, in its own shard database.

The task is a plain function (the driver wraps it with `ray.remote`), so it
imports no Ray. A retried task (its worker process died) finds its shard
database, skips loading, and resumes: rows left `sent` are re-sent and counted
as re-sends, `done` rows are never sent again. Keys come from the worker's own
environment, as for a local run; the task carries none.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from runner import eventloop
from runner.config import Job
from runner.distributed.shards import load_shard
from runner.engine import EngineSettings
from runner.locks import RunLock
from runner.runs import Execution, execute
from runner.store import Store


@dataclass(frozen=True, slots=True)
class ShardTask:
    """What a worker needs: the run, its shard's rows and where to checkpoint."""

    run_id: str
    index: int
    job_json: str  # the shard's job: caps set to the budgets handed over
    input_format: str
    shard: Path  # Parquet rows (see `shards.SHARD_SCHEMA`)
    db: Path  # the shard database, beside the shard
    settings: EngineSettings | None = None

    @property
    def pid_file(self) -> Path:
        """Where the worker writes its process id (for operators, and tests that kill it)."""
        return self.db.with_suffix(".pid")


def run_shard(task: ShardTask) -> Execution:
    """Load the shard (once) and run it to the end; the outputs are left to the
    driver, which writes them after merging every shard."""
    task.pid_file.write_text(f"{os.getpid()}\n", encoding="utf-8")
    job = Job.from_json(task.job_json)
    store = Store(task.db)
    try:
        with RunLock(store.path, task.run_id):
            info = store.run(task.run_id)
            if info is not None and info.phase == "registering":
                store.delete_run(task.run_id)  # killed while loading: load again
                info = None
            if info is None:
                load_shard(store, task.run_id, job, task.shard, task.input_format)
            run = functools.partial(
                execute,
                store,
                task.run_id,
                job,
                environ=os.environ,
                settings=task.settings,
                write=False,
            )
            return eventloop.run(run)
    finally:
        store.close()
