"""The simulator over real HTTP: tokens, answers, auth, validation, limits, faults, stats."""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner import tokens
from runner.simulator import (
    SimulatorConfig,
    SimulatorThread,
    _duration,
    key_label,
    prompt_tokens,
    running_simulator,
    sim_tokens,
)

pytestmark = pytest.mark.anyio

KEY = "sk-test-0123456789abcdef"
LABEL = key_label(KEY)
CONVERSATION = [
    {"role": "system", "content": "You are terse."},  # 3 + You are terse . = 3 + 4
    {"role": "user", "content": "Summarise the quarterly report, please!"},  # 3 + 2+1+2+1+1+1+1
]


def chat(content: str | list[dict[str, Any]] = "", **extra: Any) -> dict[str, Any]:
    messages = CONVERSATION if content == "" else [{"role": "user", "content": content}]
    return {"model": "gpt-4.1", "messages": messages, **extra}


class Client:
    """One aiohttp session posting to one running simulator."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session, self.base_url = session, base_url

    async def post(
        self, body: Any = None, *, key: str | None = KEY, headers: Mapping[str, str] = {}
    ) -> tuple[int, Mapping[str, str], bytes]:
        sent = {"Authorization": f"Bearer {key}"} if key is not None else {}
        data = body if isinstance(body, bytes) else json.dumps(chat() if body is None else body)
        async with self.session.post(
            f"{self.base_url}/chat/completions", data=data, headers={**sent, **headers}
        ) as response:
            return response.status, response.headers, await response.read()

    async def ok(self, body: Any = None, **kwargs: Any) -> dict[str, Any]:
        status, _, raw = await self.post(body, **kwargs)
        assert status == 200, raw
        return json.loads(raw)  # type: ignore[no-any-return]

    async def stats(self, query: str = "") -> dict[str, Any]:
        url = self.base_url.removesuffix("/v1") + "/stats" + query
        async with self.session.get(url) as response:
            return await response.json()  # type: ignore[no-any-return]


@asynccontextmanager
async def simulator(**config: Any) -> AsyncIterator[Client]:
    async with (
        running_simulator(SimulatorConfig(**config)) as sim,
        aiohttp.ClientSession() as session,
    ):
        yield Client(session, sim.base_url)


# -- tokens ------------------------------------------------------------------------


def test_sim_token_rule() -> None:
    assert sim_tokens("") == 0
    assert sim_tokens("  \n\t ") == 0
    assert sim_tokens("abcdef abcdefg") == 1 + 2  # letter runs: ceil(n / 6)
    assert sim_tokens("123 1234 1234567") == 1 + 2 + 3  # digit runs: ceil(m / 3)
    assert sim_tokens("abc123def") == 1 + 1 + 1  # runs of different classes do not merge
    assert sim_tokens("请用三句话。") == 6  # one per other visible character
    assert sim_tokens("héllo") == 1 + 1 + 1  # é is not ASCII: it splits the letter run


def test_prompt_tokens_framing() -> None:
    assert prompt_tokens([{"role": "user", "content": ""}]) == 3 + 3
    assert prompt_tokens([{"role": "user", "content": "hi", "name": "bob"}]) == 3 + 3 + 1 + 1
    assert prompt_tokens([{"role": "assistant", "content": None}]) == 3 + 3
    parts = [
        {"type": "text", "text": "Hello world"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "text", "text": "again"},
    ]
    assert prompt_tokens([{"role": "user", "content": parts}]) == 3 + 3 + 3


texts = st.text(st.characters(codec="utf-8") | st.sampled_from("aZ09 \n.-$"), max_size=60)


@given(texts, texts, st.booleans())
def test_runner_estimate_bounds_simulator_count(system: str, user: str, named: bool) -> None:
    """The runner's estimate in runner/tokens.py never counts fewer tokens than we report."""
    assert tokens.text_tokens(user) >= sim_tokens(user)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "text", "text": user}]},
    ]
    if named:
        messages[1]["name"] = "n"
    assert tokens.messages_tokens(messages) >= prompt_tokens(messages)


