"""Advisory locks beside the state database: one process per run, held while a
run registers or runs, and one process at a time upgrading the database's schema.

A lock is `flock` on a small file in `.STATE.locks/`; the kernel drops it when
the holder exits, however it exits (SIGKILL included), so a lock is never left
stale and never needs taking over by hand. A run's file holds the holder's pid
and host, for the message a second process shows.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from runner.errors import RunLocked

_SCHEMA_LOCK = "schema.lock"


def locks_folder(state: Path) -> Path:
    return state.parent / f".{state.name}.locks"


@contextmanager
def schema_lock(state: Path) -> Iterator[None]:
    """Wait for, then hold, the lock on upgrading `state`'s schema: two processes
    that open a database of an older release at once migrate it one after the
    other, the second finding nothing left to do."""
    folder = locks_folder(state)
    folder.mkdir(parents=True, exist_ok=True)
    handle = os.open(folder / _SCHEMA_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # closing the descriptor releases the flock


def runs_held_elsewhere(state: Path) -> list[str]:
    """Who ("pid N on HOST") holds a run lock on `state`, other than this process:
    a schema upgrade must not move rows from under a run of an older runner."""
    holders = []
    for path in sorted(locks_folder(state).glob("*.lock")):
        if path.name == _SCHEMA_LOCK:
            continue
        handle = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            if holder != _this_process():
                holders.append(holder)
        finally:
            os.close(handle)  # (releases the probe's lock, if it got one)
    return holders


def _this_process() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


def _holder(handle: int) -> str:
    return os.pread(handle, 200, 0).decode("utf-8", "replace").strip() or "unknown"


class RunLock:
    """`with RunLock(state_path, run_id):` or raise `RunLocked`."""

    __slots__ = ("_handle", "path", "run_id")

    def __init__(self, state: Path, run_id: str) -> None:
        digest = hashlib.sha256(run_id.encode()).hexdigest()[:24]
        self.path = locks_folder(state) / f"{digest}.lock"
        self.run_id = run_id
        self._handle: int | None = None

    def __repr__(self) -> str:
        return f"RunLock({self.run_id!r}, held={self._handle is not None})"

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            os.close(handle)
            raise RunLocked(
                f"run {self.run_id!r} is already running ({holder}); wait for it to finish, "
                "or stop that process (a killed one releases the run at once, or once the lane "
                "processes it started have stopped, within seconds)"
            ) from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, _this_process().encode(), 0)
        self._handle = handle
        return self

    def fileno(self) -> int:
        """The locked descriptor: a child process that inherits it holds the run
        with this process, so the run stays locked until every holder has exited."""
        if self._handle is None:
            raise RuntimeError(f"run lock {self.run_id!r} is not held")
        return self._handle

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            os.close(self._handle)  # closing the descriptor releases the flock
            self._handle = None
