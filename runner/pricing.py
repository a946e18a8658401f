"""Prices and the cost of a response, in integer micro-dollars.

A price is stored as micro-dollars per million tokens, so that $0.028/M is the
integer 28_000 and every sum stays exact. The cost of `n` tokens at price `p` is
`n * p / 1_000_000` micro-dollars; one request's cost is rounded half-up to a
whole micro-dollar once, and every total is the sum of those rounded costs,
so reports always equal the sum of the per-request costs in the output.
The worst-case cost that a budget reserves is rounded up instead.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from importlib import resources

from runner.records import Usage

MICROS_PER_USD = 1_000_000
_PER_MILLION = 1_000_000


def usd_to_micros(amount: Decimal | float | str) -> int:
    """Exact conversion; more than six decimals is refused (it cannot be stored)."""
    micros = Decimal(str(amount)) * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise ValueError(f"{amount} has more than six decimals")
    return int(micros)


def micros_to_usd(micros: int) -> float:
    return micros / MICROS_PER_USD


@dataclass(frozen=True, slots=True)
class Price:
    """Micro-dollars per million input, cached-input and output tokens."""

    input: int
    cached_input: int
    output: int

    def scaled(self, multiplier: Decimal) -> Price:
        """This price times `multiplier`, rounded half-up to whole micro-dollars per
        million tokens."""

        def scale(micros: int) -> int:
            return int((micros * multiplier).to_integral_value(ROUND_HALF_UP))

        return Price(scale(self.input), scale(self.cached_input), scale(self.output))

    def cost(self, usage: Usage) -> int:
        """Cost of a response's usage: cached prompt tokens at the cached price,
        reasoning tokens as output (they are part of `completion_tokens`)."""
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        scaled = (
            (usage.prompt_tokens - cached) * self.input
            + cached * self.cached_input
            + usage.completion_tokens * self.output
        )
        return (scaled + _PER_MILLION // 2) // _PER_MILLION

    def worst_case(self, prompt_tokens: int, max_tokens: int) -> int:
        """The most a request can cost: no cache hit, every allowed output token."""
        scaled = prompt_tokens * self.input + max_tokens * self.output
        return -(-scaled // _PER_MILLION)


def shipped_prices() -> dict[str, Price]:
    """The default table bundled with the package (runner/prices.toml)."""
    raw = tomllib.loads(resources.files("runner").joinpath("prices.toml").read_text("utf-8"))
    return {model: price_from_usd(entry) for model, entry in raw.items()}


def price_from_usd(entry: Mapping[str, object]) -> Price:
    """A price from USD-per-million values; `cached_input` defaults to `input`."""
    input_price = usd_to_micros(str(entry["input"]))
    cached = entry.get("cached_input")
    return Price(
        input=input_price,
        cached_input=input_price if cached is None else usd_to_micros(str(cached)),
        output=usd_to_micros(str(entry["output"])),
    )