async def test_usage_for_known_prompts() -> None:
    async with simulator() as client:
        english = await client.ok()
        chinese = await client.ok(chat("请用三句话总结这份报告。"))  # 12 characters
        digits = await client.ok(chat("Order 1234567 costs $89.50 on 2024-01-15"))
    assert english["usage"]["prompt_tokens"] == 3 + (3 + 4) + (3 + 9) == 22
    assert chinese["usage"]["prompt_tokens"] == 3 + 3 + 12 == 18
    # Order, 1234567 (3), costs, $, 89, ., 50, on, 2024 (2), -, 01, -, 15
    assert digits["usage"]["prompt_tokens"] == 3 + 3 + 16 == 22
    for reply in (english, chinese, digits):
        usage = reply["usage"]
        content = reply["choices"][0]["message"]["content"]
        assert usage["completion_tokens"] == sim_tokens(content)
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
        assert usage["completion_tokens_details"] == {"reasoning_tokens": 0}


# -- answers -----------------------------------------------------------------------


async def test_answer_is_deterministic_and_shaped_like_openai() -> None:
    async with simulator() as client:
        first, again = await client.ok(), await client.ok()
        other_model = await client.ok({**chat(), "model": "deepseek-v3.2"})
    async with simulator() as client:
        fresh_server = await client.ok()
    content = first["choices"][0]["message"]["content"]
    assert content.startswith("Answer stable the request stable value. Runner fair runner ")
    assert len(content.split()) == 116
    assert first["usage"]["completion_tokens"] == 146
    assert content == again["choices"][0]["message"]["content"]
    assert content == fresh_server["choices"][0]["message"]["content"]
    assert content != other_model["choices"][0]["message"]["content"]
    assert re.fullmatch(r"chatcmpl-sim-[0-9a-f]+", first["id"])
    assert first["id"] != again["id"]
    assert first["object"] == "chat.completion"
    assert isinstance(first["created"], int)
    assert first["model"] == "gpt-4.1"
    assert other_model["model"] == "deepseek-v3.2"
    assert first["choices"][0]["index"] == 0
    assert first["choices"][0]["message"]["role"] == "assistant"
    assert first["choices"][0]["finish_reason"] == "stop"


async def test_max_tokens_cuts_the_answer() -> None:
    async with simulator() as client:
        cut = await client.ok(chat(max_tokens=3))
        cut_too = await client.ok(chat(max_completion_tokens=6, max_tokens=50))
        roomy = await client.ok(chat(max_tokens=500))
    assert cut["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": "Answer stable the"},
        "finish_reason": "length",
    }
    assert cut["usage"]["completion_tokens"] == 3
    assert cut_too["choices"][0]["message"]["content"] == "Answer stable the request stable"
    assert cut_too["choices"][0]["finish_reason"] == "length"
    assert roomy["choices"][0]["finish_reason"] == "stop"
    assert roomy["usage"]["completion_tokens"] == 146


