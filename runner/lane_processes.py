"""A run's tenants over several local processes (`[job] processes`).

One Python process sends a few thousand requests a second at most: what bounds
a busy run on a small machine is the CPU each request costs the client (HTTP,
the state, the limiter), and one process uses one core. Tenants share nothing
(each has its own limiter, key and budget), so the run splits them, whole, over
child processes that each run the ordinary engine on their group against the
same state database (SQLite in WAL mode: each checkpoint is one short
transaction, and a writer waits for another's). The parent registers the input
before and writes the outputs after; while the children send, it shows their
progress and relays stops.

A child is this module's `main()` in a new Python process:

- its stdin: one JSON line saying what to run (no key: keys travel in its
  environment, as in the parent's), then `stop` (graceful) or `abort` lines;
  the end of the file means the parent is gone, and the child aborts;
- its stdout: a JSON line of its lanes' progress every `progress_interval_s`,
  and a last one saying whether it stopped early;
- its stderr is the parent's, so its log lines appear among the parent's;
- it inherits the run lock's descriptor: the run stays locked until the parent
  and every child have exited, so no resume can start beside an orphan;
- it runs in a session of its own, so a signal to the parent's process group
  (a Ctrl-C, `timeout`, a scheduler's kill) reaches the parent alone, which
  relays it; a SIGTERM sent to the child itself stops it as a single-process
  run stops; a child that has not gone `ABORT_KILL_S` after an abort is killed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import anyio
from anyio.abc import ByteReceiveStream, Process
from anyio.streams.buffered import BufferedByteReceiveStream

from runner import eventloop, gc_settings, logs
from runner.config import Job
from runner.control import stop_on_signals
from runner.distributed.plan import plan, tenant_work
from runner.engine import Engine, EngineSettings, LaneProgress
from runner.errors import StateError
from runner.logs import log
from runner.provider import ProviderClient
from runner.records import Status
from runner.secrets import resolve_keys
from runner.store import Store

# "auto" splits a run only when it has this many rows to send: a child costs
# about half a second to start and 65-75 MB of memory.
AUTO_MIN_ROWS = 10_000
AUTO_MAX_PROCESSES = 4
ABORT_KILL_S = 5.0
_MAX_LINE = 64 * 1024 * 1024


def process_count(setting: int | Literal["auto"], *, rows: int, tenants: int) -> int:
    """How many processes to run `tenants` tenants with `rows` rows to send in:
    never more than the tenants; "auto" is one per core (at most
    `AUTO_MAX_PROCESSES`) from `AUTO_MIN_ROWS` rows on, else one."""
    if setting != "auto":
        wanted = setting
    else:
        wanted = min(_cores(), AUTO_MAX_PROCESSES) if rows >= AUTO_MIN_ROWS else 1
    return max(1, min(wanted, tenants))


def tenant_groups(store: Store, run_id: str, job: Job) -> list[list[str]]:
    """The run's tenants with rows to send, in `process_count` groups balanced
    by the time their limits need for their rows (`runner.distributed.plan`).
    One process needs no count of the rows, which reads every row of the run."""
    if job.job.processes == 1:
        return [list(store.lane_tenants(run_id))]
    work = {tenant: rows for tenant, rows in tenant_work(store, run_id).items() if rows.rows}
    total = sum(rows.rows for rows in work.values())
    count = process_count(job.job.processes, rows=total, tenants=len(work))
    return plan(work, job.tenants, count) if count > 1 else [sorted(work)]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


class LaneProcesses:
    """The `Lanes` of a run, as one child process per group of tenants."""

    __slots__ = ("_children", "_stopping", "run_id")

    def __init__(
        self,
        state: Path,
        run_id: str,
        job: Job,
        groups: Sequence[Collection[str]],
        *,
        base_url: str,
        settings: EngineSettings,
        environ: Mapping[str, str],
        lock_fd: int | None,
        progress_interval_s: float,
    ) -> None:
        """`base_url` replaces the job's (the bundled simulator's address);
        `lock_fd` is the run lock's descriptor, for the children to hold too."""
        self.run_id = run_id
        self._stopping = False
        order = {
            "state": str(state.resolve()),
            "run_id": run_id,
            "job": job.to_json(),
            "base_url": base_url,
            "settings": dataclasses.asdict(settings),
            "log_format": logs.current_format(),
            "progress_interval_s": progress_interval_s,
        }
        self._children = [
            _Child(
                {**order, "tenants": sorted(group)},
                _environment(job, group, environ),
                () if lock_fd is None else (lock_fd,),
            )
            for group in groups
        ]

    def __repr__(self) -> str:
        return f"LaneProcesses(run={self.run_id!r}, children={len(self._children)})"

    @property
    def stopping(self) -> bool:
        return self._stopping or any(child.stopped or child.killed for child in self._children)

    async def run(self) -> None:
        """Run every child to its end; a child that failed is a `StateError`
        once all have ended (what each finished is committed)."""
        async with anyio.create_task_group() as group:
            for child in self._children:
                group.start_soon(child.run)
        failed = [c for c in self._children if c.returncode != 0 and not c.killed]
        if failed:
            which = "; ".join(
                f"tenants {', '.join(child.tenants)} exited with {child.returncode}"
                for child in failed
            )
            raise StateError(
                f"run {self.run_id!r}: a lane process failed ({which}; its error is logged "
                f"above); what was finished is saved: fix the cause, then run "
                f"`runner resume {self.run_id}`"
            )

    def stop(self) -> None:
        self._stopping = True
        for child in self._children:
            child.command("stop")

    def abort(self) -> None:
        self._stopping = True
        for child in self._children:
            child.command("abort")

    def progress(self) -> list[LaneProgress]:
        return [lane for child in self._children for lane in child.lanes]


