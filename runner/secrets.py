"""API keys: looked up once, from the environment (or a mapping like it), and
wrapped so that `str`, `repr`, f-strings and tracebacks never show them.

Only `Secret.reveal()` gives the value, and only the provider client calls it,
to build the `Authorization` header.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from runner.config import BUILTIN_SIMULATOR, Job

_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


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
) -> dict[str, Secret | str]:
    """Each tenant's key, or the reason it has none (a message naming the
    variable, for the tenant's deferred rows).

    The bundled simulator needs no account: a tenant without a key gets a
    placeholder key naming the tenant, so the demo runs on a fresh machine.
    """
    keys: dict[str, Secret | str] = {}
    for tenant in tenants:
        variable = job.key_env(tenant)
        value = environ.get(variable, "").strip()
        if not value and job.provider.base_url == BUILTIN_SIMULATOR:
            value = f"sim-key-{tenant}"
        if not value:
            keys[tenant] = (
                f"tenant {tenant!r}: no API key: environment variable {variable} is not set; "
                "export it, then resume the run"
            )
        elif not _HEADER_SAFE.fullmatch(value):
            keys[tenant] = (
                f"tenant {tenant!r}: the API key in {variable} has spaces or control "
                "characters, which an HTTP header cannot carry; fix it, then resume the run"
            )
        else:
            keys[tenant] = Secret(value)
    return keys


def redact(text: str, key: Secret | None) -> str:
    """`text` with the key blanked out, for messages that quote a provider (some
    echo the request's headers back)."""
    if key is None or not key.reveal():
        return text
    return text.replace(key.reveal(), "[redacted]")
