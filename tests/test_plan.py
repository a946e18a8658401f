"""Tenant groups: whole tenants, balanced by the minutes their limits need."""

from __future__ import annotations

from runner.config import Tenant
from runner.distributed.plan import TenantWork, plan


def test_every_tenant_lands_in_exactly_one_group_and_the_heaviest_are_spread() -> None:
    work = {f"t{n}": TenantWork(rows=100 * (n + 1), tokens=0) for n in range(6)}
    limits = {name: Tenant(rpm=100) for name in work}  # t5 needs 6 minutes, t0 one
    groups = plan(work, limits, 3)
    assert sorted(name for group in groups for name in group) == sorted(work)
    # LPT: t5 | t4 | t3, then t2 -> lightest (t3: 4), t1 -> t4 (5 < 6), t0 -> t5 or t3
    assert groups == [["t0", "t5"], ["t1", "t4"], ["t2", "t3"]]
    loads = [sum(work[name].rows for name in group) for group in groups]
    assert loads == [700, 700, 700]


def test_the_work_is_measured_at_each_tenants_own_limits() -> None:
    work = {"slow": TenantWork(rows=60, tokens=0), "fast": TenantWork(rows=600, tokens=0)}
    work |= {"tokens": TenantWork(rows=10, tokens=1_000_000)}
    limits = {"slow": Tenant(rpm=6), "fast": Tenant(rpm=6000), "tokens": Tenant(tpm=100_000)}
    # slow: 10 minutes, tokens: 10 minutes, fast: 0.1. By rows alone, fast would
    # be alone and the two long ones together.
    assert plan(work, limits, 2) == [["slow"], ["fast", "tokens"]]


def test_fewer_tenants_than_workers_gives_fewer_groups_and_idle_tenants_still_get_one() -> None:
    work = {"a": TenantWork(5, 50), "idle": TenantWork(0, 0)}
    assert plan(work, {}, 8) == [["a"], ["idle"]]
    assert plan(work, {}, 1) == [["a", "idle"]]


def test_the_plan_is_reproducible_whatever_the_order_of_the_tenants() -> None:
    names = [f"t{n:02d}" for n in range(20)]
    work = {name: TenantWork(rows=10, tokens=10) for name in names}
    reversed_work = dict(reversed(list(work.items())))
    assert plan(work, {}, 4) == plan(reversed_work, {}, 4)
