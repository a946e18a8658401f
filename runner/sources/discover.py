"""Input discovery for scheduled jobs: a job's `input` may name one file, a
folder, or a glob (`inbox/*.parquet`).

For a folder or glob, a submit takes every input file that this job has not
processed before, in name order, skipping files that are still being written:
names ending in .tmp, .part, .partial, .crdownload or .filepart, hidden files,
and files whose size or modification time changes while `settle_s` passes.
"""

from __future__ import annotations

import glob
import hashlib
import time
from collections.abc import Iterable
from pathlib import Path

from runner.config import Job
from runner.sources import JSONL_SUFFIXES, PARQUET_SUFFIXES

PARTIAL_SUFFIXES = frozenset({".tmp", ".part", ".partial", ".crdownload", ".filepart"})


def is_pattern(path: Path) -> bool:
    """True for a folder or a glob, False for one file."""
    return path.is_dir() or any(char in str(path) for char in "*?[")


def candidates(pattern: Path) -> list[Path]:
    """Input files the folder or glob names now, in name order."""
    if pattern.is_dir():
        paths = list(pattern.iterdir())
    else:
        paths = [Path(name) for name in glob.glob(str(pattern))]
    return sorted(
        path.resolve()
        for path in paths
        if path.is_file()
        and not path.name.startswith(".")
        and path.suffix.lower() not in PARTIAL_SUFFIXES
        and path.suffix.lower() in PARQUET_SUFFIXES | JSONL_SUFFIXES
    )


def settled(paths: Iterable[Path], settle_s: float) -> tuple[list[Path], list[Path]]:
    """(files that stood still for `settle_s`, files still changing or gone)."""
    paths = list(paths)

    def snapshot() -> list[tuple[int, int] | None]:
        return [_signature(path) for path in paths]

    before = snapshot()
    if paths and settle_s > 0:
        time.sleep(settle_s)
    after = snapshot()
    ready: list[Path] = []
    busy: list[Path] = []
    for path, first, second in zip(paths, before, after, strict=True):
        (ready if first is not None and first == second else busy).append(path)
    return ready, busy


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:  # moved away meanwhile
        return None
    return stat.st_size, stat.st_mtime_ns


def combined_hash(hashes: Iterable[tuple[Path, str]]) -> str:
    """One sha256 for a set of files, from their paths and contents' hashes."""
    digest = hashlib.sha256()
    for path, file_digest in hashes:
        digest.update(f"{path}\0{file_digest}\n".encode())
    return digest.hexdigest()


def input_files(job: Job) -> list[Path]:
    """The files a job's input names now: its one file, or every candidate of its
    folder or glob (for estimates; a submit also skips processed and busy files)."""
    return candidates(job.job.input) if is_pattern(job.job.input) else [job.job.input]
