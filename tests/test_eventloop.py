import asyncio
import sys

import pytest

from runner import eventloop


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop is not installed on Windows")
def test_entry_points_run_on_uvloop_where_it_is_installed() -> None:
    assert eventloop.LOOP_FACTORY is not None
    assert eventloop.run(_loop_module) == "uvloop"
    assert eventloop.run_asyncio(_loop_module()) == "uvloop"


def test_a_run_returns_what_its_coroutine_returns() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert eventloop.run(answer) == 42
    assert eventloop.run_asyncio(answer()) == 42
