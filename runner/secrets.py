"""API keys: looked up once, from the environment (or a mapping like it), and
wrapped so that `str`, `repr`, f-strings and tracebacks never show them.

Only `Secret.reveal()` gives the value, and only the provider client calls it,
to build the `Authorization` header.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from runner.config import BUILTIN_SIMULATOR, Job


class Secret:
    """A key that does not print."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> str | tuple[Any, ...]:
        raise TypeError("a Secret is not pickled")


def resolve_keys(
    job: Job, tenants: Iterable[str], environ: Mapping[str, str]
) -> dict[str, Secret | None]:
    """Each tenant's key, or None where its variable is unset or empty.

    The bundled simulator needs no account: a tenant without a key gets a
    placeholder key naming the tenant, so the demo runs on a fresh machine.
    """
    keys: dict[str, Secret | None] = {}
    for tenant in tenants:
        value = environ.get(job.key_env(tenant), "").strip()
        if not value and job.provider.base_url == BUILTIN_SIMULATOR:
            value = f"sim-key-{tenant}"
        keys[tenant] = Secret(value) if value else None
    return keys


def missing_key_message(job: Job, tenant: str) -> str:
    return (
        f"tenant {tenant!r}: no API key: environment variable {job.key_env(tenant)} "
        f"is not set; export it and run `runner resume`"
    )
