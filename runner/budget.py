"""One tenant's budget in a run: reserve the worst case before a send, settle to
the real cost after it, release what a request that ended without a cost held.

The worst case is the estimated prompt tokens at the input price plus
`max_tokens` at the output price (no cache hit), rounded up. A reservation is
checked against the cap inside the store's transaction (`Store.checkpoint`), so
with any number of requests in flight, settled spend plus reservations never
pass the cap; and since no response can cost more than its worst case, the
settled spend never passes it either. Tenants without a cap reserve nothing;
their costs are still charged to the ledger.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from runner.config import Tenant
from runner.errors import BudgetExhausted
from runner.ledger import Balance, Entry, Kind, period_of
from runner.pricing import Price
from runner.records import Usage


def utc_now() -> datetime:
    return datetime.now(UTC)


class BudgetGuard:
    __slots__ = ("_clock", "_config", "_prices", "_run_id", "cap_micros", "tenant")

    def __init__(
        self,
        tenant: str,
        config: Tenant,
        prices: Mapping[str, Price],
        run_id: str,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.tenant = tenant
        self._config = config
        self._prices = prices
        self._run_id = run_id
        self._clock = clock
        self.cap_micros = config.cap_micros

    def __repr__(self) -> str:
        return f"BudgetGuard({self.tenant!r}, cap_micros={self.cap_micros})"

    def period(self) -> str:
        return period_of(self._clock(), self._config.budget_period)

    def worst_case(self, model: str, prompt_tokens: int, max_tokens: int) -> int:
        return self._prices[model].worst_case(prompt_tokens, max_tokens)

    def reservation(self, seq: int, model: str, worst_micros: int) -> Entry | None:
        """What to reserve before sending; None for a tenant without a cap."""
        if self.cap_micros is None:
            return None
        return self._entry(self.period(), Kind.RESERVE, worst_micros, model, seq)

    def settle(
        self,
        reserved: Entry | None,
        *,
        seq: int,
        model: str,
        usage: Usage | None,
        worst_micros: int,
    ) -> tuple[int | None, list[Entry]]:
        """The cost of a response and the entries that record it: the reservation
        released, then a charge; or, without `usage`, a hold of the worst case
        (cost unknown: flagged in reports, never counted as zero)."""
        entries = self.release(reserved)
        period = reserved.period if reserved else self.period()
        if usage is None:
            return None, [*entries, self._entry(period, Kind.HOLD, worst_micros, model, seq)]
        price = self._prices[model]
        cost = price.cost(usage)
        charge = Entry(
            self.tenant,
            period,
            Kind.CHARGE,
            cost,
            model,
            self._run_id,
            seq,
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens,
            prices=(price.input, price.cached_input, price.output),
        )
        return cost, [*entries, charge]

    def release(self, reserved: Entry | None) -> list[Entry]:
        if reserved is None:
            return []
        return [
            self._entry(
                reserved.period, Kind.RELEASE, reserved.amount_micros, reserved.model, reserved.seq
            )
        ]

    def exhausted(self, balance: Balance, needed_micros: int) -> BudgetExhausted:
        cap = (self.cap_micros or 0) + balance.topup_micros
        return BudgetExhausted(
            self.tenant,
            cap_micros=cap,
            spent_micros=balance.spent_micros,
            needed_micros=needed_micros,
            period=balance.period,
        )

    def _entry(
        self, period: str, kind: Kind, micros: int, model: str | None, seq: int | None
    ) -> Entry:
        return Entry(self.tenant, period, kind, micros, model, self._run_id, seq)
