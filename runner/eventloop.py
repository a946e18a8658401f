"""The event loop every entry point runs on: asyncio, on uvloop where it is
installed (a dependency on Linux and macOS), else the standard loop.

uvloop's libuv core costs the HTTP exchange about a third less CPU than the
standard loop: with 1,000 requests in flight, what bounds a run on a small
machine is CPU per request, so it is the first thing a busy run needs. Nothing
in the runner depends on which loop it gets; the test suite runs in-process
tests on the standard loop and CLI subprocess tests on uvloop, so both are
exercised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio

T = TypeVar("T")

try:
    import uvloop
except ImportError:  # Windows, or an install without it
    LOOP_FACTORY: Callable[[], asyncio.AbstractEventLoop] | None = None
else:
    LOOP_FACTORY = uvloop.new_event_loop


def run(func: Callable[[], Awaitable[T]]) -> T:
    """`anyio.run(func)` on the asyncio backend, on uvloop if installed."""
    return anyio.run(func, backend="asyncio", backend_options={"loop_factory": LOOP_FACTORY})


def run_asyncio(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, on uvloop if installed (for the simulator, which is
    plain asyncio because aiohttp's server is)."""
    with asyncio.Runner(loop_factory=LOOP_FACTORY) as runner:
        return runner.run(main)