def _environment(job: Job, tenants: Collection[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The parent's environment, with the tenants' key variables as `environ`
    has them (a caller of the API may pass keys that are not in os.environ)."""
    env = dict(os.environ)
    for tenant in tenants:
        variable = job.key_env(tenant)
        if variable in environ:
            env[variable] = environ[variable]
        else:
            env.pop(variable, None)
    return env


class _Child:
    """One child process: what it was told, what it last reported."""

    __slots__ = (
        "_commands",
        "_env",
        "_order",
        "_pass_fds",
        "_queued",
        "killed",
        "lanes",
        "returncode",
        "stopped",
        "tenants",
    )

    def __init__(self, order: dict[str, Any], env: dict[str, str], pass_fds: Sequence[int]):
        self._order = order
        self._env = env
        self._pass_fds = pass_fds
        self._commands, self._queued = anyio.create_memory_object_stream[str](math.inf)
        self.tenants: list[str] = order["tenants"]
        self.lanes: list[LaneProgress] = []
        self.returncode: int | None = None
        self.stopped = False
        self.killed = False  # after an abort it ignored: stopped, not failed

    def command(self, word: str) -> None:
        self._commands.send_nowait(word)

    async def run(self) -> None:
        command = [sys.executable, "-c", "from runner.lane_processes import main; main()"]
        async with await anyio.open_process(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            env=self._env,
            pass_fds=self._pass_fds,
            start_new_session=True,  # signals to our process group are relayed, not doubled
        ) as process:
            assert process.stdout is not None
            async with anyio.create_task_group() as group:
                group.start_soon(self._forward, process)
                await self._read_reports(process.stdout)
                self.returncode = await process.wait()
                group.cancel_scope.cancel()

    async def _forward(self, process: Process) -> None:
        """The order, then each command as it comes, until the child has gone; a
        child still there `ABORT_KILL_S` after an abort (stopped, hung) is killed."""
        assert process.stdin is not None
        try:
            await process.stdin.send(json.dumps(self._order).encode() + b"\n")
            async for word in self._queued:
                await process.stdin.send(word.encode() + b"\n")
                if word == "abort":
                    break
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return
        await anyio.sleep(ABORT_KILL_S)
        self.killed = True
        log.warning(
            "a lane process (tenants %s) did not stop within %.0fs of the abort; killed",
            ", ".join(self.tenants),
            ABORT_KILL_S,
            extra={"event": "stopping"},
        )
        process.kill()

    async def _read_reports(self, stdout: ByteReceiveStream) -> None:
        lines = BufferedByteReceiveStream(stdout)
        while True:
            try:
                line = await lines.receive_until(b"\n", _MAX_LINE)
            except (anyio.EndOfStream, anyio.IncompleteRead):
                return
            report = json.loads(line)
            self.lanes = [_lane(entry) for entry in report["lanes"]]
            self.stopped = self.stopped or report.get("stopping", False)


def _lane(entry: dict[str, Any]) -> LaneProgress:
    """A `LaneProgress` back from its JSON form (`_report`)."""
    finished = {Status(status): count for status, count in entry["finished"].items()}
    return LaneProgress(**{**entry, "finished": finished})


# -- the child ---------------------------------------------------------------------


def main() -> None:
    gc_settings.tune_for_throughput()
    eventloop.run(_serve)


async def _serve() -> None:
    """Run the ordered tenants' lanes to their end, reporting on stdout."""
    commands = _Lines(sys.stdin.fileno())
    # The reports get stdout to themselves: whatever else prints there goes to stderr.
    reports = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    first = await commands.next()
    if first is None:
        return  # the parent went before saying what to run
    order = json.loads(first)
    logs.configure(order["log_format"])
    job = Job.from_json(order["job"])
    tenants: list[str] = order["tenants"]
    store = Store(Path(order["state"]), create=False)
    client = ProviderClient(
        order["base_url"],
        timeout_s=job.provider.timeout_s,
        pool_size=sum(job.tenants[tenant].max_parallel for tenant in tenants),
    )
    try:
        settings = EngineSettings(**order["settings"])
        engine = Engine(
            store,
            order["run_id"],
            job,
            keys=resolve_keys(job, tenants, os.environ),
            client=client,
            prices=job.price_table(),
            settings=settings,
            tenants=tenants,
        )
        async with anyio.create_task_group() as group:
            group.start_soon(stop_on_signals, engine, settings.grace_s)
            group.start_soon(_obey, engine, commands)
            group.start_soon(_report_every, engine, reports, order["progress_interval_s"])
            await engine.run()
            group.cancel_scope.cancel()
        _report(engine, reports, final=True)
    finally:
        await client.aclose()
        store.close()


async def _obey(engine: Engine, commands: _Lines) -> None:
    while (word := await commands.next()) is not None:
        if word == "stop":
            engine.stop()
        else:
            engine.abort()
    engine.abort()  # the parent is gone: nobody would write the outputs or see progress


async def _report_every(engine: Engine, reports: int, interval_s: float) -> None:
    while True:
        _report(engine, reports)
        await anyio.sleep(interval_s)


def _report(engine: Engine, reports: int, *, final: bool = False) -> None:
    """One JSON line of the lanes' progress on the `reports` descriptor."""
    report: dict[str, Any] = {"lanes": [dataclasses.asdict(lane) for lane in engine.progress()]}
    if final:
        report["stopping"] = engine.stopping
    line = json.dumps(report).encode() + b"\n"
    try:
        while line:
            line = line[os.write(reports, line) :]
    except BrokenPipeError:
        engine.abort()  # the parent is gone


class _Lines:
    """Lines from a pipe, read without blocking the event loop."""

    __slots__ = ("_buffer", "_fd", "_lines")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = b""
        self._lines: list[str] = []
        os.set_blocking(fd, False)

    async def next(self) -> str | None:
        """The next line, or None at the end of the file."""
        while not self._lines:
            await anyio.wait_readable(self._fd)
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                return None
            *complete, self._buffer = (self._buffer + chunk).split(b"\n")
            self._lines.extend(line.decode() for line in complete)
        return self._lines.pop(0)
