"""The bundled OpenAI-compatible fake provider: a real aiohttp server on loopback.

It lets the demo run with no account and gives the test suite something strict
to talk real HTTP to. It owns the wire protocol of POST `/v1/chat/completions`,
per-key sliding-window RPM/TPM with 429 hints, seeded fault injection and the
`/stats` witness; it knows nothing of jobs, budgets or the store.

Token counts follow a rule that the runner's estimate (`runner/tokens.py`) bounds
from above, so a client budgeting with that estimate never overshoots: a run of
n ASCII letters costs ceil(n / 6), a run of m digits ceil(m / 3), any other
visible character 1, whitespace 0; prompt_tokens = 3 + sum over messages of
(3 + content + 1 if named). A request's TPM cost is that plus its completion
limit (`max_tokens` / `max_completion_tokens`, 16 when neither is given).

Limits are an exact sliding window on the loop clock: a request at time t is
admitted iff (admitted in (t - window_s, t]) + 1 <= rpm and their cost plus its
own <= tpm. A 429 is not admitted; its hint is the time until enough admitted
entries leave the window, so a client that waits that long is then admitted.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import math
import random
import re
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NoReturn

from aiohttp import web

from runner import eventloop

RETRY_AFTER_FORMS = frozenset({"seconds", "fractional", "http-date", "reset-duration", "none"})
MODELS = ("gpt-4.1", "claude-sonnet-4.5", "gemini-2.5-flash", "deepseek-v3.2")
DEFAULT_COMPLETION_LIMIT = 16
_TOKEN = re.compile(r"([A-Za-z]+)|([0-9]+)|\S")
_VOCAB = (
    "the",
    "batch",
    "model",
    "answer",
    "token",
    "queue",
    "window",
    "steady",
    "simulated",
    "reply",
    "result",
    "limit",
    "fair",
    "tenant",
    "runner",
    "quiet",
    "request",
    "data",
    "value",
    "prompt",
    "a",
    "of",
    "and",
    "every",
    "stable",
    "checkpoint",
)
_REFUSALS = {
    401: ("authentication_error", "invalid_api_key"),
    402: ("insufficient_quota", "insufficient_quota"),
    403: ("permission_error", "access_denied"),
}
_RATES = ("error_rate", "drop_rate", "slow_rate", "malformed_rate", "no_usage_rate")
_PER_KEY = ("requests", "ok", "rate_limited", "prompt_tokens", "completion_tokens")
_PER_LABEL = ("max_window_requests", "max_window_tokens", "first_ok_at", "last_ok_at")


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulatorConfig:
    """How the fake provider behaves; `*_rate` are fractions of requests in [0, 1].

    Faults are drawn from `random.Random(seed)`, six numbers per admitted request,
    so the same arrivals meet the same faults on every run.
    """

    latency_s: float = 0.0
    latency_jitter_s: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    window_s: float = 60.0
    keys: Mapping[str, str] | None = None
    error_rate: float = 0.0
    drop_rate: float = 0.0
    slow_rate: float = 0.0
    slow_s: float = 30.0
    malformed_rate: float = 0.0
    no_usage_rate: float = 0.0
    refuse: Mapping[str, int] = field(default_factory=dict)
    refuse_after: int = 0  # keys in `refuse` are answered normally this many times first
    troubled: Mapping[str, int] = field(default_factory=dict)  # key -> 429 or 5xx, every time
    retry_after: str = "seconds"
    cached_fraction: float = 0.0
    reasoning_tokens: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (*_RATES, "cached_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"simulator {name} must lie in [0, 1]")
        if self.retry_after not in RETRY_AFTER_FORMS:
            raise ValueError(f"retry_after must be one of {sorted(RETRY_AFTER_FORMS)}")
        if any(status != 429 and not 500 <= status < 600 for status in self.troubled.values()):
            raise ValueError("troubled statuses must be 429 or 5xx")
        if any(status not in _REFUSALS for status in self.refuse.values()):
            raise ValueError("refuse statuses must be 401, 402 or 403")
        limits = [limit for limit in (self.rpm, self.tpm) if limit is not None]
        if min(limits, default=1) < 1 or self.window_s <= 0:
            raise ValueError("rpm, tpm and window_s must be positive (rpm/tpm None = no limit)")


def key_label(key: str) -> str:
    """How /stats names a key it has no tenant for: a short hash, distinct per key
    and never the key itself."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:10]


