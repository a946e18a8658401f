"""What a run's caller drives, in one process or several: `Lanes`, and the
signal handling that stops it (first signal: gracefully; second: at once)."""

from __future__ import annotations

import signal
from typing import Protocol

import anyio

from runner.engine import LaneProgress
from runner.logs import log


class Lanes(Protocol):
    """An `Engine`, or `LaneProcesses` running engines in child processes."""

    @property
    def run_id(self) -> str: ...

    @property
    def stopping(self) -> bool: ...

    async def run(self) -> None: ...

    def stop(self) -> None: ...

    def abort(self) -> None: ...

    def progress(self) -> list[LaneProgress]: ...


async def stop_on_signals(lanes: Lanes, grace_s: float) -> None:
    """Stop `lanes` gracefully at the first SIGINT or SIGTERM, at once at the second."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
        async for _ in received:
            fields = {"event": "stopping", "run_id": lanes.run_id}
            if lanes.stopping:
                log.warning(
                    "stopping now; requests in flight will be sent again on resume", extra=fields
                )
                lanes.abort()
            else:
                in_flight = sum(lane.in_flight for lane in lanes.progress())
                log.warning(
                    "stopping: no new requests; waiting up to %.0fs for %d in flight "
                    "(interrupt again to stop at once)",
                    grace_s,
                    in_flight,
                    extra=fields,
                )
                lanes.stop()
