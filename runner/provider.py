"""`ProviderClient`: one keep-alive `aiohttp.ClientSession`, one method that sends a
chat-completions request with its tenant's key and returns a `Reply` or raises
one of our `ProviderError`s.

This is the only module that sees aiohttp or provider JSON errors; everything is
translated here, once (the error tree is in `runner/errors.py`):

- 200 with a well-formed body -> `Reply`; a body that is not a chat completion
  -> `Retryable` (a proxy's HTML page or a truncated answer is usually transient);
- 429 -> `RateLimited` with the server's hint (`runner.retry.parse_retry_after`);
- 408, 409 and 5xx, timeouts, resets, refused connections -> `Retryable`;
- 401, 402, 403 -> `TenantRefused`; any other 4xx -> `RequestRejected` with the
  provider's own message.

Error texts name the tenant and the status, never the key; they quote at most
300 characters of the provider's message.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any, TypeGuard

import aiohttp

from runner.errors import (
    RateLimited,
    RequestRejected,
    Retryable,
    TenantRefused,
)
from runner.records import Reply, Usage
from runner.retry import parse_retry_after
from runner.secrets import Secret, redact

_RETRYABLE_4XX = frozenset({408, 409})
_REFUSED = frozenset({401, 402, 403})
_QUOTE_CHARS = 300


class ProviderClient:
    """Sends requests to `base_url` + `/chat/completions` over one connection pool."""

    __slots__ = ("_session", "_url", "sent")

    def __init__(self, base_url: str, *, timeout_s: float, pool_size: int) -> None:
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=pool_size, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            headers={"Content-Type": "application/json", "User-Agent": "runner/0.1"},
        )
        self.sent = 0

    async def aclose(self) -> None:
        await self._session.close()

    def __repr__(self) -> str:
        return f"ProviderClient({self._url!r}, sent={self.sent})"

    async def send(self, body: bytes, *, tenant: str, key: Secret | None, request_id: str) -> Reply:
        """One attempt. `request_id` goes out as `X-Client-Request-Id` so that a
        provider's logs (and the simulator's `/stats`) can tell resends apart."""
        headers = {"X-Tenant-ID": tenant, "X-Client-Request-Id": request_id}
        if key is not None:
            headers["Authorization"] = f"Bearer {key.reveal()}"
        started = time.monotonic()
        self.sent += 1
        try:
            async with self._session.post(self._url, data=body, headers=headers) as response:
                payload = await response.read()
                status = response.status
                response_headers = response.headers
        except TimeoutError:
            raise Retryable(
                f"tenant {tenant!r}: no answer within the timeout", tenant=tenant
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
            message = f"tenant {tenant!r}: connection failed: {reason}"
            raise Retryable(message, tenant=tenant) from None
        latency_ms = int((time.monotonic() - started) * 1000)
        if status == 200:
            return _reply(payload, tenant=tenant, latency_ms=latency_ms, key=key)
        raise _error(status, payload, response_headers, tenant=tenant, key=key)


def _reply(payload: bytes, *, tenant: str, latency_ms: int, key: Secret | None) -> Reply:
    try:
        data = json.loads(payload)
        choice = data["choices"][0]
        message = choice.get("message") or {}
        content = message.get("content")
        finish_reason = choice.get("finish_reason")
        if content is not None and not isinstance(content, str):
            content = json.dumps(content, ensure_ascii=False)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise Retryable(
            f"tenant {tenant!r}: HTTP 200 but the body is not a chat completion: "
            f"{_quote(payload, key)}",
            tenant=tenant,
            status=200,
        ) from None
    return Reply(content, finish_reason, _usage(data.get("usage")), payload, latency_ms)


def _usage(raw: Any) -> Usage | None:
    """The `usage` object, or None when the provider sent none we can trust."""
    if not isinstance(raw, Mapping):
        return None
    prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
    if not (_is_count(prompt) and _is_count(completion)):
        return None
    cached = _detail(raw, "prompt_tokens_details", "cached_tokens")
    reasoning = _detail(raw, "completion_tokens_details", "reasoning_tokens")
    return Usage(prompt, completion, cached, reasoning)


def _detail(usage: Mapping[str, Any], group: str, name: str) -> int:
    details = usage.get(group)
    value = details.get(name) if isinstance(details, Mapping) else None
    return value if _is_count(value) else 0


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _error(
    status: int, payload: bytes, headers: Mapping[str, str], *, tenant: str, key: Secret | None
) -> Exception:
    text = f"tenant {tenant!r}: HTTP {status}: {_quote(payload, key)}"
    if status == 429:
        return RateLimited(text, tenant=tenant, retry_after=parse_retry_after(headers))
    if status in _REFUSED:
        return TenantRefused(text, tenant=tenant, status=status)
    if status >= 500 or status in _RETRYABLE_4XX:
        return Retryable(text, tenant=tenant, status=status)
    return RequestRejected(text, tenant=tenant, status=status)


def _quote(payload: bytes, key: Secret | None) -> str:
    """The provider's error message if the body has one, else the start of the
    body; the key blanked out wherever the provider echoed it."""
    try:
        data = json.loads(payload)
        message = data["error"]["message"] if isinstance(data["error"], dict) else data["error"]
        text = str(message)
    except (ValueError, KeyError, TypeError):
        text = payload.decode("utf-8", "replace").strip() or "(empty body)"
    text = redact(text, key)
    return text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS] + "..."
