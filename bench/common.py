"""What the benchmark scenarios share: the simulator in its own process, input and
job files, and running the CLI as a user would while measuring it.

Every scenario measures the runner from the outside: wall time and peak RSS of a
`python -m runner ...` subprocess, and what the simulator's `/stats` saw.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MODEL = "gpt-4.1-mini"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class Simulator:
    """`runner simulate` running in a subprocess."""

    process: subprocess.Popen[str]
    base_url: str

    def stats(self) -> dict[str, Any]:
        url = self.base_url.removesuffix("/v1") + "/stats"
        with urllib.request.urlopen(url, timeout=30) as response:
            return dict(json.load(response))


@contextmanager
def simulator(*options: str) -> Iterator[Simulator]:
    """`runner simulate --port 0 OPTIONS...`, stopped on exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", "runner", "simulate", "--port", "0", *options],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("simulator listening on "):
            raise RuntimeError(f"the simulator did not start: {line!r}")
        yield Simulator(process, line.split()[3])
    finally:
        process.terminate()
        process.wait()


@dataclass(frozen=True)
class Measured:
    """One finished subprocess: its exit code, output, wall time and peak RSS."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak_rss_mb: float


def measure(args: Sequence[str], *, cwd: Path, env: Mapping[str, str] | None = None) -> Measured:
    """Run a command to its end; its own peak RSS comes from `wait4`, so no other
    process is counted."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.monotonic()
        process = subprocess.Popen(
            list(args), cwd=cwd, env={**os.environ, **(env or {})}, stdout=out, stderr=err
        )
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
        out.seek(0)
        err.seek(0)
        return Measured(process.returncode, out.read(), err.read(), wall, usage.ru_maxrss / 1024)


def runner_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "runner", *args]


def check(measured: Measured, what: str, *, allowed: tuple[int, ...] = (0,)) -> Measured:
    if measured.returncode not in allowed:
        sys.exit(f"{what} exited {measured.returncode}:\n{measured.stderr[-3000:]}")
    return measured


def key(tenant: str) -> str:
    return f"sk-bench-{tenant}"


def key_env(tenants: Sequence[str]) -> dict[str, str]:
    return {f"{tenant.upper()}_API_KEY": key(tenant) for tenant in tenants}


def write_job(
    work: Path,
    base_url: str,
    tenants: Mapping[str, Mapping[str, int]],
    *,
    input_name: str,
    max_tokens: int = 16,
) -> Path:
    """A job reading `input_name` from `work` into out.parquet and state.db."""
    sections = "".join(
        f"[tenants.{name}]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items())
        for name, limits in tenants.items()
    )
    path = work / "job.toml"
    path.write_text(
        f'[job]\nname = "bench"\ninput = "{input_name}"\noutput = "out.parquet"\n'
        f'state = "state.db"\n[defaults]\nmodel = "{MODEL}"\nmax_tokens = {max_tokens}\n'
        f'[provider]\nbase_url = "{base_url}"\ntimeout_s = 120\n{sections}',
        encoding="utf-8",
    )
    return path


def write_jsonl(path: Path, rows: Iterator[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def short_rows(count: int, tenants: Sequence[str]) -> Iterator[dict[str, Any]]:
    """`count` short prompts dealt round-robin to `tenants`."""
    for i in range(count):
        tenant = tenants[i % len(tenants)]
        yield {"id": f"r{i}", "tenant": tenant, "prompt": f"Question {i}: answer in one line."}


def real_texts() -> list[str]:
    """The benchmark questions in ../shared/data, as plain text, for realistic prompts."""
    texts = []
    for name in ("mt_bench_questions.jsonl", "vicuna_bench_questions.jsonl"):
        for line in (SHARED_DATA / name).read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            texts.append(" ".join(record.get("turns") or [record.get("text", "")]))
    return [text for text in texts if text]


def write_long_prompts_parquet(
    path: Path, count: int, tenants: Sequence[str], *, seed: int = 0, batch: int = 50_000
) -> int:
    """`count` rows with prompts of 200-2,000 characters stitched from real
    questions, written in row groups of `batch` without holding them all.
    Returns the total prompt characters."""
    rng = random.Random(seed)
    texts = real_texts()
    schema = pa.schema([("id", pa.string()), ("tenant", pa.string()), ("prompt", pa.string())])
    total = 0
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, count, batch):
            ids, owners, prompts = [], [], []
            for i in range(start, min(start + batch, count)):
                target = rng.randint(200, 2000)
                prompt = f"Request {i}. "
                while len(prompt) < target:
                    prompt += rng.choice(texts) + " "
                prompt = prompt[:target]
                ids.append(f"r{i}")
                owners.append(tenants[i % len(tenants)])
                prompts.append(prompt)
                total += len(prompt)
            writer.write_table(pa.table({"id": ids, "tenant": owners, "prompt": prompts}, schema))
    return total


def unlimited(tenants: Sequence[str], max_parallel: int) -> dict[str, dict[str, int]]:
    """Tenant sections whose limits never bind."""
    return {t: {"rpm": 100_000_000, "tpm": 10**12, "max_parallel": max_parallel} for t in tenants}
