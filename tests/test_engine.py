"""Whole runs in-process against the real simulator over loopback HTTP.

Each test submits a job through `run_job_async`, then checks the outcome rows in
the state database, the output Parquet, and what the simulator saw.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from aiohttp import web

from runner.api import RunResult, resume_async, run_job_async
from runner.engine import EngineSettings
from runner.simulator import SimulatorConfig, running_simulator
from runner.store import Store
from tests.conftest import JobWriter, ledger_charges

pytestmark = pytest.mark.anyio

KEYS = {
    "acme": "sk-acme-1111111111",
    "globex": "sk-globex-22222222",
    "initech": "sk-ini-3333333333",
}
ENVIRON = {f"{tenant.upper()}_API_KEY": key for tenant, key in KEYS.items()}
SIM_KEYS = {key: tenant for tenant, key in KEYS.items()}


def write_input(tmp_path: Path, rows: int, tenants: tuple[str, ...] = tuple(KEYS)) -> Path:
    path = tmp_path / "in.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for index in range(rows):
            row = {
                "id": f"r{index}",
                "tenant": tenants[index % len(tenants)],
                "prompt": f"Question {index}: what is {index} squared?",
                "n": index,
            }
            handle.write(json.dumps(row) + "\n")
    return path


def output_rows(tmp_path: Path) -> list[dict[str, Any]]:
    return pq.read_table(tmp_path / "out" / "result.parquet").to_pylist()


async def run(job: Path, **kwargs: Any) -> RunResult:
    kwargs.setdefault("environ", ENVIRON)
    return await run_job_async(job, run_id="r", **kwargs)


@pytest.mark.parametrize("processes", [1, 3])
async def test_every_row_is_done_once_with_its_own_tenants_key(
    tmp_path: Path, write_job: JobWriter, processes: int
) -> None:
    """In one process, or one per tenant: the keys reach the children from the
    caller's `environ`, which is not the process environment."""
    async with running_simulator(SimulatorConfig(keys=SIM_KEYS)) as sim:
        job = write_job(
            write_input(tmp_path, 60), base_url=sim.base_url, job=f"processes = {processes}"
        )
        result = await run(job)
        stats = sim.stats()
    assert result.exit_code == 0
    assert result.counts == {"done": 60}
    assert stats["tenant_mismatch"] == 0
    assert stats["by_status"] == {"200": 60}
    assert {label: entry["ok"] for label, entry in stats["per_key"].items()} == {
        "acme": 20,
        "globex": 20,
        "initech": 20,
    }
    assert all(entry == {"received": 1, "ok": 1} for entry in stats["client_request_ids"].values())
    rows = output_rows(tmp_path)
    assert [row["id"] for row in rows] == [f"r{index}" for index in range(60)]
    assert [row["n"] for row in rows] == list(range(60))
    usage_tokens = sum(row["prompt_tokens"] + row["completion_tokens"] for row in rows)
    assert usage_tokens == sum(
        entry["prompt_tokens"] + entry["completion_tokens"] for entry in stats["per_key"].values()
    )
    store = Store(tmp_path / "state.db")
    costs = sum(row["cost_usd"] * 1e6 for row in rows)
    assert ledger_charges(store, "r") == costs == result.cost_micros


async def test_each_tenant_has_exactly_max_parallel_requests_in_flight_at_most(
    tmp_path: Path, write_job: JobWriter
) -> None:
    in_flight: dict[str, int] = {}
    peak: dict[str, int] = {}

    async def slow_echo(request: web.Request) -> web.Response:
        tenant = request.headers["X-Tenant-ID"]
        in_flight[tenant] = in_flight.get(tenant, 0) + 1
        peak[tenant] = max(peak.get(tenant, 0), in_flight[tenant])
        await asyncio.sleep(0.05)
        in_flight[tenant] -= 1
        return web.json_response(
            {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}
        )

    tenants = {
        "acme": {"rpm": 60_000, "tpm": 10_000_000, "max_parallel": 3},
        "globex": {"rpm": 60_000, "tpm": 10_000_000, "max_parallel": 7},
    }
    async with fake_provider(slow_echo) as url:
        result = await run(
            write_job(write_input(tmp_path, 60, ("acme", "globex")), base_url=url, tenants=tenants)
        )
    assert sum(result.counts.values()) == 60
    assert peak == {"acme": 3, "globex": 7}


