"""What the benchmark scenarios share: the simulator in its own process, input and
job files, and running the CLI as a user would while measuring it.

Every scenario measures the runner from the outside: wall time and peak RSS of a
`python -m runner ...` subprocess, and what the simulator's `/stats` saw.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

MODEL = "gpt-4.1-mini"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class Simulator:
    """`runner simulate` running in a subprocess."""

    process: subprocess.Popen[str]
    base_url: str

    def cpu_s(self) -> float:
        """CPU seconds the simulator process has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stats(self, *, brief: bool = False) -> dict[str, Any]:
        """What the simulator saw; `brief` leaves out the per-request-id map."""
        url = self.base_url.removesuffix("/v1") + "/stats" + ("?brief=1" if brief else "")
        with urllib.request.urlopen(url, timeout=30) as response:
            return dict(json.load(response))


@contextmanager
def simulator(*options: str) -> Iterator[Simulator]:
    """`runner simulate --port 0 OPTIONS...`, stopped on exit."""
    with _server([sys.executable, "-m", "runner", "simulate", "--port", "0", *options]) as sim:
        yield sim


@contextmanager
def fast_server(*options: str) -> Iterator[Simulator]:
    """`node bench/fast_server.js OPTIONS...` (only `--latency`), stopped on exit."""
    script = str(Path(__file__).with_name("fast_server.js"))
    with _server(["node", script, *options]) as sim:
        yield sim


def have_node() -> bool:
    return shutil.which("node") is not None


@contextmanager
def _server(command: Sequence[str]) -> Iterator[Simulator]:
    """A server that prints `simulator listening on URL` once it listens."""
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, text=True)
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
    """One finished subprocess: its exit code, output, wall time, peak RSS (of
    the process and its children together: a run over several processes is
    counted whole) and CPU seconds (user plus system, children included)."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak_rss_mb: float
    cpu_s: float


class Running:
    """A command started in the background; `wait()` measures it like `measure`."""

    def __init__(self, args: Sequence[str], *, cwd: Path, env: Mapping[str, str] | None) -> None:
        # Files, not pipes, so a chatty process never blocks; closed by wait().
        self._out = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self._err = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            list(args),
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=self._out,
            stderr=self._err,
        )
        self._peak_mb = 0.0
        self._sampler = threading.Thread(target=self._sample_tree_rss, daemon=True)
        self._sampler.start()

    def wait(self) -> Measured:
        """Wait for the end. CPU time comes from `wait4` (the process and the
        children it waited for, no other process). Peak RSS is sampled every
        100 ms from /proc: the larger of the sum over the process and its
        children and the largest peak of one of them (`VmHWM`). Not `wait4`'s
        `ru_maxrss`: Linux carries the peak of the process that forked over an
        exec, so it gave this script's own memory (338 MB after writing the
        100,000-row input, where no runner process passed 186)."""
        _, status, usage = os.wait4(self.process.pid, 0)
        wall = time.monotonic() - self.started
        self.process.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
        self._sampler.join()
        stdout, stderr = (self._read_and_close(handle) for handle in (self._out, self._err))
        cpu = usage.ru_utime + usage.ru_stime
        return Measured(self.process.returncode, stdout, stderr, wall, self._peak_mb, cpu)

    def _sample_tree_rss(self) -> None:
        while self.process.returncode is None:
            processes = _tree_memory_mb(self.process.pid)
            if processes:
                total = sum(rss for rss, _ in processes)
                self._peak_mb = max(self._peak_mb, total, *(peak for _, peak in processes))
            time.sleep(0.1)

    @staticmethod
    def _read_and_close(handle: IO[str]) -> str:
        handle.seek(0)
        text = handle.read()
        handle.close()
        return text


def _tree_memory_mb(pid: int, parent_command: bytes = b"") -> list[tuple[float, float]]:
    """(resident MB, peak resident MB) of `pid` and each of its descendants,
    from Linux /proc (none for a process that has gone meanwhile). A child whose
    command line is still its parent's has been forked but has not yet exec'd:
    its pages are its parent's, already counted (a sampler that caught a lane
    process in that instant once counted the runner's 100 MB twice)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        if command == parent_command:
            return []
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        memory = (int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024)
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (OSError, KeyError, IndexError, ValueError):
        return []
    return [memory] + [m for child in children for m in _tree_memory_mb(int(child), command)]


