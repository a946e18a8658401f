"""Tenants -> groups of whole tenants, balanced by expected work.

A tenant's rows all go to one group: its limiter and budget then live in one
process and nothing is shared between workers. A tenant's expected work is the
time its own limits need for its rows, max(rows / rpm, tokens / tpm) minutes,
since lanes run side by side and each is held to its limits; the groups are
filled greedily, heaviest tenant first into the lightest group (LPT scheduling,
within 4/3 of the best split). Ties break by name, so a plan is reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from runner.config import Tenant
from runner.store import Store


@dataclass(frozen=True, slots=True)
class TenantWork:
    """A tenant's rows still to send, and their TPM cost (prompt estimate + max_tokens)."""

    rows: int
    tokens: int

    def minutes(self, limits: Tenant | None) -> float:
        """Minutes the tenant's limits need for this work (rows alone without limits)."""
        if limits is None:
            return float(self.rows)
        return max(self.rows / limits.rpm, self.tokens / limits.tpm)


def tenant_work(store: Store, run_id: str) -> dict[str, TenantWork]:
    """Every tenant of the run, with its rows to send (`pending`) and their TPM cost."""
    return {tenant: TenantWork(*work) for tenant, work in store.pending_work(run_id).items()}


def plan(
    work: Mapping[str, TenantWork], limits: Mapping[str, Tenant], groups: int
) -> list[list[str]]:
    """At most `groups` non-empty groups of tenant names, each sorted; every
    tenant in `work` is in exactly one. Tenants without rows to send go to the
    groups too (their output rows need a file), after the others."""
    if groups < 1:
        raise ValueError("groups must be at least 1")
    order = sorted(
        work, key=lambda name: (-work[name].minutes(limits.get(name)), -work[name].rows, name)
    )
    loads = [(0.0, 0, index) for index in range(min(groups, len(order)))]
    members: list[list[str]] = [[] for _ in loads]
    for name in order:
        minutes, rows, index = min(loads)
        members[index].append(name)
        loads[index] = (
            minutes + work[name].minutes(limits.get(name)),
            rows + work[name].rows,
            index,
        )
    return [sorted(group) for group in members]