async def test_the_cost_of_each_row_is_its_usage_at_the_jobs_prices(
    tmp_path: Path, write_job: JobWriter
) -> None:
    config = SimulatorConfig(cached_fraction=0.5, reasoning_tokens=3)
    async with running_simulator(config) as sim:
        await run(write_job(write_input(tmp_path, 6), base_url=sim.base_url))
    for row in output_rows(tmp_path):
        cached = row["prompt_tokens"] // 2
        assert row["cached_tokens"] == cached and row["reasoning_tokens"] == 3
        scaled = (
            (row["prompt_tokens"] - cached) * 280_000
            + cached * 28_000
            + row["completion_tokens"] * 420_000
        )
        assert round(row["cost_usd"] * 1e6) == (scaled + 500_000) // 1_000_000


async def test_limits_hold_at_a_strict_server_without_a_single_429(
    tmp_path: Path, write_job: JobWriter
) -> None:
    # A 2-second window stands for the minute: 10 requests per window per key.
    tenants = {
        "acme": {"rpm": 10, "tpm": 100_000, "max_parallel": 8},
        "globex": {"rpm": 10, "tpm": 100_000, "max_parallel": 8},
    }
    config = SimulatorConfig(rpm=10, window_s=2.0, keys=SIM_KEYS)
    async with running_simulator(config) as sim:
        result = await run(
            write_job(
                write_input(tmp_path, 40, ("acme", "globex")),
                base_url=sim.base_url,
                tenants=tenants,
            ),
            settings=EngineSettings(window_s=2.0, margin_s=0.1),
        )
        stats = sim.stats()
    assert result.counts == {"done": 40}
    assert stats["by_status"] == {"200": 40}
    assert stats["max_window_requests"] == {"acme": 10, "globex": 10}


async def test_a_run_started_right_after_another_counts_its_sends_in_the_window(
    tmp_path: Path, write_job: JobWriter
) -> None:
    """The second run's limiter starts with the first run's sends of the last
    window, read from the state database, so the two together stay within it."""
    tenants = {"acme": {"rpm": 10, "tpm": 100_000, "max_parallel": 8}}
    config = SimulatorConfig(rpm=10, window_s=2.0, keys=SIM_KEYS)
    job_input = write_input(tmp_path, 10, ("acme",))
    async with running_simulator(config) as sim:
        job = write_job(job_input, base_url=sim.base_url, tenants=tenants)
        settings = EngineSettings(window_s=2.0, margin_s=0.1)
        for run_id in ("first", "second"):
            result = await run_job_async(job, run_id=run_id, environ=ENVIRON, settings=settings)
            assert result.counts == {"done": 10}
        stats = sim.stats()
    assert stats["by_status"] == {"200": 20}
    assert stats["max_window_requests"] == {"acme": 10}


async def test_a_window_longer_than_the_sends_kept_remembers_what_is_kept(
    tmp_path: Path, write_job: JobWriter
) -> None:
    async with running_simulator(SimulatorConfig(keys=SIM_KEYS)) as sim:
        job = write_job(write_input(tmp_path, 3), base_url=sim.base_url)
        result = await run(job, settings=EngineSettings(window_s=3600.0))
    assert result.counts == {"done": 3}


async def test_a_429_pauses_the_lane_and_every_row_still_finishes(
    tmp_path: Path, write_job: JobWriter
) -> None:
    # The tenant believes it may send 600/min; the server allows 4 per second.
    config = SimulatorConfig(rpm=4, window_s=1.0, retry_after="fractional")
    async with running_simulator(config) as sim:
        result = await run(
            write_job(
                write_input(tmp_path, 12, ("acme",)),
                base_url=sim.base_url,
                provider="max_attempts = 20\nbackoff_base_s = 0.01\nmax_backoff_s = 1",
            ),
        )
        stats = sim.stats()
    assert result.counts == {"done": 12}
    assert stats["by_status"]["200"] == 12
    assert stats["by_status"]["429"] >= 1
    store = Store(tmp_path / "state.db")
    (recorded,) = store.db.execute(
        "SELECT COUNT(*) FROM attempts WHERE http_status = 429"
    ).fetchone()
    assert recorded == stats["by_status"]["429"]


