"""Typed records passed between the stages of a run.

Every arrow in the data flow (source -> validate -> store -> lane -> store -> sink)
carries one of these frozen, slotted dataclasses; no stage passes dicts of its own
invention to another. Money is integer micro-dollars (1 USD = 1_000_000).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    """Where one request row stands (see DESIGN.md, "State model")."""

    PENDING = "pending"
    SENT = "sent"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"
    DEFERRED = "deferred"


@dataclass(frozen=True, slots=True)
class InputRow:
    """One row as a source read it, before anything is checked.

    `fields` holds the row's values under the job's mapped names (`id`, `tenant`,
    `prompt`, `messages`, `model`, ...), or for OpenAI-batch input the line's
    `custom_id`, `tenant`, `method`, `url` and `body`. `where` is the "file:line"
    or "file:row N" an error should name. `problem` is set when the row could not
    even be parsed (not JSON, not UTF-8, ...): it becomes a rejection.
    """

    seq: int
    where: str
    fields: dict[str, Any]
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class Request:
    """A validated row, ready to be registered and sent.

    `body` is the complete chat-completions payload (with `model`); `tpm_cost`
    is the estimated prompt tokens plus `max_tokens`, what the TPM limiter charges.
    """

    seq: int
    row_id: str
    tenant: str
    model: str
    where: str
    body: dict[str, Any]
    prompt_tokens_estimate: int
    max_tokens: int

    @property
    def tpm_cost(self) -> int:
        return self.prompt_tokens_estimate + self.max_tokens


@dataclass(frozen=True, slots=True)
class Rejection:
    """A row that is never sent; it ends as a `rejected` output row with `error`."""

    seq: int
    row_id: str
    tenant: str
    model: str
    where: str
    error: str


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage as the provider reported it.

    `cached_tokens` are part of `prompt_tokens`; `reasoning_tokens` are part of
    `completion_tokens` (the OpenAI convention).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful chat completion, as the provider client returns it."""

    content: str | None
    finish_reason: str | None
    usage: Usage | None
    body: bytes
    latency_ms: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one request ended in this run; the store records it in a batch.

    `usage` is None when the request was not answered, or when the provider
    answered without a `usage` object (cost unknown, never silently zero).
    """

    seq: int
    status: Status
    attempts: int
    response: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    cost_micros: int | None = None
    latency_ms: int | None = None
    error: str | None = None
    raw_body: str | None = None


@dataclass(frozen=True, slots=True)
class CarriedColumns:
    """An input batch's pass-through columns as the state database keeps them:
    Arrow IPC bytes that only the registering and output-writing code decodes
    (`runner.carried_columns`), so a process that only sends never imports pyarrow."""

    num_rows: int
    schema: bytes  # an Arrow schema message
    data: bytes  # an Arrow IPC stream of one record batch
