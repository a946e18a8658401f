"""The prompt-token estimate: exact figures per character class, chat framing."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from runner.tokens import messages_tokens, prompt_tokens, text_tokens


def test_latin_words_cost_a_quarter_of_their_letters_rounded_up_plus_punctuation() -> None:
    # letters 10 in 2 runs -> ceil((10 + 6) / 4) = 4; "!" -> 1
    assert text_tokens("Hello world!") == 5


def test_cjk_costs_one_token_per_character_not_one_per_four() -> None:
    assert text_tokens("你好世界") == 4
    assert text_tokens("请用中文回答这个问题。") == 11


def test_digits_are_grouped_by_three() -> None:
    assert text_tokens("12345") == 2
    assert text_tokens("1 2 3") == 3
    assert text_tokens("1234567 ½") == 4


def test_scripts_without_merges_cost_a_token_per_utf8_byte() -> None:
    assert text_tokens("👍") == 4
    assert text_tokens("नमस्ते") == 18  # Devanagari: 6 characters of 3 bytes
    assert text_tokens("\u2200x\u2208\u211d") == 1 + 3 + 3 + 3  # x, three 3-byte math symbols
    assert text_tokens("a\u00a0b") == 1 + 2 + 1  # a no-break space is 2 bytes
    assert text_tokens("Zalgo\u0301") == 2 + 2  # a combining mark costs 2
    assert text_tokens("a\ud800") == 1 + 3  # a lone surrogate (JSON allows it) costs 3


def test_two_byte_letters_cost_one_token_each() -> None:
    assert text_tokens("Привет") == 6
    assert text_tokens("Grüße") == 1 + 1 + 1 + 1  # Gr, ü, ß, e


def test_case_switches_and_long_space_runs_cost_extra() -> None:
    assert text_tokens("getHTTPResponseCode") == 5 + 2
    assert text_tokens(" " * 2000) == 125


def test_line_breaks_and_indentation_count_once_per_run_and_single_spaces_are_free() -> None:
    assert text_tokens("a\n\n\nb") == 3
    assert text_tokens("a b") == 2
    assert text_tokens("a     b") == 3
    assert text_tokens("if x:\n\treturn") == 6  # if x : break tab return(2)
    assert text_tokens("") == 0


def test_chat_framing_adds_four_per_message_and_three_for_the_reply() -> None:
    messages = [{"role": "user", "content": "Hello world!"}]
    assert messages_tokens(messages) == 3 + 4 + 5
    named = [{"role": "user", "content": "Hello world!", "name": "bob"}]
    assert messages_tokens(named) == 3 + 4 + 5 + 1 + 1


def test_text_parts_count_their_text_and_tools_count_their_json() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello world!"}]}]
    assert messages_tokens(parts) == 12
    body = {"messages": parts, "temperature": 0.5, "max_tokens": 10}
    assert prompt_tokens(body) == 12
    assert prompt_tokens({**body, "tools": [{"type": "function"}]}) > 12


@given(st.text())
def test_the_estimate_is_never_below_one_token_per_four_characters(text: str) -> None:
    # Byte-pair tokenizers average about four characters per token on prose;
    # whatever the text, the estimate must not fall under that average.
    assert text_tokens(text) * 4 >= len("".join(text.split()))


# The rules of runner/tokens.py, written the slow and obvious way, one regex a class.
_LETTER_RUN = re.compile(r"[A-Za-z]+")
_DIGIT_RUN = re.compile(r"[0-9]+")
_CASE_SWITCH = re.compile(r"[a-z](?=[A-Z])")
_LINE_BREAKS = re.compile(r"[\r\n]+")
_INDENT = re.compile(r"[ \t]{2,}")
_ASCII_SPACE = re.compile(r"[\t\n\x0b\x0c\r\x1c-\x1f ]+")
_COMBINING = re.compile("[\u0300-\u036f\u0085\u00a0]")  # +1 (two-byte spaces too)
_THREE_BYTE_NOT_CJK = re.compile(
    "[\u0800-\u2fff\u3000\ua000-\uabff\ud7b0-\uf8ff\ufb00-\ufeff\ufff0-\uffff]"
)  # +2 (the ideographic space included)
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")  # +3


def reference_tokens(text: str) -> int:
    words = sum((len(run) + 3) >> 2 for run in _LETTER_RUN.findall(text))
    words += len(_CASE_SWITCH.findall(text))
    digits = sum((len(run) + 2) // 3 for run in _DIGIT_RUN.findall(text))
    rest = _DIGIT_RUN.sub(" ", _LETTER_RUN.sub(" ", text))
    line_breaks = len(_LINE_BREAKS.findall(rest))
    indents = sum((len(run) + 15) // 16 for run in _INDENT.findall(text))
    visible = len(_ASCII_SPACE.sub("", rest))  # one per character besides these
    wide = (
        len(_COMBINING.findall(rest))
        + 2 * len(_THREE_BYTE_NOT_CJK.findall(rest))
        + 3 * len(_ASTRAL.findall(rest))
    )
    return words + digits + visible + wide + line_breaks + indents


@given(st.text(alphabet=st.characters(max_codepoint=127)))
def test_ascii_text_counts_exactly_as_the_rules_say(text: str) -> None:
    assert text_tokens(text) == reference_tokens(text)


@given(st.text(alphabet=st.characters(codec="utf-8")))
def test_any_text_counts_exactly_as_the_rules_say(text: str) -> None:
    assert text_tokens(text) == reference_tokens(text)


@given(
    st.lists(
        st.sampled_from(["word", "Word ", "12", "\n", "  ", "é", "ж", "中", "—", "👍", "\u0301"]),
        max_size=40,
    ).map("".join)
)
def test_mixed_scripts_count_exactly_as_the_rules_say(text: str) -> None:
    assert text_tokens(text) == reference_tokens(text)