def sim_tokens(text: str) -> int:
    """Tokens of `text` under the simulator's rule (see the module docstring)."""
    total = 0
    for match in _TOKEN.finditer(text):
        letters, digits = match.group(1), match.group(2)
        total += -(-len(letters) // 6) if letters else -(-len(digits) // 3) if digits else 1
    return total


_VOCAB_TOKENS = {word: sim_tokens(word) for word in _VOCAB}  # the same capitalised


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Prompt tokens as the simulator reports them; list content counts "text" parts only."""
    total = 3
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = (p for p in content if isinstance(p, dict) and p.get("type") == "text")
            content = " ".join(p["text"] for p in parts if isinstance(p.get("text"), str))
        total += 3 + (sim_tokens(content) if isinstance(content, str) else 0)
        total += 1 if message.get("name") else 0
    return total


def _answer(model: str, messages: list[dict[str, Any]], limit: int | None) -> tuple[str, bool, int]:
    """A reply of 5..120 words picked by a sha256 of the model and the last user message.

    Cut to whole words within `limit` sim tokens; returns (content, was it cut,
    its sim tokens).
    """
    last = ([m for m in messages if m.get("role") == "user"] or messages)[-1].get("content")
    digest = hashlib.sha256(json.dumps([model, last], sort_keys=True).encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    words = rng.choices(_VOCAB, k=5 + digest[8] % 116)
    pieces: list[str] = []
    used = sentence_left = 0
    for i, word in enumerate(words):
        tokens = _VOCAB_TOKENS[word]
        if sentence_left == 0:
            word, sentence_left = word.capitalize(), rng.randint(4, 12)
        sentence_left -= 1
        if sentence_left == 0 or i == len(words) - 1:
            word, tokens = word + ".", tokens + 1
        if limit is not None and used + tokens > limit:
            return " ".join(pieces), True, used
        pieces.append(word)
        used += tokens
    return " ".join(pieces), False, used


def _error(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _duration(seconds: float) -> str:
    """The x-ratelimit-reset-* form, rounded up: "250ms" below a second, else "1m30s"."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "") + f"{secs}s"


@dataclass(slots=True)
class _KeyStats:
    requests: int = 0
    ok: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    max_window_requests: int = 0
    max_window_tokens: int = 0
    first_ok_at: float | None = None
    last_ok_at: float | None = None


class _Window:
    """The admitted (time, cost) entries of one key still inside the sliding window."""

    __slots__ = ("entries", "tokens")

    def __init__(self) -> None:
        self.entries: deque[tuple[float, int]] = deque()
        self.tokens = 0

    def waits(self, now: float, cfg: SimulatorConfig, cost: int) -> tuple[float, float]:
        """Seconds until the request and the token limit would admit `cost`; (0, 0) = now.

        An entry stamped t leaves at t + window_s. For RPM the k-th oldest must leave,
        k = len + 1 - rpm; for TPM the oldest leave until the rest plus `cost` fit. A
        cost above tpm never fits, and is told to wait one whole window.
        """
        while self.entries and now - self.entries[0][0] >= cfg.window_s:
            self.tokens -= self.entries.popleft()[1]
        req_wait = tok_wait = 0.0
        if cfg.rpm is not None and len(self.entries) >= cfg.rpm:
            req_wait = self.entries[len(self.entries) - cfg.rpm][0] + cfg.window_s - now
        if cfg.tpm is not None and self.tokens + cost > cfg.tpm:
            tok_wait, left = cfg.window_s, self.tokens
            for stamp, spent in self.entries if cost <= cfg.tpm else ():
                left -= spent
                if left + cost <= cfg.tpm:
                    tok_wait = stamp + cfg.window_s - now
                    break
        return req_wait, tok_wait

    def admit(self, now: float, cost: int, stats: _KeyStats) -> None:
        self.entries.append((now, cost))
        self.tokens += cost
        stats.max_window_requests = max(stats.max_window_requests, len(self.entries))
        stats.max_window_tokens = max(stats.max_window_tokens, self.tokens)


class _State:
    """Counters and windows of one server. Lives on its loop; never shows a key."""

    __slots__ = ("by_status", "config", "counts", "ids", "per_key", "rng", "tenants", "windows")

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.counts: Counter[str] = Counter()  # requests, dropped, tenant_mismatch, ...
        self.by_status: Counter[str] = Counter()
        self.per_key: dict[str, _KeyStats] = {}
        self.tenants: dict[str, Counter[str]] = {}
        self.ids: dict[str, Counter[str]] = {}
        self.windows: dict[str, _Window] = {}

    def __repr__(self) -> str:
        c = self.config
        return (
            f"<simulator requests={self.counts['requests']} keys={len(self.windows)}"
            f" rpm={c.rpm} tpm={c.tpm} window_s={c.window_s}>"
        )

    def label(self, key: str) -> str:
        """The key's tenant when known, else `key_label(key)`."""
        if self.config.keys is not None and key in self.config.keys:
            return self.config.keys[key]
        return key_label(key)

    def reply(
        self, status: int, payload: Any, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        self.by_status[str(status)] += 1
        return web.json_response(payload, status=status, headers=headers)

    def snapshot(self, *, with_ids: bool = True) -> dict[str, Any]:
        """What the server saw, as plain JSON-ready dicts keyed by key label;
        `with_ids=False` leaves out the (large) map of client request ids."""
        per_key = self.per_key.items()
        snapshot = {
            **{name: self.counts[name] for name in ("requests", "dropped", "client_gone")},
            "tenant_mismatch": self.counts["tenant_mismatch"],
            "by_status": dict(self.by_status),
            "per_key": {k: {f: getattr(s, f) for f in _PER_KEY} for k, s in per_key},
            "per_tenant_header": {
                t: {"requests": c["requests"], "ok": c["ok"]} for t, c in self.tenants.items()
            },
            **{f: {k: getattr(s, f) for k, s in per_key} for f in _PER_LABEL},
        }
        if with_ids:
            snapshot["client_request_ids"] = {
                i: {"received": c["received"], "ok": c["ok"]} for i, c in self.ids.items()
            }
        return snapshot

    def rate_limited(self, req_wait: float, tok_wait: float) -> web.Response:
        """A 429 whose hint, in the configured form, is never earlier than the window allows."""
        form, wait = self.config.retry_after, max(req_wait, tok_wait)
        headers: dict[str, str] = {}
        if form == "seconds":
            headers["Retry-After"] = str(math.ceil(wait))
        elif form == "fractional":
            headers["Retry-After"] = f"{math.ceil(wait * 1000) / 1000:.3f}"
        elif form == "http-date":  # whole seconds only, so round the instant up
            when = math.ceil(time.time() + wait)
            headers["Retry-After"] = email.utils.formatdate(when, usegmt=True)
        elif form == "reset-duration":
            if self.config.rpm is not None:
                headers["x-ratelimit-reset-requests"] = _duration(req_wait)
            if self.config.tpm is not None:
                headers["x-ratelimit-reset-tokens"] = _duration(tok_wait)
        which = "requests" if req_wait >= tok_wait else "tokens"
        message = f"Rate limit reached for {which} per {self.config.window_s:g}s window."
        body = _error(message, "rate_limit_exceeded", "rate_limit_exceeded")
        return self.reply(429, body, headers)


_STATE = web.AppKey("simulator_state", _State)


def _parse(raw: bytes) -> tuple[dict[str, Any], int | None] | str:
    """(body, completion limit) of a well-formed request, else what is wrong with it."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return "We could not parse the JSON body of your request."
    if not isinstance(body, dict):
        return "The request body must be a JSON object."
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "You must provide a model parameter."
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array."
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        return "Every message must be an object with a 'role'."
    if body.get("stream"):
        return "stream=true is not supported by the simulator."
    limits = [body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None]
    if any(type(v) is not int or v < 1 for v in limits):
        return "max_tokens and max_completion_tokens must be positive integers."
    return body, min(limits, default=None)


def _hang_up(request: web.Request) -> NoReturn:
    """Close the connection unanswered; raising CancelledError is how aiohttp itself
    ends a handler whose client is gone, so nothing is written or logged as an error."""
    if request.transport is not None:
        request.transport.close()
    raise asyncio.CancelledError


async def _chat(request: web.Request) -> web.Response:
    """POST /v1/chat/completions: auth, validation, limits, then the seeded faults."""
    state, cfg = request.app[_STATE], request.app[_STATE].config
    state.counts["requests"] += 1
    seq = state.counts["requests"]
    rid, tenant = request.headers.get("X-Client-Request-Id"), request.headers.get("X-Tenant-ID")
    if rid is not None:
        state.ids.setdefault(rid, Counter())["received"] += 1
    if tenant is not None:
        state.tenants.setdefault(tenant, Counter())["requests"] += 1
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        message = "You didn't provide an API key (Authorization: Bearer YOUR_KEY)."
        return state.reply(401, _error(message, "invalid_request_error", "missing_api_key"))
    if key not in cfg.refuse and cfg.keys is not None and key not in cfg.keys:
        message = "Incorrect API key provided."
        return state.reply(401, _error(message, "invalid_request_error", "invalid_api_key"))
    stats = state.per_key.setdefault(state.label(key), _KeyStats())
    stats.requests += 1
    if key in cfg.troubled:
        status = cfg.troubled[key]
        if status == 429:
            stats.rate_limited += 1
            return state.rate_limited(1.0, 0.0)
        return state.reply(status, _error("The server is overloaded.", "server_error"))
    if key in cfg.refuse and stats.ok >= cfg.refuse_after:
        status = cfg.refuse[key]
        message = f"Requests with this API key are refused ({status})."
        return state.reply(status, _error(message, *_REFUSALS[status]))
    if cfg.keys is not None and tenant is not None and tenant != cfg.keys[key]:
        state.counts["tenant_mismatch"] += 1
    parsed = _parse(await request.read())
    if isinstance(parsed, str):
        return state.reply(400, _error(parsed, "invalid_request_error"))
    body, limit = parsed

    prompt = prompt_tokens(body["messages"])
    cost = prompt + (DEFAULT_COMPLETION_LIMIT if limit is None else limit)
    loop = asyncio.get_running_loop()
    window = state.windows.setdefault(key, _Window())
    req_wait, tok_wait = window.waits(loop.time(), cfg, cost)
    if req_wait > 0 or tok_wait > 0:
        stats.rate_limited += 1
        return state.rate_limited(req_wait, tok_wait)
    window.admit(loop.time(), cost, stats)

    # Six draws for every admitted request, so one request's faults never shift another's.
    jitter, drop, error, slow, malformed, no_usage = (state.rng.random() for _ in range(6))
    if drop < cfg.drop_rate:
        state.counts["dropped"] += 1
        _hang_up(request)
    await asyncio.sleep(cfg.latency_s + jitter * cfg.latency_jitter_s)
    if error < cfg.error_rate:
        state.counts["errors"] += 1
        status = 500 if state.counts["errors"] % 2 else 503
        message = "The server had an error." if status == 500 else "The engine is overloaded."
        return state.reply(status, _error(message, "server_error"))
    if slow < cfg.slow_rate:
        await asyncio.sleep(cfg.slow_s)
    if request.transport is None or request.transport.is_closing():
        state.counts["client_gone"] += 1  # it timed out while we waited and saw no answer
        _hang_up(request)

    # Reasoning lives inside the completion limit, as on OpenAI, so usage never
    # exceeds the max_tokens a client reserved budget for.
    reasoning = cfg.reasoning_tokens if limit is None else min(cfg.reasoning_tokens, limit)
    visible = None if limit is None else limit - reasoning
    content, cut, visible_tokens = _answer(body["model"], body["messages"], visible)
    completion = reasoning + visible_tokens
    cached = math.floor(prompt * cfg.cached_fraction)
    payload: dict[str, Any] = {
        "id": f"chatcmpl-sim-{seq:08x}",
        "object": "chat.completion",
        "created": int(time.time()),  # a Unix timestamp by definition, never a duration
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "length" if cut else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        },
    }
    if malformed < cfg.malformed_rate:
        state.by_status["200"] += 1
        text = json.dumps(payload)
        return web.Response(text=text[: len(text) // 2], content_type="application/json")
    if no_usage < cfg.no_usage_rate:
        del payload["usage"]
    stats.ok += 1
    stats.prompt_tokens += prompt
    stats.completion_tokens += completion
    stats.last_ok_at = loop.time()
    stats.first_ok_at = stats.last_ok_at if stats.first_ok_at is None else stats.first_ok_at
    if rid is not None:
        state.ids[rid]["ok"] += 1
    if tenant is not None:
        state.tenants[tenant]["ok"] += 1
    return state.reply(200, payload)


async def _stats(request: web.Request) -> web.Response:
    """GET /stats; `?brief=1` leaves out the per-request-id map, which is large
    after a million requests and slow to serve while a client polls."""
    brief = request.query.get("brief") == "1"
    return web.json_response(request.app[_STATE].snapshot(with_ids=not brief))


async def _models(request: web.Request) -> web.Response:
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "simulator"} for m in MODELS]
    return web.json_response({"object": "list", "data": data})


def build_app(config: SimulatorConfig) -> web.Application:
    """The aiohttp application, with fresh state, windows and fault stream."""
    app = web.Application(client_max_size=32 * 1024 * 1024)
    app[_STATE] = _State(config)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/stats", _stats)
    return app


class Simulator:
    """A running simulator: where to reach it and what it has seen so far."""

    __slots__ = ("_state", "base_url", "port")

    def __init__(self, state: _State, host: str, port: int) -> None:
        self._state, self.port, self.base_url = state, port, f"http://{host}:{port}/v1"

    def __repr__(self) -> str:
        return f"<Simulator {self.base_url} {self._state!r}>"

    def stats(self) -> dict[str, Any]:
        """A snapshot, the same as GET /stats; call it from the server's loop."""
        return self._state.snapshot()


_BACKLOG = 4096  # (Linux caps it at net.core.somaxconn, 4096 by default)


@asynccontextmanager
async def running_simulator(
    config: SimulatorConfig = SimulatorConfig(), *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[Simulator]:
    """Serve on host:port (0 = a free port) in the current loop for the block's duration.

    Shutdown waits at most a second for handlers, so slow answers never hold it up.
    The listen backlog takes a whole pool's connections at once, as a provider's
    does: at the default 128, a client opening 1,000 saw its SYNs dropped,
    retried a second later, and now and then its connections reset.
    """
    app = build_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=_BACKLOG).start()
        yield Simulator(app[_STATE], host, int(runner.addresses[0][1]))
    finally:
        await runner.cleanup()


class SimulatorThread:
    """The simulator on its own loop in a daemon thread, for subprocess tests.

    It outlives a killed client, and `stats()` is safe from any thread because the
    snapshot is taken on the server's loop. `base_url` and `port` are set on enter.
    """

    __slots__ = (
        "_args",
        "_error",
        "_loop",
        "_ready",
        "_sim",
        "_stop",
        "_thread",
        "base_url",
        "port",
    )

    def __init__(
        self, config: SimulatorConfig = SimulatorConfig(), *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._args, self.base_url, self.port = (config, host, port), "", port
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._sim: Simulator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="runner-simulator", daemon=True)

    def __repr__(self) -> str:
        return f"<SimulatorThread {self._sim!r}>"

    def _run(self) -> None:
        try:
            eventloop.run_asyncio(self._main())
        except BaseException as exc:  # re-raised by __enter__ in the caller's thread
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        config, host, port = self._args
        async with running_simulator(config, host=host, port=port) as sim:
            self._sim, self.base_url, self.port = sim, sim.base_url, sim.port
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> SimulatorThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None and self._stop is not None:
            with suppress(RuntimeError):  # the loop has already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def stats(self) -> dict[str, Any]:
        """A snapshot taken on the server's loop, so never of a half-done update."""
        sim, loop = self._sim, self._loop
        if sim is None or loop is None:
            raise RuntimeError("SimulatorThread is not running; use it as a context manager")

        async def snapshot() -> dict[str, Any]:
            return sim.stats()

        return asyncio.run_coroutine_threadsafe(snapshot(), loop).result(timeout=10)


def serve(config: SimulatorConfig, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until Ctrl-C (blocking), after printing one line with the base URL."""

    async def main() -> None:
        async with running_simulator(config, host=host, port=port) as sim:
            print(f"simulator listening on {sim.base_url} (Ctrl-C to stop)", flush=True)
            await asyncio.Event().wait()

    with suppress(KeyboardInterrupt):
        eventloop.run_asyncio(main())
