"""The exception tree of runner, translated once at each boundary.

::

    RunnerError
    ├── ConfigError        job or tenants file; names file and key            -> exit 2
    ├── InputError         whole file refused; names file and line or row     -> exit 2
    ├── StateError         unknown run, newer schema                          -> exit 2
    │   └── RunLocked      the run is running in another process              -> exit 4
    ├── BudgetExhausted    carries cap, spent, period                         -> row deferred
    └── ProviderError      raised only in provider.py; carries tenant, status, attempt
        ├── Retryable      5xx, timeout, reset, malformed body                -> backoff
        │   └── RateLimited   429, carries retry_after                        -> lane paused
        ├── TenantRefused  401, 402, 403                                      -> tenant deferred
        └── RequestRejected   other 4xx                                       -> row failed

A bad row is a `Rejection` record, not an exception. Messages say what, where and
how to fix it; they name the variable that holds a key, never the key.
"""

from __future__ import annotations


class RunnerError(Exception):
    """Base of every error runner raises on purpose."""


class ConfigError(RunnerError):
    """The job or tenants file is wrong; nothing was sent."""


class InputError(RunnerError):
    """The input file as a whole is refused; nothing was sent."""


class StateError(RunnerError):
    """The state database cannot serve the request (unknown run, newer schema...)."""


class RunLocked(StateError):
    """Another process is running this run right now."""


class BudgetExhausted(RunnerError):
    """Sending would take a tenant past its spend cap for the period."""

    def __init__(
        self, tenant: str, *, cap_micros: int, spent_micros: int, needed_micros: int, period: str
    ) -> None:
        self.tenant = tenant
        self.cap_micros = cap_micros
        self.spent_micros = spent_micros
        self.period = period
        super().__init__(
            f"tenant {tenant!r}: budget exhausted for {period}: spent ${spent_micros / 1e6:.6f} "
            f"of ${cap_micros / 1e6:.6f}; the next request may cost up to "
            f"${needed_micros / 1e6:.6f}; top up with `runner topup {tenant} AMOUNT "
            f"--reason TEXT --period {period}`, then resume the run"
        )


class ProviderError(RunnerError):
    """The provider did not give a usable answer to one attempt."""

    def __init__(self, message: str, *, tenant: str, status: int | None = None) -> None:
        self.tenant = tenant
        self.status = status
        super().__init__(message)


class Retryable(ProviderError):
    """Worth another attempt after a backoff: 5xx, timeout, reset, malformed body."""


class RateLimited(Retryable):
    """HTTP 429: the tenant's lane pauses for `retry_after` seconds (None: backoff)."""

    def __init__(
        self, message: str, *, tenant: str, retry_after: float | None, status: int = 429
    ) -> None:
        super().__init__(message, tenant=tenant, status=status)
        self.retry_after = retry_after


class TenantRefused(ProviderError):
    """HTTP 401, 402 or 403: the tenant's key or account is refused; defer its rows."""


class RequestRejected(ProviderError):
    """Any other 4xx: this request itself is wrong; the row fails."""


def sole_error(group: BaseExceptionGroup) -> BaseException:
    """The one exception inside (nested) task-group exception groups, so that
    a caller sees the `StateError` a lane raised, not a group; the group
    itself when it holds several."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop()
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
        else:
            leaves.append(error)
    return leaves[0] if len(leaves) == 1 else group