def kill_tree(running: Running, *, timeout_s: float = 30.0) -> None:
    """SIGKILL `running` (a runner's parent process, as a crash would) and wait
    until its lane processes have gone too: they abort once their pipe to it
    closes, and until then they may still send."""
    pid = running.process.pid
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    running.process.send_signal(signal.SIGKILL)
    running.wait()
    deadline = time.monotonic() + timeout_s
    while any(_alive(int(child)) for child in children):
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"lane processes {children} still running {timeout_s:.0f}s after the kill"
            )
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie, gone but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def measure(args: Sequence[str], *, cwd: Path, env: Mapping[str, str] | None = None) -> Measured:
    """Run a command to its end."""
    return Running(args, cwd=cwd, env=env).wait()


def first_request_after(sim: Simulator, running: Running, *, seen: int, poll_s: float) -> float:
    """Seconds from the start of `running` until the server has seen more than
    `seen` requests (or until it ended without sending any)."""
    while sim.stats(brief=True)["requests"] <= seen and running.process.poll() is None:
        time.sleep(poll_s)
    return time.monotonic() - running.started


@dataclass(frozen=True)
class Sending:
    """How one client drained an input: the requests the server got, its answers,
    the seconds from the first request to the last answer, the wall time of
    the client's whole process, and the CPU seconds the client and the server
    used."""

    requests: int
    answers: int
    sending_s: float
    wall_s: float
    client_cpu_s: float
    server_cpu_s: float


def bare_loop(
    work: Path,
    *options: str,
    concurrency: int,
    max_tokens: int = 16,
    loop: str = "uvloop",
    fast: bool = False,
) -> Sending:
    """`bare_loop.py` over `work`/in.jsonl against a fresh `simulator(*options)`
    (`fast_server` if `fast`), on `loop` ("uvloop", the runner's, or "asyncio")."""
    with (fast_server if fast else simulator)(*options) as sim:
        script = str(Path(__file__).with_name("bare_loop.py"))
        args = [sys.executable, script, sim.base_url, "in.jsonl", str(concurrency)]
        args += [str(max_tokens), loop]
        idle_cpu_s = sim.cpu_s()
        done = check(measure(args, cwd=work), "the bare loop")
        server_cpu_s = sim.cpu_s() - idle_cpu_s
    report = json.loads(done.stdout)
    answers, sending_s = report["ok"], report["seconds"]
    return Sending(report["requests"], answers, sending_s, done.wall_s, done.cpu_s, server_cpu_s)


def runner_submit(
    work: Path,
    *options: str,
    tenants: Sequence[str],
    max_parallel: int,
    run_id: str,
    fast: bool = False,
) -> Sending:
    """`runner submit` of `work`/in.jsonl (limits that never bind) against a fresh
    `simulator(*options)` (`fast_server` if `fast`); the sending time as the
    server saw it."""
    with (fast_server if fast else simulator)(*options) as sim:
        limits = unlimited(tenants, max_parallel)
        job = write_job(work, sim.base_url, limits, input_name="in.jsonl")
        submit = runner_cli("submit", str(job), "--run-id", run_id)
        idle_cpu_s = sim.cpu_s()
        done = check(measure(submit, cwd=work, env=key_env(tenants)), "runner")
        server_cpu_s = sim.cpu_s() - idle_cpu_s
        stats = sim.stats(brief=True)
    span = max(stats["last_ok_at"].values()) - min(stats["first_ok_at"].values())
    cpu = done.cpu_s
    return Sending(stats["requests"], answered(stats), span, done.wall_s, cpu, server_cpu_s)


def answered(stats: Mapping[str, Any]) -> int:
    """The ok answers the simulator gave, over all keys."""
    return sum(entry["ok"] for entry in stats["per_key"].values())


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
    provider: str = "",
) -> Path:
    """A job reading `input_name` from `work` into out.parquet and state.db;
    `provider` holds extra lines for its [provider] table."""
    sections = "".join(
        f"[tenants.{name}]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items())
        for name, limits in tenants.items()
    )
    path = work / "job.toml"
    path.write_text(
        f'[job]\nname = "bench"\ninput = "{input_name}"\noutput = "out.parquet"\n'
        f'state = "state.db"\n[defaults]\nmodel = "{MODEL}"\nmax_tokens = {max_tokens}\n'
        f'[provider]\nbase_url = "{base_url}"\ntimeout_s = 120\n{provider}\n{sections}',
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
