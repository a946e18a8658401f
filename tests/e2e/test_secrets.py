"""A whole job with recognisable keys: no key in any file, output line or report,
and each request carries only its own tenant's key."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.simulator import SimulatorConfig, SimulatorThread
from tests.conftest import SAMPLE_DATA, JobWriter, run_cli

KEYS = {
    "acme": "sk-SECRET-acme-7f3a9c1e5b",
    "globex": "sk-SECRET-globex-2d8e4f6a0c",
    "initech": "sk-SECRET-initech-9b1d3f5e7a",
}


def test_no_key_reaches_files_logs_reports_or_another_tenants_requests(
    tmp_path: Path, write_job: JobWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    for tenant, key in KEYS.items():
        monkeypatch.setenv(f"{tenant.upper()}_API_KEY", key)
    # initech's key is refused mid-run, so error paths are covered too.
    config = SimulatorConfig(
        keys={key: tenant for tenant, key in KEYS.items()},
        refuse={KEYS["initech"]: 401},
        refuse_after=10,
        error_rate=0.05,
        seed=5,
    )
    tenants = {t: {"rpm": 6000, "tpm": 1_000_000, "monthly_budget_usd": 5} for t in KEYS}
    outputs = []
    with SimulatorThread(config) as sim:
        job = write_job(
            SAMPLE_DATA / "openai_batch.jsonl",
            base_url=sim.base_url,
            tenants=tenants,
            extra='[prices."meta-llama/Meta-Llama-3-8B-Instruct"]\ninput = 1\noutput = 1\n',
        )
        for args in (
            ("submit", str(job), "--run-id", "s"),
            ("resume", "s", "--state", "state.db"),
            ("status", "--state", "state.db"),
            ("status", "s", "--json", "--state", "state.db"),
            ("report", "--format", "json", "--state", "state.db"),
            ("report", "--format", "csv", "--state", "state.db"),
            ("invoice", "acme", "--state", "state.db"),
            ("estimate", str(job)),
        ):
            outputs.append(run_cli(*args, cwd=tmp_path))
        stats = sim.stats()
    assert outputs[0].returncode == 3  # initech's rows were deferred
    assert stats["tenant_mismatch"] == 0  # every request carried its own tenant's key
    assert stats["by_status"].get("401", 0) >= 1
    leaked = []
    for tenant, key in KEYS.items():
        for done in outputs:
            if key in done.stdout or key in done.stderr:
                leaked.append((tenant, done.args))
        for path in tmp_path.rglob("*"):
            if path.is_file() and key.encode() in path.read_bytes():
                leaked.append((tenant, path))
    assert leaked == []
    deferred = [line for line in outputs[0].stdout.splitlines() if line.startswith("initech:")]
    assert deferred and "INITECH_API_KEY" in deferred[0]
