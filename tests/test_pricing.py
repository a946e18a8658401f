"""Money as integer micro-dollars: exact costs, rounding, the shipped table."""

from __future__ import annotations

import pytest

from runner.pricing import Price, price_from_usd, shipped_prices, usd_to_micros
from runner.records import Usage

DEEPSEEK = price_from_usd({"input": 0.28, "cached_input": 0.028, "output": 0.42})


def test_cost_charges_cached_prompt_tokens_at_the_cached_price() -> None:
    usage = Usage(prompt_tokens=1000, completion_tokens=500, cached_tokens=200)
    # (800 * 280_000 + 200 * 28_000 + 500 * 420_000) / 1e6 = 439.6 -> 440
    assert DEEPSEEK.cost(usage) == 440


def test_reasoning_tokens_are_billed_as_the_output_they_are_part_of() -> None:
    plain = Usage(prompt_tokens=10, completion_tokens=1000)
    reasoning = Usage(prompt_tokens=10, completion_tokens=1000, reasoning_tokens=900)
    assert DEEPSEEK.cost(plain) == DEEPSEEK.cost(reasoning) == 423  # 2.8 + 420 -> 423


def test_worst_case_rounds_up_and_assumes_no_cache() -> None:
    # (1000 * 280_000 + 256 * 420_000) / 1e6 = 387.52 -> 388
    assert DEEPSEEK.worst_case(1000, 256) == 388


def test_cached_price_defaults_to_the_input_price() -> None:
    assert price_from_usd({"input": 1, "output": 2}) == Price(1_000_000, 1_000_000, 2_000_000)


def test_amounts_with_more_than_six_decimals_are_refused() -> None:
    assert usd_to_micros("0.123456") == 123_456
    with pytest.raises(ValueError, match="six decimals"):
        usd_to_micros("0.1234567")


def test_shipped_table_has_the_designs_output_prices() -> None:
    prices = shipped_prices()
    assert prices["gpt-4.1"].output == 8_000_000
    assert prices["claude-sonnet-4.5"].output == 15_000_000
    assert prices["gemini-2.5-flash"].output == 2_500_000
    assert prices["deepseek-v3.2"].output == 420_000
    assert all(price.cached_input <= price.input for price in prices.values())
