"""Budgets end to end: caps under concurrency, deferral, top-up and resume, 402,
missing usage, alerts and their webhook, reports that add up."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from aiohttp import web

from runner import reports
from runner.alerts import Alerts
from runner.api import resume_async, run_job_async
from runner.config import load_job
from runner.engine import EngineSettings
from runner.ledger import Entry, Kind, period_of
from runner.simulator import SimulatorConfig, running_simulator
from runner.store import Store
from tests.conftest import JobWriter, ledger_charges

pytestmark = pytest.mark.anyio

TENANTS = [f"t{n}" for n in range(10)]
PRICE = '[prices."deepseek-v3.2"]\ninput = 0.28\ncached_input = 0.028\noutput = 0.42\n'
FAST = EngineSettings(alert_grace_s=2.0)
KEYS = {
    f"{tenant.upper()}_API_KEY": f"sk-{tenant}"
    for tenant in [*TENANTS, "acme", "globex", "aaa", "live"]
}


def write_input(tmp_path: Path, rows_per_tenant: int, tenants: list[str]) -> Path:
    path = tmp_path / "in.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for index in range(rows_per_tenant * len(tenants)):
            tenant = tenants[index % len(tenants)]
            prompt = f"Question {index}: " + "explain this in detail " * (index % 7)
            handle.write(json.dumps({"id": f"q{index}", "tenant": tenant, "prompt": prompt}) + "\n")
    return path


def output_rows(tmp_path: Path) -> list[dict[str, Any]]:
    return pq.read_table(tmp_path / "out" / "result.parquet").to_pylist()


def recomputed_micros(row: dict[str, Any]) -> int:
    """The cost of a row from its own usage, at $0.28 / $0.028 / $0.42 per million."""
    cached = row["cached_tokens"]
    scaled = (
        (row["prompt_tokens"] - cached) * 280_000
        + cached * 28_000
        + row["completion_tokens"] * 420_000
    )
    return (scaled + 500_000) // 1_000_000


async def test_caps_hold_under_64_way_concurrency_then_topup_and_resume_finish(
    tmp_path: Path, write_job: JobWriter
) -> None:
    caps = {tenant: 300 + 150 * n for n, tenant in enumerate(TENANTS)}  # micro-dollars
    tenants = {
        tenant: {
            "rpm": 60_000,
            "tpm": 10_000_000,
            "max_parallel": 64,
            "monthly_budget_usd": caps[tenant] / 1e6,
        }
        for tenant in TENANTS
    }
    config = SimulatorConfig(cached_fraction=0.25, reasoning_tokens=4, latency_jitter_s=0.02)
    async with running_simulator(config) as sim:
        job = write_job(
            write_input(tmp_path, 40, TENANTS),
            tenants=tenants,
            extra=PRICE,
            defaults='model = "deepseek-v3.2"\nmax_tokens = 100',
            base_url=sim.base_url,
            job="",
        )
        first = await run_job_async(job, run_id="r", settings=FAST, environ=KEYS)
        store = Store(tmp_path / "state.db")
        period = reports.current_month()
        for tenant in TENANTS:
            balance = store.balance(tenant, period)
            assert balance.spent_micros <= caps[tenant]
            assert balance.reserved_micros == 0
        rows = output_rows(tmp_path)
        deferred = [row for row in rows if row["status"] == "deferred"]
        assert deferred and {row["status"] for row in rows} == {"done", "deferred"}
        for row in deferred:
            assert f"budget exhausted for {period}: spent $" in row["error"]
            assert f"of ${caps[row['tenant']] / 1e6:.6f}" in row["error"]
        assert first.exit_code == 3

        for tenant in TENANTS:
            reports.topup(store, tenant, "1", reason="test top-up")
        second = await resume_async("r", state=tmp_path / "state.db", settings=FAST, environ=KEYS)
        assert second.exit_code == 0 and second.counts == {"done": 400}
        stats = sim.stats()

    rows = output_rows(tmp_path)
    costs = [round(row["cost_usd"] * 1e6) for row in rows]
    assert costs == [recomputed_micros(row) for row in rows]
    report = {row.tenant: row for row in reports.month_report(store, period)}
    assert report["TOTAL"].spend_micros == sum(costs) == ledger_charges(store, "r")
    assert report["TOTAL"].requests == 400
    provider_tokens = sum(
        e["prompt_tokens"] + e["completion_tokens"] for e in stats["per_key"].values()
    )
    assert report["TOTAL"].prompt_tokens + report["TOTAL"].completion_tokens == provider_tokens
    for tenant in TENANTS:
        bill = reports.invoice(store, tenant, period)
        assert bill.total_micros == sum(
            cost for cost, row in zip(costs, rows, strict=True) if row["tenant"] == tenant
        )
        assert [amount for _, amount, _ in bill.topups] == [1_000_000]
        assert report[tenant].budget_micros == caps[tenant] + 1_000_000


async def test_a_402_mid_run_defers_the_rest_of_that_tenant_only(
    tmp_path: Path, write_job: JobWriter
) -> None:
    keys = {"ACME_API_KEY": "sk-a", "GLOBEX_API_KEY": "sk-g"}
    tenants = {
        name: {"rpm": 6000, "tpm": 1_000_000, "max_parallel": 1} for name in ("acme", "globex")
    }
    config = SimulatorConfig(refuse={"sk-g": 402}, refuse_after=5)
    async with running_simulator(config) as sim:
        job = write_job(
            write_input(tmp_path, 20, ["acme", "globex"]), tenants=tenants, base_url=sim.base_url
        )
        result = await run_job_async(job, run_id="r", environ=keys, settings=FAST)
    by_tenant = {t.tenant: t.by_status for t in result.tenants}
    assert by_tenant["acme"] == {"done": 20}
    assert by_tenant["globex"] == {"done": 5, "deferred": 15}
    errors = {row["error"] for row in output_rows(tmp_path) if row["status"] == "deferred"}
    assert len(errors) == 1 and "HTTP 402" in errors.pop()


async def test_a_response_without_usage_holds_its_worst_case_and_is_reported(
    tmp_path: Path, write_job: JobWriter
) -> None:
    tenants = {"acme": {"rpm": 6000, "tpm": 1_000_000, "monthly_budget_usd": 1}}
    async with running_simulator(SimulatorConfig(no_usage_rate=1.0)) as sim:
        job = write_job(
            write_input(tmp_path, 4, ["acme"]), tenants=tenants, base_url=sim.base_url, job=""
        )
        await run_job_async(job, run_id="r", settings=FAST, environ=KEYS)
    store = Store(tmp_path / "state.db")
    period = reports.current_month()
    held = store.balance("acme", period).held_micros
    requests = store.db.execute("SELECT prompt_estimate, max_tokens FROM requests").fetchall()
    price = (280_000, 420_000)
    assert held == sum(-(-(p * price[0] + m * price[1]) // 1_000_000) for p, m in requests) > 0
    (row,) = [r for r in reports.month_report(store, period) if r.tenant == "acme"]
    assert row.unknown_cost == 4 and row.spend_micros == 0
    assert row.held_micros == held and row.percent_used == round(held * 100 / 1_000_000, 2)


class Webhook:
    """A real HTTP endpoint on loopback that records what it is sent."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        return web.Response(status=204)