async def test_cached_and_reasoning_tokens() -> None:
    async with simulator(cached_fraction=0.5, reasoning_tokens=4) as client:
        full = await client.ok()
        capped = await client.ok(chat(max_tokens=10))
        chinese = await client.ok(chat("请用三句话总结这份报告。", max_tokens=3))
    assert full["usage"]["prompt_tokens_details"] == {"cached_tokens": 11}  # floor(22 * 0.5)
    assert full["usage"]["completion_tokens_details"] == {"reasoning_tokens": 4}
    assert full["usage"]["completion_tokens"] == 146 + 4
    # Reasoning fits inside max_tokens: 4 reasoning + 6 visible.
    assert capped["choices"][0]["message"]["content"] == "Answer stable the request stable"
    assert capped["usage"]["completion_tokens"] == 10
    assert chinese["usage"]["prompt_tokens_details"] == {"cached_tokens": 9}  # floor(18 * 0.5)
    assert chinese["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3}
    assert chinese["usage"]["completion_tokens"] == 3
    assert chinese["choices"][0]["message"]["content"] == ""
    assert chinese["choices"][0]["finish_reason"] == "length"


# -- auth and validation -------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer ", "Bearer    ", "Basic abc", KEY])
async def test_missing_key_is_401(header: str | None) -> None:
    async with simulator() as client:
        headers = {} if header is None else {"Authorization": header}
        status, _, raw = await client.post(key=None, headers=headers)
    assert status == 401
    error = json.loads(raw)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "missing_api_key"


async def test_unknown_key_is_401_and_refused_key_gets_its_status() -> None:
    config = {"keys": {KEY: "alpha"}, "refuse": {"sk-broke-1": 402, "sk-banned-1": 403}}
    async with simulator(**config) as client:
        assert (await client.ok())["object"] == "chat.completion"
        unknown = await client.post(key="sk-nobody")
        broke = await client.post(key="sk-broke-1")
        banned = await client.post(key="sk-banned-1")
        stats = await client.stats()
    assert unknown[0] == 401
    assert json.loads(unknown[2])["error"]["code"] == "invalid_api_key"
    assert broke[0] == 402
    assert json.loads(broke[2])["error"]["type"] == "insufficient_quota"
    assert banned[0] == 403
    assert json.loads(banned[2])["error"]["type"] == "permission_error"
    assert stats["by_status"] == {"200": 1, "401": 1, "402": 1, "403": 1}
    assert stats["per_key"][key_label("sk-broke-1")]["requests"] == 1
    assert stats["per_key"][key_label("sk-banned-1")]["requests"] == 1
    assert "sk-nobody" not in json.dumps(stats)


BAD_BODIES: list[Any] = [
    b"not json",
    b"\xff\xfe",
    [1, 2],
    "a string",
    {"model": "gpt-4.1"},
    {"model": "gpt-4.1", "messages": []},
    {"model": "gpt-4.1", "messages": "hi"},
    {"model": "gpt-4.1", "messages": ["hi"]},
    {"model": "gpt-4.1", "messages": [{"content": "no role"}]},
    {"messages": [{"role": "user", "content": "no model"}]},
    {"model": "", "messages": [{"role": "user", "content": "empty model"}]},
    chat(max_tokens=0),
    chat(max_tokens="5"),
    chat(max_completion_tokens=True),
    chat(stream=True),
]


@pytest.mark.parametrize("body", BAD_BODIES)
async def test_malformed_request_is_400(body: Any) -> None:
    async with simulator(rpm=1) as client:
        status, _, raw = await client.post(body)
        assert (await client.post())[0] == 200  # a 400 takes no room in the window
    assert status == 400
    error = json.loads(raw)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] is None
    assert error["message"]


# -- rate limits ---------------------------------------------------------------------


async def test_rpm_window_admits_again_after_retry_after() -> None:
    async with simulator(rpm=3, window_s=1.0) as client:
        for _ in range(3):
            await client.ok()
        status, headers, raw = await client.post()
        assert status == 429
        assert headers["Retry-After"] == "1"
        assert json.loads(raw)["error"]["type"] == "rate_limit_exceeded"
        await asyncio.sleep(int(headers["Retry-After"]))
        await client.ok()
        stats = await client.stats()
    label = LABEL
    assert stats["per_key"][label] == {
        "requests": 5,
        "ok": 4,
        "rate_limited": 1,
        "prompt_tokens": 4 * 22,
        "completion_tokens": 4 * 146,
    }
    assert stats["max_window_requests"] == {label: 3}
    assert stats["max_window_tokens"] == {label: 3 * (22 + 16)}
    assert stats["by_status"] == {"200": 4, "429": 1}
    assert 1.0 <= stats["last_ok_at"][label] - stats["first_ok_at"][label] < 3.0


async def test_tpm_counts_prompt_plus_completion_limit() -> None:
    async with simulator(tpm=100) as client:
        await client.ok(chat(max_tokens=50))  # 22 + 50 = 72
        over = await client.post(chat(max_tokens=50))  # 72 + 72 > 100
        default_limit = await client.post(chat())  # 72 + 22 + 16 = 110 > 100
        exact = await client.post(chat(max_tokens=6))  # 72 + 28 = 100: admitted
        alone_too_big = await client.post(chat(max_tokens=200))  # 222 > 100 on its own
        other_key = await client.post(chat(max_tokens=50), key="sk-other-key")
        stats = await client.stats()
    statuses = [r[0] for r in (over, default_limit, exact, alone_too_big, other_key)]
    assert statuses == [429, 429, 200, 429, 200]
    assert int(over[1]["Retry-After"]) == 60
    assert alone_too_big[1]["Retry-After"] == "60"
    assert json.loads(over[2])["error"]["code"] == "rate_limit_exceeded"
    assert stats["max_window_tokens"] == {LABEL: 100, key_label("sk-other-key"): 72}
    assert stats["per_key"][LABEL]["rate_limited"] == 3


