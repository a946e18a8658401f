"""Using the limits exactly: 5 tenants at 3,000 RPM at a server that enforces a
strict sliding 60-second window per key; two of them send long prompts, so
their TPM limit binds instead. Each tenant gets rows for the whole run at its
binding limit (as the server counts tokens), so the run lasts about 90 seconds.

Per tenant: the achieved rate as a ratio of its binding limit, measured by the
server between its first and last answer (target >= 0.97); the most the server
ever counted inside one window (never above the limit); and its 429s (zero).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from common import check, key, key_env, measure, runner_cli, simulator, write_job, write_jsonl

from runner.simulator import key_label, prompt_tokens

RPM, TPM, MAX_TOKENS = 3000, 200_000, 32
PROMPTS = {
    "r1": "Summarise item {i} briefly.",
    "r2": "Name a colour for item {i}.",
    "r3": "Give a one-word answer for item {i}.",
    "t1": "Explain in depth, with examples, item {i}: " + "context " * 120,
    "t2": "Review this passage about item {i} carefully: " + "The report states. " * 40,
}
TARGET = 0.97


def run(quick: bool) -> list[str]:
    seconds = 8.0 if quick else 90.0
    with (
        tempfile.TemporaryDirectory() as folder,
        simulator("--rpm", str(RPM), "--tpm", str(TPM)) as sim,
    ):
        work = Path(folder)
        write_jsonl(work / "in.jsonl", _rows(seconds))
        tenants = {tenant: {"rpm": RPM, "tpm": TPM, "max_parallel": 64} for tenant in PROMPTS}
        job = write_job(work, sim.base_url, tenants, input_name="in.jsonl", max_tokens=MAX_TOKENS)
        submit = runner_cli("submit", str(job), "--run-id", "limits")
        wall = check(measure(submit, cwd=work, env=key_env(list(PROMPTS))), "runner").wall_s
        stats = sim.stats(brief=True)
    lines = [
        f"limits: {len(PROMPTS)} tenants, rpm {RPM}, tpm {TPM}, strict 60s window, wall {wall:.1f}s"
    ]
    return lines + [_report(tenant, stats) for tenant in PROMPTS]


def _rows(seconds: float) -> Any:
    for tenant, prompt in PROMPTS.items():
        # Sized by the server's count, which the runner's window settles to.
        messages = [{"role": "user", "content": prompt.format(i=0)}]
        rate = min(RPM, TPM / (prompt_tokens(messages) + MAX_TOKENS))
        for i in range(int(rate * seconds / 60)):
            yield {"id": f"{tenant}-{i}", "tenant": tenant, "prompt": prompt.format(i=i)}


def _report(tenant: str, stats: dict[str, Any]) -> str:
    label = key_label(key(tenant))
    per_key = stats["per_key"][label]
    span = stats["last_ok_at"][label] - stats["first_ok_at"][label]
    requests = per_key["ok"]
    tokens = per_key["prompt_tokens"] + requests * MAX_TOKENS  # what the server charges
    rpm_rate = (requests - 1) / span * 60
    tpm_rate = tokens * (requests - 1) / requests / span * 60
    binding, ratio = max(("rpm", rpm_rate / RPM), ("tpm", tpm_rate / TPM), key=lambda x: x[1])
    window_requests = stats["max_window_requests"][label]
    window_tokens = stats["max_window_tokens"][label]
    over = window_requests > RPM or window_tokens > TPM
    return (
        f"  {tenant}  {requests:5} ok in {span:5.1f}s: {rpm_rate:6.0f} rpm {tpm_rate:7.0f} tpm;"
        f" binding {binding} ratio {ratio:.3f} (target >= {TARGET});"
        f" max in one window {window_requests} req / {window_tokens} tok"
        f" ({'OVER' if over else 'never over'}); 429s {per_key['rate_limited']}"
    )
