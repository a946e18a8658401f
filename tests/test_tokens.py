"""The prompt-token estimate: exact figures per character class, chat framing."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from runner.tokens import _any_tokens, _ascii_tokens, messages_tokens, prompt_tokens, text_tokens


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


@given(st.text(alphabet=st.characters(max_codepoint=127)))
def test_the_fast_ascii_path_counts_exactly_like_the_general_one(text: str) -> None:
    assert _ascii_tokens(text.encode("ascii")) == _any_tokens(text)