async def test_server_errors_and_dropped_connections_are_retried_with_backoff(
    tmp_path: Path, write_job: JobWriter
) -> None:
    config = SimulatorConfig(error_rate=0.3, drop_rate=0.1, malformed_rate=0.1, seed=7)
    async with running_simulator(config) as sim:
        result = await run(
            write_job(
                write_input(tmp_path, 40),
                base_url=sim.base_url,
                provider="max_attempts = 10\nbackoff_base_s = 0.001\nmax_backoff_s = 0.01",
            ),
        )
        stats = sim.stats()
    assert result.counts == {"done": 40}
    rows = output_rows(tmp_path)
    assert sum(row["attempts"] for row in rows) == stats["requests"]
    assert max(row["attempts"] for row in rows) > 1


async def test_retries_exhausted_fail_the_row_with_the_last_error(
    tmp_path: Path, write_job: JobWriter
) -> None:
    async with running_simulator(SimulatorConfig(error_rate=1.0)) as sim:
        result = await run(write_job(write_input(tmp_path, 3), base_url=sim.base_url))
        stats = sim.stats()
    assert result.exit_code == 3 and result.counts == {"failed": 3}
    assert stats["requests"] == 12  # max_attempts = 4 per row
    for row in output_rows(tmp_path):
        assert row["status"] == "failed" and row["attempts"] == 4
        assert "HTTP 50" in row["error"] and "gave up after 4 attempts" in row["error"]


@pytest.mark.parametrize("processes", [1, 3])
async def test_a_refused_key_defers_only_that_tenant_and_resume_finishes_it(
    tmp_path: Path, write_job: JobWriter, processes: int
) -> None:
    refusing = SimulatorConfig(keys=SIM_KEYS, refuse={KEYS["globex"]: 401})
    async with running_simulator(refusing) as sim:
        job = write_job(
            write_input(tmp_path, 30), base_url=sim.base_url, job=f"processes = {processes}"
        )
        first = await run(job)
    by_tenant = {t.tenant: t.by_status for t in first.tenants}
    assert by_tenant["acme"] == {"done": 10} and by_tenant["initech"] == {"done": 10}
    assert by_tenant["globex"] == {"deferred": 10}
    assert first.exit_code == 3
    errors = {row["error"] for row in output_rows(tmp_path) if row["tenant"] == "globex"}
    assert len(errors) == 1
    (error,) = errors
    assert "tenant 'globex'" in error and "HTTP 401" in error and "GLOBEX_API_KEY" in error
    assert KEYS["globex"] not in error

    # The key is fixed on the provider's side; the same run id resumes on the same port.
    async with running_simulator(SimulatorConfig(keys=SIM_KEYS), port=sim.port) as sim:
        second = await resume_async("r", state=tmp_path / "state.db", environ=ENVIRON)
        assert sim.stats()["per_key"]["globex"]["ok"] == 10
        assert sim.stats()["requests"] == 10
    assert second.exit_code == 0 and second.counts == {"done": 30}


@pytest.mark.parametrize("processes", [1, 3])
async def test_a_missing_key_defers_the_tenant_with_the_variable_to_set(
    tmp_path: Path, write_job: JobWriter, monkeypatch: pytest.MonkeyPatch, processes: int
) -> None:
    """The caller's `environ` decides, even where the process environment has the key."""
    monkeypatch.setenv("INITECH_API_KEY", "sk-from-the-shell")
    async with running_simulator() as sim:
        environ = {name: key for name, key in ENVIRON.items() if not name.startswith("INITECH")}
        job = write_job(
            write_input(tmp_path, 9), base_url=sim.base_url, job=f"processes = {processes}"
        )
        result = await run(job, environ=environ)
        assert sim.stats()["requests"] == 6
    initech = [row for row in output_rows(tmp_path) if row["tenant"] == "initech"]
    assert {row["status"] for row in initech} == {"deferred"}
    assert "environment variable INITECH_API_KEY is not set" in initech[0]["error"]
    assert result.exit_code == 3


