"""`InputRow` -> `Request` or `Rejection`: everything a row must satisfy before
it may be sent.

A row is rejected (and the rest of the file runs) when it is malformed, names an
unknown tenant, asks for a model outside its tenant's `allowed_models`, or could
never fit its tenant's TPM limit. A model that has no
price is different: it is a `ConfigError` for the whole submit, because the run
could not account for its money (a price of zero is never assumed).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from runner.config import InputFormat, Job
from runner.errors import ConfigError, InputError
from runner.pricing import Price
from runner.records import InputRow, Rejection, Request
from runner.sources import SourceBatch, detect_format, open_source
from runner.tokens import prompt_tokens

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_CHAT_PATH = "/chat/completions"


def input_format(job: Job, files: Sequence[Path]) -> InputFormat:
    """The input's format, as `[input] format` says or the file names show; one
    run reads one format."""
    if job.input.format != "auto":
        return job.input.format
    kinds = {path: detect_format(path) for path in files}
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{path.name} ({kind})" for path, kind in kinds.items())
        raise InputError(f"{job.job.input}: the input files mix formats: {listing}")
    return next(iter(kinds.values()))


def check_input(
    job: Job, prices: Mapping[str, Price], files: Sequence[Path]
) -> Iterator[tuple[SourceBatch, list[Request | Rejection]]]:
    """Stream the input files: each batch with its rows checked, in input order,
    rows numbered on across files."""
    validator = Validator(job, prices)
    mapping = job.input.model_copy(update={"format": input_format(job, files)})
    seq = 0
    for path in files:
        for batch in open_source(path, mapping, start_seq=seq):
            yield batch, [validator.check(row) for row in batch.rows]
            seq = batch.rows[-1].seq + 1


class _Bad(Exception):
    """A row problem, raised inside this module and turned into a `Rejection`."""


class Validator:
    """Checks rows against one job's tenants, defaults and prices."""

    __slots__ = ("_job", "_prices")

    def __init__(self, job: Job, prices: Mapping[str, Price]) -> None:
        self._job = job
        self._prices = prices

    def check(self, row: InputRow) -> Request | Rejection:
        fields = row.fields
        raw_id = fields.get("custom_id" if fields.get("batch") else "id")
        row_id = _row_id(raw_id, row.seq)
        raw_tenant = fields.get("tenant")
        tenant = str(self._job.job.default_tenant or "" if raw_tenant is None else raw_tenant)
        model = ""
        try:
            if row.problem:
                raise _Bad(row.problem)
            if raw_id is not None and not _is_id(raw_id):
                raise _Bad(f"the id must be a string or an integer, not {_kind(raw_id)}")
            if raw_tenant is not None and not isinstance(raw_tenant, str):
                raise _Bad(f"'tenant' must be a string, not {_kind(raw_tenant)}")
            body = self._batch_body(fields) if fields.get("batch") else self._table_body(fields)
            model = body["model"]
            if model not in self._prices:
                raise ConfigError(
                    f"{row.where}: model {model!r} has no price; add "
                    f'[prices."{model}"] with input, cached_input and output (USD per '
                    "million tokens) to the job or tenants file"
                )
            if not tenant:
                raise _Bad("no tenant: the row has none and the job sets no default_tenant")
            if tenant not in self._job.tenants:
                raise _Bad(f"unknown tenant {tenant!r} (known: {_some(self._job.tenants)})")
            allowed = self._job.tenants[tenant].allowed_models
            if allowed is not None and model not in allowed:
                raise _Bad(
                    f"model {model!r} is not allowed for tenant {tenant!r} "
                    f"(allowed: {', '.join(allowed) or 'none'})"
                )
            max_tokens = _max_tokens(body)
            estimate = prompt_tokens(body)
            tpm = self._job.tenants[tenant].tpm
            if estimate + max_tokens > tpm:
                raise _Bad(
                    f"needs about {estimate + max_tokens} tokens (prompt {estimate} + "
                    f"max_tokens {max_tokens}) but tenant {tenant!r} allows {tpm} per minute"
                )
        except _Bad as problem:
            return Rejection(row.seq, row_id, tenant, model, row.where, f"{row.where}: {problem}")
        return Request(row.seq, row_id, tenant, model, row.where, body, estimate, max_tokens)

    def _table_body(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        defaults = self._job.defaults
        messages = _messages(fields)
        system = fields.get("system", defaults.system)
        if system is not None:
            if not isinstance(system, str):
                raise _Bad(f"'system' must be a string, not {_kind(system)}")
            if messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": system})
        body: dict[str, Any] = {
            "model": _model(fields.get("model", defaults.model)),
            "messages": messages,
            "max_tokens": fields.get("max_tokens", defaults.max_tokens),
        }
        temperature = fields.get("temperature", defaults.temperature)
        if temperature is not None:
            if isinstance(temperature, bool) or not isinstance(temperature, int | float):
                raise _Bad(f"'temperature' must be a number, not {_kind(temperature)}")
            if not 0 <= temperature <= 2 or math.isnan(temperature):
                raise _Bad(f"'temperature' must be between 0 and 2, not {temperature}")
            body["temperature"] = temperature
        return body

    def _batch_body(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        if "custom_id" not in fields:
            raise _Bad("missing 'custom_id'")
        method = fields.get("method", "POST")
        if str(method).upper() != "POST":
            raise _Bad(f"method {method!r}: only POST is supported")
        url = str(fields.get("url", _CHAT_PATH))
        if not url.rstrip("/").endswith(_CHAT_PATH):
            raise _Bad(f"url {url!r}: only /v1/chat/completions is supported")
        body = fields.get("body")
        if not isinstance(body, dict):
            raise _Bad(f"'body' must be an object, not {_kind(body)}")
        body = dict(body)
        body["messages"] = _checked_messages(body.get("messages"))
        body["model"] = _model(body.get("model", self._job.defaults.model))
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = self._job.defaults.max_tokens
        return body


def _messages(fields: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Messages from a `messages` column, else from `prompt`: a string is one user
    message, a list of strings (e.g. MT-Bench `turns`) consecutive user messages."""
    if "messages" in fields:
        return _checked_messages(fields["messages"])
    prompt = fields.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(turn, str) for turn in prompt):
        return [{"role": "user", "content": turn} for turn in prompt]
    if prompt is None:
        raise _Bad("missing 'prompt' (or 'messages')")
    raise _Bad(f"'prompt' must be a non-empty string or list of strings, not {_kind(prompt)}")


def _checked_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise _Bad(f"'messages' must be a non-empty list, not {_kind(messages)}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _Bad(f"messages[{index}] must be an object, not {_kind(message)}")
        if message.get("role") not in _ROLES:
            raise _Bad(f"messages[{index}] has role {message.get('role')!r}")
        content = message.get("content")
        if not (content is None or isinstance(content, str | list)):
            raise _Bad(f"messages[{index}].content must be text or parts, not {_kind(content)}")
        checked.append(dict(message))
    return checked


def _model(model: Any) -> str:
    if model is None:
        raise _Bad("no model: set [defaults] model or give the row a model")
    if not isinstance(model, str) or not model:
        raise _Bad(f"'model' must be a non-empty string, not {_kind(model)}")
    return model


def _max_tokens(body: Mapping[str, Any]) -> int:
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _Bad(f"{key!r} must be a positive integer, not {value!r}")
    return value


def _row_id(value: Any, seq: int) -> str:
    """The row's id as text; a row without one is named by its position."""
    if value is None or value == "":
        return f"row-{seq + 1}"
    return value if isinstance(value, str) else str(value)


def _is_id(value: Any) -> bool:
    return isinstance(value, str | int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _some(names: Mapping[str, Any], limit: int = 8) -> str:
    shown = sorted(names)[:limit]
    return ", ".join(shown) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
