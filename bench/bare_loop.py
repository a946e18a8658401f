"""The yardstick for the overhead scenario: the same requests as the runner sends,
through the same connection pool, with nothing else: no limiter, no store,
nothing written. It is the fastest a Python aiohttp client can drain the input.

    python bench/bare_loop.py BASE_URL INPUT.jsonl CONCURRENCY MAX_TOKENS LOOP

LOOP is `uvloop` (the loop the runner runs on) or `asyncio` (the standard one,
which a script that calls `asyncio.run` gets).

Prints one JSON line: {"requests": N, "ok": N, "seconds": S} (S from the first
request to the last answer).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp
from common import MODEL, key

from runner.eventloop import run_asyncio


def bodies(source: Path, max_tokens: int) -> list[tuple[str, bytes]]:
    """(tenant, request body) for each input row, as the runner builds them."""
    requests = []
    for line in source.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        messages = [{"role": "user", "content": row["prompt"]}]
        body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens}
        requests.append((row["tenant"], json.dumps(body).encode()))
    return requests


async def drain(base_url: str, requests: list[tuple[str, bytes]], concurrency: int) -> None:
    url = base_url.rstrip("/") + "/chat/completions"
    pending = iter(requests)
    ok = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal ok
        for tenant, body in pending:
            headers = {"Authorization": f"Bearer {key(tenant)}", "X-Tenant-ID": tenant}
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                ok += response.status == 200

    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=30)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        started = time.monotonic()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        seconds = time.monotonic() - started
    print(json.dumps({"requests": len(requests), "ok": ok, "seconds": seconds}))


if __name__ == "__main__":
    base_url, source, concurrency, max_tokens, loop = sys.argv[1:6]
    main = drain(base_url, bodies(Path(source), int(max_tokens)), int(concurrency))
    if loop == "uvloop":
        run_asyncio(main)
    else:
        asyncio.run(main)
