"""The prompt-token estimate shared by the TPM limiter, validation and the budget.

The estimate must never count fewer tokens than a provider will: a TPM limiter
that undercounts trips the provider's limit, and a budget reservation that
undercounts can overspend. Without the provider's tokenizer we bound it from
above, class by class, on the way byte-pair tokenizers split text:

- a run of ASCII letters costs ceil(n / 4) tokens (common words are one token,
  rare words split into pieces of three or four letters), plus one for each
  switch from lower to upper case (identifiers and base64 split there);
- a run of digits costs ceil(n / 3) (numbers are split into groups of three);
- other ASCII punctuation costs one token a character;
- CJK (Han, kana, Hangul, full-width forms) costs one token a character: about
  what tokenizers spend on CJK, not one per four;
- other characters cost what a byte-level tokenizer spends at worst on scripts
  it has few merges for: one token per UTF-8 byte (Indic, Ethiopic, Georgian,
  math symbols, emoji...), except two-byte letters (Latin with accents, Greek,
  Cyrillic, Hebrew, Arabic), which cost one; combining marks and non-ASCII
  spaces cost their bytes too;
- each run of line breaks costs one, each run of 2+ spaces or tabs ceil(n / 16);
  a single space merges into the following word.

Chat framing adds `PER_MESSAGE` tokens per message and `REPLY_PRIMING` per
request (OpenAI documents 3 and 3; we round up to 4 and 3).

Runs are summed exactly: a looser bound such as (letters + 3 * runs) / 4 would
cost a TPM-bound tenant a quarter of its throughput on prose. Known limit: a long
run of random lower-case letters can cost more than ceil(n / 4).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

PER_MESSAGE = 4
PER_NAME = 1
REPLY_PRIMING = 3
_INDENT_CHARS = 16

# Non-ASCII characters that cost less than their UTF-8 bytes (every other one
# costs exactly its bytes): two-byte characters but for combining marks and
# two-byte spaces cost one, CJK one.
_TWO_BYTES_ONE_TOKEN = re.compile("[\u0080-\u0084\u0086-\u009f\u00a1-\u02ff\u0370-\u07ff]")
_CJK = re.compile("[\u3001-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")


def _byte_map(marked: bytes, mark: bytes) -> bytes:
    """A `bytes.translate` table: bytes in `marked` become `mark`, others a space."""
    return bytes(mark[0] if byte in marked else ord(" ") for byte in range(256))


_LOWER = b"abcdefghijklmnopqrstuvwxyz"
_UPPER = _LOWER.upper()
_LETTERS = _UPPER + _LOWER
_DIGITS = b"0123456789"
_AS_LETTERS = _byte_map(_LETTERS, b"a")
_AS_CASE = bytes(
    ord("l") if byte in _LOWER else ord("U") if byte in _UPPER else ord(" ") for byte in range(256)
)
_AS_DIGITS = _byte_map(_DIGITS, b"0")
_AS_BREAKS = _byte_map(b"\r\n", b"n")
_AS_INDENT = _byte_map(b" \t", b"s")
_NOT_DIGITS = bytes(byte for byte in range(256) if byte not in _DIGITS)
_NOT_VISIBLE = _LETTERS + _DIGITS + b" \t\r\n\x0b\x0c" + bytes(range(0x1C, 0x20))

# Request keys whose values reach the model as text (tools, schemas, ...): we
# charge their JSON form. Sampling knobs such as temperature cost nothing.
_FREE_KEYS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stream",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "user",
        "logprobs",
        "top_logprobs",
        "store",
        "metadata",
        "service_tier",
        "parallel_tool_calls",
        "reasoning_effort",
    }
)


def text_tokens(text: str) -> int:
    """Upper bound of the tokens `text` costs (see the module docstring)."""
    if not text:
        return 0
    if text.isascii():
        return _byte_tokens(text.encode("ascii"))
    # Counted on the UTF-8 bytes, every non-ASCII byte costs one (and breaks letter
    # and digit runs, as a non-ASCII character does); then the cheaper classes
    # get back what they cost less than their bytes.
    tokens = _byte_tokens(text.encode("utf-8", "surrogatepass"))
    return tokens - len(_TWO_BYTES_ONE_TOKEN.findall(text)) - 2 * len(_CJK.findall(text))


def _byte_tokens(raw: bytes) -> int:
    """`text_tokens` of UTF-8 bytes at one token per non-ASCII byte, with byte
    translations instead of regexes (5-10x faster; the registration of a million
    rows estimates every prompt).

    A run of n letters mapped to "a", with "aaa" put after it, holds
    floor((n + 3) / 4) = ceil(n / 4) non-overlapping "aaaa": so counting "aaaa"
    after turning every separator into "aaa " sums ceil(n / 4) over all runs.
    Other classes are mapped to one mark and split into their runs.
    """
    words = (raw + b" ").translate(_AS_LETTERS).replace(b" ", b"aaa ").count(b"aaaa")
    tokens = words + raw.translate(_AS_CASE).count(b"lU")
    tokens += len(raw.translate(None, _NOT_VISIBLE))
    # Digits, breaks and indentation are rare in prose: look only when present.
    if raw.translate(None, _NOT_DIGITS):
        tokens += sum((len(run) + 2) // 3 for run in raw.translate(_AS_DIGITS).split())
    if b"\n" in raw or b"\r" in raw:
        tokens += len(raw.translate(_AS_BREAKS).split())
    if b"  " in raw or b"\t" in raw:
        tokens += sum(
            (len(run) + _INDENT_CHARS - 1) // _INDENT_CHARS
            for run in raw.translate(_AS_INDENT).split()
            if len(run) > 1
        )
    return tokens


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