HINT_HEADERS = {"retry-after", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"}


@pytest.mark.parametrize("form", ["seconds", "fractional", "http-date", "reset-duration", "none"])
async def test_retry_after_forms(form: str) -> None:
    async with simulator(rpm=1, tpm=1000, window_s=90.0, retry_after=form) as client:
        await client.ok()
        status, headers, _ = await client.post()
    assert status == 429
    hints = {k.lower() for k in headers} & HINT_HEADERS
    if form == "seconds":
        assert hints == {"retry-after"}
        assert headers["Retry-After"] == "90"
    elif form == "fractional":
        assert hints == {"retry-after"}
        assert re.fullmatch(r"\d+\.\d{3}", headers["Retry-After"])
        assert 89.0 < float(headers["Retry-After"]) <= 90.0
    elif form == "http-date":
        assert hints == {"retry-after"}
        when = email.utils.parsedate_to_datetime(headers["Retry-After"]).timestamp()
        assert 88.0 <= when - time.time() <= 91.0
    elif form == "reset-duration":
        assert hints == {"x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"}
        assert headers["x-ratelimit-reset-requests"] == "1m30s"
        assert headers["x-ratelimit-reset-tokens"] == "0s"  # the tokens still fit
    else:
        assert hints == set()


async def test_fractional_hint_is_enough_to_wait() -> None:
    async with simulator(rpm=2, window_s=0.4, retry_after="fractional") as client:
        await client.ok()
        await client.ok()
        status, headers, _ = await client.post()
        assert status == 429
        assert 0.0 < float(headers["Retry-After"]) <= 0.4
        await asyncio.sleep(float(headers["Retry-After"]))
        await client.ok()


def test_reset_duration_format() -> None:
    assert _duration(0.25) == "250ms"
    assert _duration(0.0004) == "1ms"
    assert _duration(1.0) == "1s"
    assert _duration(6.2) == "7s"
    assert _duration(90.0) == "1m30s"
    assert _duration(3725.0) == "1h2m5s"


# -- faults --------------------------------------------------------------------------


async def test_errors_alternate_500_and_503() -> None:
    async with simulator(error_rate=1.0) as client:
        replies = [await client.post() for _ in range(4)]
    assert [status for status, _, _ in replies] == [500, 503, 500, 503]
    assert {json.loads(raw)["error"]["type"] for _, _, raw in replies} == {"server_error"}


async def test_faults_are_reproducible_from_the_seed() -> None:
    runs = []
    for seed in (7, 7, 8):
        async with simulator(error_rate=0.5, seed=seed) as client:
            runs.append([(await client.post())[0] for _ in range(12)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert set(runs[0]) == {200, 500, 503}


async def test_dropped_connection() -> None:
    async with simulator(drop_rate=1.0) as client:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await client.post()
        stats = await client.stats()
    assert stats["dropped"] == 1
    assert stats["by_status"] == {}
    assert stats["per_key"][LABEL]["ok"] == 0


async def test_malformed_body() -> None:
    async with simulator(malformed_rate=1.0) as client:
        status, headers, raw = await client.post()
        stats = await client.stats()
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)
    assert stats["by_status"] == {"200": 1}
    assert stats["per_key"][LABEL]["ok"] == 0  # the client got nothing usable


async def test_no_usage() -> None:
    async with simulator(no_usage_rate=1.0) as client:
        reply = await client.ok()
    assert "usage" not in reply
    assert reply["choices"][0]["finish_reason"] == "stop"


async def test_latency_and_slow_answers() -> None:
    async with simulator(latency_s=0.05, slow_rate=1.0, slow_s=0.2) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await client.ok()
        assert loop.time() - started >= 0.25
        timeout = aiohttp.ClientTimeout(total=0.05)
        with pytest.raises(TimeoutError):
            async with client.session.post(
                f"{client.base_url}/chat/completions",
                json=chat(),
                headers={"Authorization": f"Bearer {KEY}"},
                timeout=timeout,
            ):
                pass
        await asyncio.sleep(0.3)
        stats = await client.stats()
    assert stats["client_gone"] == 1
    assert stats["per_key"][LABEL]["ok"] == 1


# -- stats ---------------------------------------------------------------------------


async def test_stats_counters_and_labels() -> None:
    keys = {KEY: "alpha", "sk-beta-secret-key": "beta"}
    async with simulator(keys=keys) as client:
        for rid, tenant, key in [
            ("r1", "alpha", KEY),
            ("r1", "alpha", KEY),
            ("r2", "beta", KEY),  # the header names another tenant than the key's
            ("r3", "beta", "sk-beta-secret-key"),
        ]:
            await client.ok(key=key, headers={"X-Client-Request-Id": rid, "X-Tenant-ID": tenant})
        await client.ok()  # no headers: no mismatch, nothing per id
        status, _, _ = await client.post(key="sk-intruder", headers={"X-Client-Request-Id": "r4"})
        stats = await client.stats()
        brief = await client.stats("?brief=1")
    assert status == 401
    assert brief == {k: v for k, v in stats.items() if k != "client_request_ids"}
    assert stats["requests"] == 6
    assert stats["by_status"] == {"200": 5, "401": 1}
    assert stats["tenant_mismatch"] == 1
    assert stats["client_request_ids"] == {
        "r1": {"received": 2, "ok": 2},
        "r2": {"received": 1, "ok": 1},
        "r3": {"received": 1, "ok": 1},
        "r4": {"received": 1, "ok": 0},
    }
    assert stats["per_tenant_header"] == {
        "alpha": {"requests": 2, "ok": 2},
        "beta": {"requests": 2, "ok": 2},
    }
    assert set(stats["per_key"]) == {"alpha", "beta"}
    assert stats["per_key"]["alpha"]["ok"] == 4
    assert stats["per_key"]["alpha"]["prompt_tokens"] == 4 * 22
    assert stats["max_window_requests"] == {"alpha": 4, "beta": 1}
    assert set(stats["first_ok_at"]) == set(stats["last_ok_at"]) == {"alpha", "beta"}
    assert stats["first_ok_at"]["alpha"] <= stats["last_ok_at"]["alpha"]
    dumped = json.dumps(stats)
    assert KEY not in dumped
    assert "sk-beta-secret-key" not in dumped
    assert "sk-intruder" not in dumped


async def test_labels_of_unlisted_keys_never_show_the_key() -> None:
    async with simulator() as client:
        for key in (KEY, "abcd", "xyz", "k"):
            await client.ok(key=key)
        stats = await client.stats()
    assert set(stats["per_key"]) == {key_label(key) for key in (KEY, "abcd", "xyz", "k")}
    assert len(stats["per_key"]) == 4
    for key in (KEY, "abcd", "xyz"):
        assert key not in json.dumps(stats["per_key"])


async def test_models_and_repr() -> None:
    async with running_simulator(SimulatorConfig(rpm=5)) as sim:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{sim.base_url}/models") as response:
                models = await response.json()
            await Client(session, sim.base_url).ok()
        assert sim.base_url == f"http://127.0.0.1:{sim.port}/v1"
        assert sim.stats()["requests"] == 1
        assert "requests=1" in repr(sim)
        assert "rpm=5" in repr(sim)
    assert {"gpt-4.1", "deepseek-v3.2"} <= {m["id"] for m in models["data"]}


@pytest.mark.parametrize(
    "bad",
    [
        {"error_rate": 1.5},
        {"retry_after": "never"},
        {"refuse": {"k": 404}},
        {"rpm": 0},
        {"tpm": -1},
        {"window_s": 0.0},
    ],
)
def test_config_is_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        SimulatorConfig(**bad)


# -- thread mode ---------------------------------------------------------------------


def test_simulator_thread_from_sync_code() -> None:
    with SimulatorThread(SimulatorConfig(keys={KEY: "alpha"})) as sim:
        request = urllib.request.Request(
            f"{sim.base_url}/chat/completions",
            data=json.dumps(chat()).encode(),
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            reply = json.load(response)
        with urllib.request.urlopen(f"http://127.0.0.1:{sim.port}/stats", timeout=5) as response:
            over_http = json.load(response)
        stats = sim.stats()
        url = sim.base_url
    assert reply["usage"]["prompt_tokens"] == 22
    assert stats == over_http
    assert stats["per_key"]["alpha"]["ok"] == 1
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/models", timeout=2)
