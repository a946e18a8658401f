"""Benchmark: how close the runner gets to each tenant's limits at a strict server.

    python bench/limits.py            # 90-second run
    python bench/limits.py --quick    # 6-second smoke run (the test suite runs it)

Starts `runner simulate` as a separate process enforcing a strict sliding
60-second window per key, submits a job of three tenants through the CLI as a
user would, then prints one line per tenant with the achieved rate as a ratio of
its binding limit (measured by the server between its first and last answer),
the largest count the server ever saw inside one window, and its 429s.
Tenant `tokens` has long prompts, so its TPM limit binds, not its RPM.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from runner.simulator import key_label
from runner.tokens import prompt_tokens

RPM, TPM = 1200, 150_000
TENANTS = {
    "alpha": "Summarise item {i} briefly.",
    "beta": "Name a colour for item {i}.",
    "tokens": "Explain in depth, with examples, item {i}: " + "context " * 120,
}
MAX_TOKENS = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 6-second smoke run")
    args = parser.parse_args()
    seconds = 6.0 if args.quick else 90.0
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        server, base_url = _start_simulator()
        try:
            job = _write_job(work, base_url, seconds)
            started = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "runner", "submit", str(job), "--run-id", "bench"],
                cwd=work,
                capture_output=True,
                text=True,
                env={**os.environ, **{f"{t.upper()}_API_KEY": _key(t) for t in TENANTS}},
            )
            wall = time.monotonic() - started
            stats = _get(base_url.removesuffix("/v1") + "/stats")
        finally:
            server.terminate()
            server.wait()
    if done.returncode != 0:
        sys.exit(f"runner exited {done.returncode}:\n{done.stderr[-2000:]}")
    print(f"limits: {len(TENANTS)} tenants, rpm {RPM}, tpm {TPM}, wall {wall:.1f}s")
    for tenant in TENANTS:
        _report(tenant, stats)


def _report(tenant: str, stats: dict[str, Any]) -> None:
    label = key_label(_key(tenant))
    per_key = stats["per_key"][label]
    span = stats["last_ok_at"][label] - stats["first_ok_at"][label]
    requests = per_key["ok"]
    tokens = per_key["prompt_tokens"] + requests * MAX_TOKENS  # what the server charges
    rpm_rate = (requests - 1) / span * 60
    tpm_rate = tokens * (requests - 1) / requests / span * 60
    binding, ratio = max(("rpm", rpm_rate / RPM), ("tpm", tpm_rate / TPM), key=lambda x: x[1])
    print(
        f"  {tenant:7} {requests:5} ok in {span:6.1f}s: {rpm_rate:7.1f} rpm, {tpm_rate:9.0f} tpm; "
        f"binding {binding} ratio {ratio:.3f}; max in one window "
        f"{stats['max_window_requests'][label]} req / {stats['max_window_tokens'][label]} tok; "
        f"429s {per_key['rate_limited']}"
    )


def _key(tenant: str) -> str:
    return f"sk-bench-{tenant}"


def _start_simulator() -> tuple[subprocess.Popen[str], str]:
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runner",
            "simulate",
            "--port",
            "0",
            "--rpm",
            str(RPM),
            "--tpm",
            str(TPM),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    return server, line.split()[3]


def _write_job(work: Path, base_url: str, seconds: float) -> Path:
    """Rows for `seconds` of work at each tenant's binding limit (by our estimate)."""
    with (work / "in.jsonl").open("w", encoding="utf-8") as handle:
        for tenant, prompt in TENANTS.items():
            cost = prompt_tokens({"messages": [{"role": "user", "content": prompt}]}) + MAX_TOKENS
            for i in range(int(min(RPM, TPM / cost) * seconds / 60)):
                row = {"id": f"{tenant}-{i}", "tenant": tenant, "prompt": prompt.format(i=i)}
                handle.write(json.dumps(row) + "\n")
    tenants = "".join(
        f"[tenants.{t}]\nrpm = {RPM}\ntpm = {TPM}\nmax_parallel = 32\n" for t in TENANTS
    )
    (work / "job.toml").write_text(
        f'[job]\nname = "bench"\ninput = "in.jsonl"\noutput = "out.parquet"\nstate = "s.db"\n'
        f'[defaults]\nmodel = "gpt-4.1-mini"\nmax_tokens = {MAX_TOKENS}\n'
        f'[provider]\nbase_url = "{base_url}"\n{tenants}',
        encoding="utf-8",
    )
    return work / "job.toml"


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return dict(json.load(response))


if __name__ == "__main__":
    main()
