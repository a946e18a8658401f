"""Job and tenants files (TOML) -> frozen, validated config objects.

Paths in a job file are resolved against the job file's folder. An unknown key, a
wrong type or a bad value is a `ConfigError` naming the file and the key, raised
before anything is sent. The parsed `Job` is stored with its run, so that
`runner resume` needs nothing but the state database (API keys are not part of
it: a tenant names the environment variable that holds its key).
"""

from __future__ import annotations

import re
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from runner.errors import ConfigError
from runner.pricing import Price, price_from_usd, shipped_prices, usd_to_micros

BUILTIN_SIMULATOR = "builtin:simulator"
InputFormat = Literal["auto", "parquet", "jsonl", "openai_batch"]
EngineName = Literal["local", "ray"]
_MAX_PROCESSES = 64
_TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Section(BaseModel):
    """Strict: `rpm = "600"` or `rpm = true` is an error, not a silent conversion;
    inf and nan are refused wherever a number is expected."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


FilePath = Annotated[Path, Field(strict=False)]
Usd = Annotated[Decimal, Field(strict=False, ge=0, decimal_places=6)]


class JobSection(_Section):
    name: Annotated[str, Field(min_length=1)]
    input: FilePath
    output: FilePath
    state: FilePath | None = None
    default_tenant: str | None = None
    run_id: Annotated[str, Field(min_length=1)] = "{job}-{input_hash}"
    engine: EngineName = "local"
    # The local engine's processes: each runs whole tenants (see runner/lane_processes.py).
    processes: int | Literal["auto"] = "auto"

    @field_validator("processes", mode="before")
    @classmethod
    def _check_processes(cls, value: object) -> object:
        """One message for both forms (the union's own would name its internals)."""
        if value == "auto":
            return value
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= _MAX_PROCESSES:
            return value
        raise ValueError(f'use "auto" or a whole number from 1 to {_MAX_PROCESSES}')

    @field_validator("output")
    @classmethod
    def _check_output(cls, value: Path) -> Path:
        if value.suffix != ".parquet":
            raise ValueError("the output is a Parquet file: its name must end in .parquet")
        return value


class InputMapping(_Section):
    """Which input column feeds which request field; absent columns are optional,
    except those the job names explicitly (a wrong name refuses the file)."""

    format: InputFormat = "auto"
    settle_s: Annotated[float, Field(ge=0, le=3600)] = 2.0  # folder/glob inputs only
    id: str = "id"
    tenant: str = "tenant"
    prompt: str = "prompt"
    messages: str = "messages"
    system: str = "system"
    model: str = "model"
    max_tokens: str = "max_tokens"
    temperature: str = "temperature"

    def columns(self) -> dict[str, str]:
        """Request field -> input column name."""
        return {name: getattr(self, name) for name in _MAPPED_FIELDS}

    def required_columns(self) -> set[str]:
        """Columns the job named explicitly: they must exist in a table input."""
        return {getattr(self, name) for name in self.model_fields_set if name in _MAPPED_FIELDS}


_MAPPED_FIELDS = (
    "id",
    "tenant",
    "prompt",
    "messages",
    "system",
    "model",
    "max_tokens",
    "temperature",
)


class Defaults(_Section):
    model: str | None = None
    max_tokens: Annotated[int, Field(gt=0)] = 256
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    system: str | None = None


class ProviderConfig(_Section):
    """Where requests go. `price_multiplier` scales every price, for relays that
    resell a provider's models at a discount (0.8 = 20 % off)."""

    base_url: str = BUILTIN_SIMULATOR
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 6
    backoff_base_s: Annotated[float, Field(gt=0)] = 0.5
    max_backoff_s: Annotated[float, Field(gt=0)] = 30.0
    price_multiplier: Annotated[Decimal, Field(strict=False, gt=0, le=100)] = Decimal(1)

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value != BUILTIN_SIMULATOR and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"must be http(s)://host[:port]/... or {BUILTIN_SIMULATOR!r}")
        return value.rstrip("/")


class PriceEntry(_Section):
    """USD per million tokens, as a user writes it."""

    input: Usd
    cached_input: Usd | None = None
    output: Usd


BudgetPeriod = Literal["month", "day", "total"]


