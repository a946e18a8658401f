"""runner: async, multi-tenant batch inference against OpenAI-compatible endpoints.

The public Python API; `runner` on the command line does the same things.

`runner.api` (and with it pyarrow, the readers and the sinks) is imported on
first use of its names: a lane process imports this package too, and sends
with about half the memory and start-up time without them.
"""

from typing import TYPE_CHECKING, Any

from runner.config import Job, load_job
from runner.errors import (
    BudgetExhausted,
    ConfigError,
    InputError,
    ProviderError,
    RateLimited,
    RequestRejected,
    Retryable,
    RunnerError,
    StateError,
    TenantRefused,
)
from runner.records import Status

if TYPE_CHECKING:
    from runner.api import RunResult, resume, resume_async, run_job, run_job_async, status

_API = frozenset({"RunResult", "resume", "resume_async", "run_job", "run_job_async", "status"})

__all__ = [
    "BudgetExhausted",
    "ConfigError",
    "InputError",
    "Job",
    "ProviderError",
    "RateLimited",
    "RequestRejected",
    "Retryable",
    "RunResult",
    "RunnerError",
    "StateError",
    "Status",
    "TenantRefused",
    "load_job",
    "resume",
    "resume_async",
    "run_job",
    "run_job_async",
    "status",
]


def __dir__() -> list[str]:
    return sorted(globals().keys() | _API)


def __getattr__(name: str) -> Any:
    if name in _API:
        from runner import api

        return getattr(api, name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}")
