"""The prompt-token estimate shared by the TPM limiter, validation and the budget.

The estimate must never count fewer tokens than a provider will: a TPM limiter
that undercounts trips the provider's limit, and a budget reservation that
undercounts can overspend. Without the provider's tokenizer we bound it from
above, class by class, on the way byte-pair tokenizers split text:

- a run of ASCII letters costs at most ceil(n / 4) tokens (common words are one
  token, rare words split into pieces of three or four letters);
- a run of digits costs ceil(n / 3) (numbers are split into groups of three);
- every other visible character (punctuation, CJK, Cyrillic, ...) costs one
  token, characters outside the Basic Multilingual Plane (emoji, rare CJK) two:
  CJK text is about one token per character, not one per four;
- each run of line breaks costs one; spaces merge into the following word.

Chat framing adds `PER_MESSAGE` tokens per message and `REPLY_PRIMING` per
request (OpenAI documents 3 and 3; we round up to 4 and 3).

The bound on letter runs uses sum(ceil(n_i / 4)) <= (letters + 3 * runs) / 4,
so the estimate needs only character counts, which regex `subn` gives at C speed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

PER_MESSAGE = 4
PER_NAME = 1
REPLY_PRIMING = 3

_LETTER_RUN = re.compile(r"[A-Za-z]+")
_DIGIT_RUN = re.compile(r"[0-9]+")
_LINE_BREAKS = re.compile(r"[\r\n]+")
_SPACE = re.compile(r"\s+")
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")

# Request keys whose values reach the model as text (tools, schemas, ...): we
# charge their JSON form. Sampling knobs such as temperature cost nothing.
_FREE_KEYS = frozenset(
    {
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature",
        "top_p", "n", "stream", "stop", "seed", "presence_penalty", "frequency_penalty",
        "logit_bias", "user", "logprobs", "top_logprobs", "store", "metadata",
        "service_tier", "parallel_tool_calls", "reasoning_effort",
    }
)  # fmt: skip


def text_tokens(text: str) -> int:
    """Upper bound of the tokens `text` costs (see the module docstring)."""
    if not text:
        return 0
    without_letters, letter_runs = _LETTER_RUN.subn("", text)
    letters = len(text) - len(without_letters)
    rest, digit_runs = _DIGIT_RUN.subn("", without_letters)
    digits = len(without_letters) - len(rest)
    line_breaks = len(_LINE_BREAKS.findall(rest)) if "\n" in rest or "\r" in rest else 0
    visible = len(_SPACE.sub("", rest))
    astral = len(_ASTRAL.findall(rest)) if not rest.isascii() else 0
    return (
        -(-(letters + 3 * letter_runs) // 4)
        + -(-(digits + 2 * digit_runs) // 3)
        + visible
        + astral
        + line_breaks
    )


def content_tokens(content: Any) -> int:
    """Tokens of a message's `content`: a string, or a list of content parts."""
    if content is None:
        return 0
    if isinstance(content, str):
        return text_tokens(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                total += text_tokens(str(part.get("text", "")))
            else:
                total += text_tokens(json.dumps(part, ensure_ascii=False))
        return total
    return text_tokens(json.dumps(content, ensure_ascii=False))


def messages_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    """Tokens of a chat conversation, framing included."""
    total = REPLY_PRIMING
    for message in messages:
        total += PER_MESSAGE + content_tokens(message.get("content"))
        if message.get("name"):
            total += PER_NAME + text_tokens(str(message["name"]))
        if message.get("tool_calls"):
            total += text_tokens(json.dumps(message["tool_calls"], ensure_ascii=False))
    return total


def prompt_tokens(body: Mapping[str, Any]) -> int:
    """Estimated prompt tokens of a chat-completions request body."""
    total = messages_tokens(body.get("messages") or [])
    for key, value in body.items():
        if key not in _FREE_KEYS:
            total += text_tokens(json.dumps(value, ensure_ascii=False))
    return total