async def test_a_response_without_usage_is_done_with_cost_unknown_never_zero(
    tmp_path: Path, write_job: JobWriter
) -> None:
    async with running_simulator(SimulatorConfig(no_usage_rate=1.0)) as sim:
        result = await run(write_job(write_input(tmp_path, 3), base_url=sim.base_url))
    assert result.counts == {"done": 3}
    for row in output_rows(tmp_path):
        assert row["cost_usd"] is None and row["prompt_tokens"] is None
        assert row["error"] == "the provider sent no usage: cost unknown"
    assert ledger_charges(Store(tmp_path / "state.db"), "r") == 0


async def test_a_request_the_provider_rejects_fails_with_the_providers_message(
    tmp_path: Path, write_job: JobWriter
) -> None:
    path = tmp_path / "batch.jsonl"
    line = {
        "custom_id": "s1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": "hi"}], "stream": True},
    }
    path.write_text(json.dumps(line) + "\n", encoding="utf-8")
    async with running_simulator() as sim:
        result = await run(write_job(path, base_url=sim.base_url))
        assert sim.stats()["requests"] == 1
    (row,) = output_rows(tmp_path)
    assert row["status"] == "failed" and row["attempts"] == 1
    assert "HTTP 400" in row["error"] and "stream" in row["error"]
    assert result.exit_code == 3


async def test_rejected_and_duplicate_rows_are_reported_and_never_sent(
    tmp_path: Path, write_job: JobWriter
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"id": "a", "prompt": "one"}\n{"id": "a", "prompt": "two"}\nnot json\n'
        '{"id": "c", "prompt": "x", "tenant": "nobody"}\n',
        encoding="utf-8",
    )
    async with running_simulator() as sim:
        result = await run(write_job(path, base_url=sim.base_url))
        assert sim.stats()["requests"] == 1
    rows = output_rows(tmp_path)
    assert [row["status"] for row in rows] == ["done", "rejected", "rejected", "rejected"]
    assert rows[1]["error"] == f"{path}:2: duplicate id 'a' (first seen at {path}:1)"
    assert rows[2]["error"].startswith(f"{path}:3: not valid JSON")
    assert rows[3]["error"].startswith(f"{path}:4: unknown tenant 'nobody'")
    assert result.exit_code == 3


