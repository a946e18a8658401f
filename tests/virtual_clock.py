"""An asyncio event loop whose clock is virtual: idle time passes instantly.

`VirtualClockLoop.time()` returns a number that only moves when the loop would
otherwise block waiting for a timer: then it jumps straight to that timer. Code that
measures time with `loop.time()` (asyncio, anyio's `current_time()`, aiolimiter) sees
exactly the delays it asked for, so a test can cover minutes of rate limiting in
milliseconds and assert exact admission times. Real I/O still works: the loop polls
its real selector (without blocking) before jumping, and blocks for real only when no
timer is scheduled at all (e.g. waiting on a thread through the self-pipe).

Use it with anyio through the `loop_factory` backend option::

    anyio.run(main, backend="asyncio", backend_options={"loop_factory": VirtualClockLoop})

or as `anyio_backend = ("asyncio", {"loop_factory": VirtualClockLoop})` in pytest.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio

T = TypeVar("T")


class _JumpingSelector(selectors.BaseSelector):
    """A real selector that turns a would-block wait for a timer into a clock jump."""

    def __init__(self, loop: VirtualClockLoop) -> None:
        self._loop = loop
        self._real = selectors.DefaultSelector()

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:  # nothing scheduled: only real I/O can wake us
            return self._real.select(None)
        events = self._real.select(0)
        if not events and timeout > 0:
            # asyncio passes the delay until its earliest timer; pass it instantly.
            self._loop.advance(timeout)
        return events

    def close(self) -> None:
        self._real.close()

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.get_key(fileobj)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._real.get_map()


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """A selector event loop on a virtual clock starting at `start` seconds."""

    def __init__(self, start: float = 0.0) -> None:
        self._virtual_now = start
        super().__init__(selector=_JumpingSelector(self))

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        """Move the clock forward (never back)."""
        self._virtual_now += max(0.0, seconds)


def run_virtual(fn: Callable[[], Awaitable[T]], *, start: float = 0.0) -> T:
    """Run `fn()` under anyio on a fresh `VirtualClockLoop`; return its result."""

    async def main() -> T:
        return await fn()

    return anyio.run(
        main, backend="asyncio", backend_options={"loop_factory": lambda: VirtualClockLoop(start)}
    )