class Tenant(_Section):
    """One tenant's key variable, limits and money settings.

    `monthly_budget_usd` is the spend cap per `budget_period` (a calendar month
    in UTC by default, or a UTC day, or all time); absent means no cap.
    """

    api_key_env: str | None = None
    rpm: Annotated[int, Field(gt=0)] = 60
    tpm: Annotated[int, Field(gt=0)] = 100_000
    max_parallel: Annotated[int, Field(gt=0, le=10_000)] = 8
    monthly_budget_usd: Usd | None = None
    budget_period: BudgetPeriod = "month"
    allowed_models: list[str] | None = None
    alert_thresholds: list[Annotated[int, Field(gt=0, le=1000)]] = [50, 80, 100]
    alert_webhook: Annotated[str, Field(pattern=r"^https?://\S+$")] | None = None

    @property
    def cap_micros(self) -> int | None:
        """The spend cap per budget period in micro-dollars; None without a cap."""
        budget = self.monthly_budget_usd
        return None if budget is None else usd_to_micros(budget)

    @field_validator("api_key_env")
    @classmethod
    def _check_env_name(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", value):
            raise ValueError("must be an environment variable name such as ACME_API_KEY")
        return value


class RaySection(_Section):
    """How `engine = "ray"` runs (see `runner.distributed`): the cluster to join
    (None: `$RAY_ADDRESS`, else a Ray instance started on this machine), how many
    workers share the tenants, whether to keep one merged output file beside the
    per-shard files, and how often Ray retries a worker that died."""

    address: Annotated[str, Field(min_length=1)] | None = None
    workers: Annotated[int, Field(ge=1, le=10_000)] = 2
    merge: bool = False
    max_retries: Annotated[int, Field(ge=0, le=100)] = 3


class Job(_Section):
    """A whole job, as stored with its run."""

    job: JobSection
    input: InputMapping = InputMapping()
    defaults: Defaults = Defaults()
    provider: ProviderConfig = ProviderConfig()
    ray: RaySection = RaySection()
    prices: dict[str, PriceEntry] = {}
    tenants: dict[str, Tenant]

    @field_validator("tenants")
    @classmethod
    def _check_tenants(cls, value: dict[str, Tenant]) -> dict[str, Tenant]:
        if not value:
            raise ValueError("at least one tenant is needed")
        for name in value:
            if not _TENANT_NAME.match(name):
                raise ValueError(f"tenant name {name!r}: use letters, digits, '_', '.', '-'")
        return value

    def key_env(self, tenant: str) -> str:
        """The variable that holds a tenant's key: its `api_key_env`, else
        `<TENANT>_API_KEY` in upper case."""
        configured = self.tenants[tenant].api_key_env
        return configured or re.sub(r"[^A-Z0-9]", "_", tenant.upper()) + "_API_KEY"

    def price_table(self) -> dict[str, Price]:
        """The shipped prices with this job's overrides on top, times the
        provider's `price_multiplier`."""
        table = shipped_prices()
        for model, entry in self.prices.items():
            table[model] = price_from_usd(entry.model_dump())
        multiplier = self.provider.price_multiplier
        if multiplier == 1:
            return table
        return {model: price.scaled(multiplier) for model, price in table.items()}

    def to_json(self) -> str:
        """The job as set (defaults left out), so `from_json` gives back the same
        job, down to which input columns were named explicitly."""
        return self.model_dump_json(exclude_unset=True)

    @classmethod
    def from_json(cls, text: str) -> Job:
        return cls.model_validate_json(text)


def load_job(path: Path | str) -> Job:
    """Read a job file; a `tenants = "FILE"` key pulls tenants (and prices) from
    a shared tenants file, whose own entries the job file's `[prices]` override."""
    path = Path(path).resolve()
    raw = _read_toml(path)
    tenants = raw.get("tenants")
    if isinstance(tenants, str):
        tenants_path = (path.parent / tenants).resolve()
        shared = _read_toml(tenants_path)
        unknown = set(shared) - {"tenants", "prices"}
        if unknown:
            raise ConfigError(
                f"{tenants_path}: unknown top-level key(s) {sorted(unknown)}; "
                'a tenants file holds [tenants.NAME] and optional [prices."MODEL"] tables'
            )
        raw["tenants"] = shared.get("tenants", {})
        raw["prices"] = {**shared.get("prices", {}), **raw.get("prices", {})}
        where = f"{path} (tenants from {tenants_path})"
    else:
        where = str(path)
    job_section = raw.get("job")
    if isinstance(job_section, dict):
        for key in ("input", "output", "state"):
            if isinstance(job_section.get(key), str):
                job_section[key] = str((path.parent / job_section[key]).resolve())
    try:
        job = Job.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(where, exc)) from None
    default = job.job.default_tenant
    if default is not None and default not in job.tenants:
        raise ConfigError(f"{where}: [job] default_tenant {default!r} is not a configured tenant")
    return job


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None


def _describe(where: str, exc: ValidationError) -> str:
    """One line per problem: `[tenants.acme] rpm: Input should be greater than 0`."""
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        table = ".".join(loc[:-1])
        key = f"[{table}] {loc[-1]}" if table else loc[-1] if loc else "(file)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key (check the spelling)"
        elif error["type"] == "missing":
            message = "required key is missing"
        lines.append(f"  {key}: {message}")
    return f"{where}: invalid job file:\n" + "\n".join(lines)
