"""The ledger and balances under any interleaving of reserve, settle, release and top-up."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner import carried_columns, ledger
from runner.budget import BudgetGuard
from runner.config import Tenant
from runner.ledger import Entry, Kind, invoice_lines, month_summary, period_of
from runner.pricing import price_from_usd
from runner.records import Request
from runner.store import SendMark, Store, utc_now
from tests.conftest import new_run

CAP = 1_000


def new_store(path: Path, rows: int) -> Store:
    store = Store(path)
    new_run(store)
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    requests = [Request(seq, f"id{seq}", "acme", "m", "in:1", body, 1, 1) for seq in range(rows)]
    store.register(
        "r",
        requests,
        [],
        carried_columns.encode(pa.record_batch({"n": list(range(rows))})),
        first_seq=0,
    )
    return store


# An operation: ("reserve", seq, amount) | ("settle", seq, cost) | ("release", seq, 0)
# | ("topup", 0, amount)
OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "settle", "release", "topup"]),
        st.integers(0, 9),
        st.integers(0, 400),
    ),
    max_size=60,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(operations=OPERATIONS)
def test_spend_stays_within_cap_and_balances_equal_the_ledger(
    tmp_path_factory: pytest.TempPathFactory, operations: list[tuple[str, int, int]]
) -> None:
    path = tmp_path_factory.mktemp("ledger") / "state.db"
    store = new_store(path, 10)
    reserved: dict[int, int] = {}
    for operation, seq, amount in operations:
        if operation == "reserve" and seq not in reserved:
            entry = Entry("acme", "2026-12", Kind.RESERVE, amount, "m", "r", seq)
            refused = store.checkpoint(
                "r", sends=[SendMark(seq, reservation=entry, cap_micros=CAP)]
            )
            if not refused:
                reserved[seq] = amount
        elif operation in ("settle", "release") and seq in reserved:
            worst = reserved.pop(seq)
            entries = [Entry("acme", "2026-12", Kind.RELEASE, worst, "m", "r", seq)]
            if operation == "settle":  # a real cost never exceeds its worst case
                entries.append(
                    Entry("acme", "2026-12", Kind.CHARGE, min(amount, worst), "m", "r", seq)
                )
            store.checkpoint("r", entries=entries)
        elif operation == "topup":
            store.add_entries([Entry("acme", "2026-12", Kind.TOPUP, amount, reason="t")])
        balance = store.balance("acme", "2026-12")
        assert balance.spent_micros + balance.reserved_micros <= CAP + balance.topup_micros
        sums = dict(
            store.db.execute(
                "SELECT kind, TOTAL(amount_micros) FROM ledger GROUP BY kind"
            ).fetchall()
        )
        assert balance.charged_micros == sums.get("charge", 0)
        assert balance.topup_micros == sums.get("topup", 0)
        assert balance.reserved_micros == sums.get("reserve", 0) - sums.get("release", 0)
        assert balance.reserved_micros == sum(reserved.values())
    store.close()


def test_a_reservation_that_does_not_fit_is_refused_with_the_balance(tmp_path: Path) -> None:
    store = new_store(tmp_path / "state.db", 2)
    first = Entry("acme", "2026-12", Kind.RESERVE, 700, "m", "r", 0)
    second = Entry("acme", "2026-12", Kind.RESERVE, 400, "m", "r", 1)
    refused = store.checkpoint(
        "r",
        sends=[
            SendMark(0, reservation=first, cap_micros=CAP),
            SendMark(1, reservation=second, cap_micros=CAP),
        ],
    )
    assert list(refused) == [1]
    assert refused[1].reserved_micros == 700
    reserved = dict(store.db.execute("SELECT seq, reserved_micros FROM requests").fetchall())
    assert reserved == {0: 700, 1: None}


def test_requeue_releases_the_reservations_of_rows_in_flight(tmp_path: Path) -> None:
    store = new_store(tmp_path / "state.db", 2)
    entry = Entry("acme", "2026-12", Kind.RESERVE, 300, "m", "r", 0)
    store.checkpoint(
        "r", sends=[SendMark(0, reservation=entry, cap_micros=CAP), SendMark(0, 1, "acme", 18)]
    )
    assert store.balance("acme", "2026-12").reserved_micros == 300
    assert store.requeue("r") == 1
    assert store.balance("acme", "2026-12").reserved_micros == 0
    kinds = [kind for (kind,) in store.db.execute("SELECT kind FROM ledger ORDER BY id")]
    assert kinds == ["reserve", "release"]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(amounts=st.lists(st.integers(0, 600), min_size=1, max_size=10))
def test_reservations_of_one_checkpoint_count_against_each_other(
    tmp_path_factory: pytest.TempPathFactory, amounts: list[int]
) -> None:
    """A checkpoint's reservations are summed into one ledger row, but each is
    checked against the cap with the ones before it counted."""
    store = new_store(tmp_path_factory.mktemp("ledger") / "state.db", 10)
    marks = [
        SendMark(seq, reservation=Entry("acme", "2026-12", Kind.RESERVE, a, "m", "r", seq))
        for seq, a in enumerate(amounts)
    ]
    refused = store.checkpoint("r", sends=[replace(m, cap_micros=CAP) for m in marks])
    accepted, total = [], 0
    for seq, amount in enumerate(amounts):
        if total + amount <= CAP:
            accepted.append(seq)
            total += amount
    assert sorted(set(range(len(amounts))) - set(refused)) == accepted
    assert store.balance("acme", "2026-12").reserved_micros == total
    rows = store.db.execute("SELECT amount_micros, requests FROM ledger").fetchall()
    assert rows == ([(total, len(accepted))] if accepted else [])
    store.close()


def test_a_checkpoint_sums_its_charges_by_model_and_price_and_reports_count_requests(
    tmp_path: Path,
) -> None:
    store = new_store(tmp_path / "state.db", 4)
    prices = (1, 1, 2)

    def charge(seq: int, model: str, amount: int, price: tuple[int, int, int]) -> Entry:
        entry = Entry("acme", "2026-12", Kind.CHARGE, amount, model, "r", seq)
        return replace(entry, prompt_tokens=10, cached_tokens=0, completion_tokens=5, prices=price)

    store.checkpoint(
        "r",
        entries=[
            charge(0, "m", 30, prices),
            charge(1, "m", 20, prices),
            charge(2, "m2", 7, (3, 3, 3)),
            charge(3, "m", 10, prices),
        ],
    )
    rows = store.db.execute(
        "SELECT model, seq, amount_micros, prompt_tokens, completion_tokens, requests"
        " FROM ledger ORDER BY id"
    ).fetchall()
    assert rows == [("m", None, 60, 30, 15, 3), ("m2", 2, 7, 10, 5, 1)]
    month = utc_now()[:7]
    lines = store.read_ledger(lambda conn: invoice_lines(conn, "acme", month))
    assert [(line.model, line.requests, line.amount_micros) for line in lines] == [
        ("m", 3, 60),
        ("m2", 1, 7),
    ]
    (summary,) = store.read_ledger(lambda conn: month_summary(conn, month))
    assert (summary.requests, summary.charged_micros, summary.prompt_tokens) == (4, 67, 40)


def test_the_entries_of_one_minute_share_a_row_and_a_new_minute_starts_one(
    tmp_path: Path,
) -> None:
    """Checkpoints add to the row of their minute (so the ledger grows with time,
    not requests), models and runs apart; a top-up is always its own row."""
    store = new_store(tmp_path / "state.db", 1)

    def charge(model: str, amount: int, run_id: str = "r") -> Entry:
        entry = Entry("acme", "2026-12", Kind.CHARGE, amount, model, run_id, 0)
        return replace(entry, prompt_tokens=amount, cached_tokens=0, completion_tokens=1)

    checkpoints = [
        ("2026-12-03T10:34:01.000+00:00", [charge("m", 10)]),
        ("2026-12-03T10:34:02.000+00:00", [charge("m2", 5)]),
        ("2026-12-03T10:34:59.999+00:00", [charge("m", 20), charge("m", 30, run_id="r2")]),
        ("2026-12-03T10:34:59.999+00:00", [Entry("acme", "2026-12", Kind.TOPUP, 7, reason="t")]),
        ("2026-12-03T10:34:59.999+00:00", [Entry("acme", "2026-12", Kind.TOPUP, 7, reason="t")]),
        ("2026-12-03T10:35:00.000+00:00", [charge("m", 40)]),
    ]
    for at, entries in checkpoints:
        with store.transaction() as conn:
            ledger.record(conn, entries, at)
    rows = store.db.execute(
        "SELECT at, kind, model, run_id, seq, amount_micros, prompt_tokens, completion_tokens,"
        " requests FROM ledger ORDER BY id"
    ).fetchall()
    assert rows == [
        ("2026-12-03T10:34:01.000+00:00", "charge", "m", "r", None, 30, 30, 2, 2),
        ("2026-12-03T10:34:02.000+00:00", "charge", "m2", "r", 0, 5, 5, 1, 1),
        ("2026-12-03T10:34:59.999+00:00", "charge", "m", "r2", 0, 30, 30, 1, 1),
        ("2026-12-03T10:34:59.999+00:00", "topup", None, None, None, 7, None, None, 1),
        ("2026-12-03T10:34:59.999+00:00", "topup", None, None, None, 7, None, None, 1),
        ("2026-12-03T10:35:00.000+00:00", "charge", "m", "r", 0, 40, 40, 1, 1),
    ]
    balance = store.balance("acme", "2026-12")
    assert (balance.charged_micros, balance.topup_micros) == (105, 14)
    store.close()


def test_budget_periods_are_utc_months_days_or_all_time() -> None:
    when = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert period_of(when, "month") == "2026-12"
    assert period_of(when, "day") == "2026-12-31"
    assert period_of(when, "total") == "total"


@given(st.datetimes(min_value=datetime(1000, 1, 1)))
def test_a_period_is_the_date_written_as_iso_8601(when: datetime) -> None:
    assert period_of(when, "month") == when.strftime("%Y-%m")
    assert period_of(when, "day") == when.date().isoformat()


def test_a_day_budget_starts_afresh_the_next_day(tmp_path: Path) -> None:
    clock = [datetime(2026, 12, 3, 23, 0, tzinfo=UTC)]
    guard = BudgetGuard(
        "acme",
        Tenant(monthly_budget_usd=1, budget_period="day"),
        {"m": price_from_usd({"input": 1, "output": 1})},
        "r",
        clock=lambda: clock[0],
    )
    first = guard.reservation(0, "m", 500)
    clock[0] = datetime(2026, 12, 4, 0, 30, tzinfo=UTC)
    second = guard.reservation(1, "m", 500)
    assert first is not None and second is not None
    assert (first.period, second.period) == ("2026-12-03", "2026-12-04")
    cost, entries = guard.settle(first, seq=0, model="m", usage=None, worst_micros=500)
    assert cost is None and [e.kind for e in entries] == [Kind.RELEASE, Kind.HOLD]
    assert {e.period for e in entries} == {"2026-12-03"}  # settled in its reservation's period


def test_deleting_a_run_releases_what_its_rows_still_held(tmp_path: Path) -> None:
    store = new_store(tmp_path / "state.db", 2)
    entry = Entry("acme", "2026-12", Kind.RESERVE, 300, "m", "r", 0)
    store.checkpoint(
        "r", sends=[SendMark(0, reservation=entry, cap_micros=CAP), SendMark(0, 1, "acme", 18)]
    )
    store.delete_run("r")  # submit --restart
    assert store.balance("acme", "2026-12").reserved_micros == 0