@asynccontextmanager
async def fake_provider(handler: Any) -> AsyncIterator[str]:
    """A minimal OpenAI-like server of the test's own, for behaviours the
    simulator does not offer."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = web.AppRunner(app)
    await server.setup()
    await web.TCPSite(server, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{server.addresses[0][1]}/v1"
    finally:
        await server.cleanup()


async def test_a_provider_that_echoes_the_key_never_gets_it_stored(
    tmp_path: Path, write_job: JobWriter
) -> None:
    async def echo(request: web.Request) -> web.Response:
        auth = request.headers["Authorization"]
        return web.json_response({"error": {"message": f"bad request from {auth}"}}, status=400)

    async with fake_provider(echo) as url:
        await run(write_job(write_input(tmp_path, 3), base_url=url))
    (row, *_) = output_rows(tmp_path)
    assert row["error"].endswith("bad request from Bearer [redacted]")
    assert files_holding(tmp_path, KEYS["acme"].encode()) == []


def files_holding(folder: Path, secret: bytes) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file() and secret in path.read_bytes()]


async def test_a_key_an_http_header_cannot_carry_defers_only_its_tenant(
    tmp_path: Path, write_job: JobWriter
) -> None:
    environ = {**ENVIRON, "GLOBEX_API_KEY": "sk-globex\nX-Injected: 1"}
    async with running_simulator() as sim:
        result = await run(
            write_job(write_input(tmp_path, 9), base_url=sim.base_url), environ=environ
        )
    by_tenant = {t.tenant: t.by_status for t in result.tenants}
    assert by_tenant == {"acme": {"done": 3}, "globex": {"deferred": 3}, "initech": {"done": 3}}
    globex = [row for row in output_rows(tmp_path) if row["tenant"] == "globex"]
    assert "GLOBEX_API_KEY has spaces or control characters" in globex[0]["error"]


async def test_a_row_waiting_to_retry_when_its_tenant_is_refused_ends_deferred(
    tmp_path: Path, write_job: JobWriter
) -> None:
    async def flaky_then_refusing(request: web.Request) -> web.Response:
        if request.headers["X-Client-Request-Id"].endswith(":0"):
            return web.json_response({"error": {"message": "busy"}}, status=503)
        await asyncio.sleep(0.2)
        return web.json_response({"error": {"message": "key revoked"}}, status=401)

    tenants = {"acme": {"rpm": 6000, "tpm": 100_000, "max_parallel": 2}}
    provider = "max_attempts = 10\nbackoff_base_s = 1\nmax_backoff_s = 1"
    async with fake_provider(flaky_then_refusing) as url:
        result = await run(
            write_job(
                write_input(tmp_path, 3, ("acme",)),
                base_url=url,
                tenants=tenants,
                provider=provider,
            )
        )
    rows = output_rows(tmp_path)
    assert [row["status"] for row in rows] == ["deferred"] * 3
    assert all("HTTP 401" in row["error"] and "ACME_API_KEY" in row["error"] for row in rows)
    assert result.exit_code == 3


@pytest.mark.parametrize("form", ["seconds", "fractional", "http-date", "reset-duration", "none"])
async def test_every_fault_at_once_ends_each_row_done_or_failed_with_its_last_error(
    tmp_path: Path, write_job: JobWriter, form: str
) -> None:
    # The server allows 5 requests a second while the tenants believe in 600 a
    # minute, so 429s come with every hint form; on top: 10 % 500/503, 5 % dropped
    # connections, 5 % malformed bodies, 5 % answers slower than the timeout.
    config = SimulatorConfig(
        rpm=5,
        window_s=1.0,
        retry_after=form,
        error_rate=0.1,
        drop_rate=0.05,
        malformed_rate=0.05,
        slow_rate=0.05,
        slow_s=2.0,
        seed=11,
    )
    provider = "timeout_s = 0.5\nmax_attempts = 4\nbackoff_base_s = 0.05\nmax_backoff_s = 0.5"
    async with running_simulator(config) as sim:
        result = await run(
            write_job(write_input(tmp_path, 24), base_url=sim.base_url, provider=provider)
        )
        stats = sim.stats()
    rows = output_rows(tmp_path)
    assert {row["status"] for row in rows} <= {"done", "failed"}
    assert sum(result.counts.values()) == 24
    for row in rows:
        if row["status"] == "failed":
            assert "gave up after 4 attempts" in row["error"]
    assert stats["by_status"].get("429", 0) > 0
    store = Store(tmp_path / "state.db")
    (recorded,) = store.db.execute("SELECT COUNT(*) FROM attempts").fetchone()
    assert recorded + result.counts.get("done", 0) == sum(row["attempts"] for row in rows)


async def test_a_row_above_a_tpm_lowered_since_registration_fails_and_the_rest_runs(
    tmp_path: Path, write_job: JobWriter
) -> None:
    source = tmp_path / "in.jsonl"
    prompts = ["Short one?", "lengthy " * 200, "Short two?"]
    source.write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts))
    )
    async with running_simulator(SimulatorConfig()) as sim:
        first = await run(
            write_job(source, base_url=sim.base_url, tenants={"acme": {"rpm": 600, "tpm": 9000}}),
            environ={},  # no key: every row deferred
        )
        again = await run(
            write_job(source, base_url=sim.base_url, tenants={"acme": {"rpm": 600, "tpm": 150}})
        )
    assert first.counts == {"deferred": 3}
    assert again.counts == {"done": 2, "failed": 1}
    failed = [row for row in output_rows(tmp_path) if row["status"] == "failed"]
    assert [row["id"] for row in failed] == ["r1"]
    assert "but tenant 'acme' allows 150 per minute" in failed[0]["error"]