@asynccontextmanager
async def serving(hook: Webhook) -> AsyncIterator[Webhook]:
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    server = web.AppRunner(app)
    await server.setup()
    await web.TCPSite(server, "127.0.0.1", 0).start()
    hook.url = f"http://127.0.0.1:{server.addresses[0][1]}/hook"
    try:
        yield hook
    finally:
        await server.cleanup()


async def test_alerts_fire_once_per_threshold_and_post_to_the_webhook(
    tmp_path: Path, write_job: JobWriter, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(Webhook()) as hook, running_simulator() as sim:
        tenants = {
            "acme": {
                "rpm": 6000,
                "tpm": 1_000_000,
                "monthly_budget_usd": 0.0006,
                "alert_thresholds": [10, 50, 99],
                "alert_webhook": hook.url,
            },
            "globex": {
                "rpm": 6000,
                "tpm": 1_000_000,
                "monthly_budget_usd": 0.0003,
                "alert_webhook": "http://127.0.0.1:9/refused",
            },
        }
        job = write_job(
            write_input(tmp_path, 10, ["acme", "globex"]), tenants=tenants, base_url=sim.base_url
        )
        settings = EngineSettings(alert_grace_s=10.0)
        await run_job_async(job, run_id="one", settings=settings, environ=KEYS)
        await run_job_async(job, run_id="two", settings=settings, environ=KEYS)
    store = Store(tmp_path / "state.db")
    fired = store.db.execute("SELECT tenant, threshold FROM alerts ORDER BY tenant, threshold")
    by_tenant: dict[str, list[int]] = {}
    for tenant, threshold in fired:
        by_tenant.setdefault(tenant, []).append(threshold)
    # Both runs spend against one monthly cap; no threshold fires twice.
    assert by_tenant["acme"][:2] == [10, 50]
    assert sorted(p["threshold_percent"] for p in hook.received) == by_tenant["acme"]
    assert all(p["tenant"] == "acme" and p["budget_usd"] == 0.0006 for p in hook.received)
    assert all(p["spent_usd"] >= p["threshold_percent"] / 100 * 0.0006 for p in hook.received)
    assert "globex" in by_tenant  # its webhook refused connections; the run went on
    assert "budget alert webhook for tenant 'globex' failed" in caplog.text


async def test_a_webhook_that_never_answers_holds_up_no_other_tenants_alert(
    tmp_path: Path, write_job: JobWriter, caplog: pytest.LogCaptureFixture
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(60)  # accepts, reads nothing, never answers

    hanging = await asyncio.start_server(silent, "127.0.0.1", 0)
    hang_port = hanging.sockets[0].getsockname()[1]
    try:
        async with serving(Webhook()) as hook, running_simulator() as sim:
            tenants = {
                "aaa": {
                    "rpm": 6000,
                    "tpm": 1_000_000,
                    "monthly_budget_usd": 0.0001,
                    "alert_thresholds": [10],
                    "alert_webhook": f"http://127.0.0.1:{hang_port}/x",
                },
                "live": {
                    "rpm": 6000,
                    "tpm": 1_000_000,
                    "monthly_budget_usd": 0.0001,
                    "alert_thresholds": [10],
                    "alert_webhook": hook.url,
                },
            }
            job = write_job(
                write_input(tmp_path, 3, ["aaa", "live"]),
                tenants=tenants,
                base_url=sim.base_url,
                job="",
            )
            await run_job_async(
                job, run_id="r", environ=KEYS, settings=EngineSettings(alert_grace_s=2.0)
            )
    finally:
        hanging.close()
    assert [(p["tenant"], p["threshold_percent"]) for p in hook.received] == [("live", 10)]
    assert "budget alert webhook for tenant 'aaa' not answered within 2s" in caplog.text


def test_a_threshold_once_crossed_costs_no_write_on_later_commits(
    tmp_path: Path, write_job: JobWriter
) -> None:
    job = load_job(
        write_job(
            write_input(tmp_path, 1, ["acme"]),
            tenants={"acme": {"rpm": 60, "tpm": 100_000, "monthly_budget_usd": 1.0}},
        )
    )
    store = Store(tmp_path / "state.db")
    alerts = Alerts(store, job)
    period = period_of(datetime.now(UTC), "month")
    statements: list[str] = []
    store.db.conn.set_trace_callback(statements.append)
    for micros in (600_000, 10_000, 10_000, 10_000, 10_000):  # 60 %, then four commits more
        charge = Entry("acme", period, Kind.CHARGE, micros)
        store.add_entries([charge])
        alerts.check([charge])
    store.db.conn.set_trace_callback(None)
    alerts.close()
    assert [alert.threshold for alert in alerts.fired] == [50]
    assert sum("INSERT" in s and "alerts" in s for s in statements) == 1
