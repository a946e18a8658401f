"""ProviderClient against the simulator: every answer maps to a Reply or one error."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from runner.errors import RateLimited, RequestRejected, Retryable, TenantRefused
from runner.provider import ProviderClient
from runner.records import Reply
from runner.secrets import Secret
from runner.simulator import SimulatorConfig, running_simulator

pytestmark = pytest.mark.anyio

KEY = Secret("sk-provider-test-secret")
BODY = json.dumps(
    {"model": "gpt-4.1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20}
).encode()


@asynccontextmanager
async def client_for(config: SimulatorConfig) -> AsyncIterator[ProviderClient]:
    async with running_simulator(config) as sim:
        client = ProviderClient(sim.base_url, timeout_s=0.5, pool_size=4)
        try:
            yield client
        finally:
            await client.aclose()


async def send(config: SimulatorConfig, body: bytes = BODY) -> Reply | Exception:
    async with client_for(config) as client:
        try:
            return await client.send(body, tenant="acme", key=KEY, request_id="r:0")
        except Exception as error:  # each test checks which one
            failure = error
    assert KEY.reveal() not in str(failure)
    return failure


async def test_a_completion_becomes_a_reply_with_usage() -> None:
    reply = await send(SimulatorConfig(cached_fraction=0.5, reasoning_tokens=2))
    assert isinstance(reply, Reply)
    assert reply.finish_reason in {"stop", "length"}
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == 3 + 3 + 1  # framing + "Hi"
    assert reply.usage.cached_tokens == 3 and reply.usage.reasoning_tokens == 2
    assert json.loads(reply.body)["usage"]["prompt_tokens"] == 7


async def test_429_is_rate_limited_with_the_servers_hint() -> None:
    async with client_for(SimulatorConfig(rpm=1, retry_after="fractional")) as client:
        await client.send(BODY, tenant="acme", key=KEY, request_id="r:0")
        with pytest.raises(RateLimited) as caught:
            await client.send(BODY, tenant="acme", key=KEY, request_id="r:1")
        assert 59 < caught.value.retry_after <= 60  # type: ignore[operator]
        assert caught.value.status == 429


@pytest.mark.parametrize("status", [401, 402, 403])
async def test_refused_keys_and_accounts_refuse_the_tenant(status: int) -> None:
    error = await send(SimulatorConfig(refuse={KEY.reveal(): status}))
    assert isinstance(error, TenantRefused)
    assert error.status == status and f"HTTP {status}" in str(error) and "'acme'" in str(error)


async def test_other_4xx_rejects_the_request_with_the_providers_message() -> None:
    error = await send(SimulatorConfig(), body=b'{"model": "m", "messages": "nope"}')
    assert isinstance(error, RequestRejected)
    assert error.status == 400 and "messages" in str(error)


@pytest.mark.parametrize(
    ("config", "text"),
    [
        (SimulatorConfig(error_rate=1.0), "HTTP 50"),
        (SimulatorConfig(drop_rate=1.0), "connection failed"),
        (SimulatorConfig(malformed_rate=1.0), "not a chat completion"),
        (SimulatorConfig(slow_rate=1.0, slow_s=5.0), "no answer within the timeout"),
    ],
)
async def test_transient_failures_are_retryable(config: SimulatorConfig, text: str) -> None:
    error = await send(config)
    assert type(error) is Retryable
    assert text in str(error)


async def test_an_unreachable_server_is_retryable() -> None:
    client = ProviderClient("http://127.0.0.1:9/v1", timeout_s=1, pool_size=1)
    try:
        with pytest.raises(Retryable, match="connection failed"):
            await client.send(BODY, tenant="acme", key=KEY, request_id="r:0")
    finally:
        await client.aclose()
