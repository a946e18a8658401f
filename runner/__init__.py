"""runner: async, multi-tenant batch inference against OpenAI-compatible endpoints.

The public Python API; `runner` on the command line does the same things.
"""

from runner.api import RunResult, resume, resume_async, run_job, run_job_async, status
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
