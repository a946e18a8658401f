"""The run's result table as one Parquet dataset: a file per shard.

The driver writes the merged table from its state database exactly as the local
engine does (same columns, input order, OpenAI-batch files too), then splits it
by tenant group into `OUTPUT_STEM/shard-K.parquet`, streaming a batch at a time.
The merged file is kept only when asked. Each file is written under a temporary
name and renamed, so a crash leaves the previous file or none.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from runner.runs import write_outputs
from runner.sources import parquet as parquet_source
from runner.store import Store


def dataset_folder(output: Path) -> Path:
    """`out/result.parquet` -> `out/result/`."""
    return output.with_suffix("")


def write_dataset(
    store: Store, run_id: str, groups: Sequence[Sequence[str]], *, keep_merged: bool
) -> tuple[Path, ...]:
    """Every output of a finished run: the shard files, then the merged file
    when kept, then OpenAI-batch JSONL files when the input had that format."""
    merged, *batch_files = write_outputs(store, run_id)
    parts = split(merged, groups, dataset_folder(merged))
    if not keep_merged:
        merged.unlink()
    return (*parts, *([merged] if keep_merged else []), *batch_files)


def split(merged: Path, groups: Sequence[Sequence[str]], folder: Path) -> list[Path]:
    """`folder/shard-K.parquet` holding the rows whose tenant is in `groups[K]`,
    in input order; shard files of an earlier split beyond K are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    targets = [folder / f"shard-{index}.parquet" for index in range(len(groups))]
    for stale in set(folder.glob("shard-*.parquet")) - set(targets):
        stale.unlink()
    source = parquet_source.streaming(merged)
    temporaries = [target.with_name(f".{target.name}.{os.getpid()}.tmp") for target in targets]
    members = [pa.array(sorted(group), pa.string()) for group in groups]
    try:
        with contextlib.ExitStack() as stack:
            writers = [
                stack.enter_context(pq.ParquetWriter(path, source.schema_arrow))
                for path in temporaries
            ]
            for batch in source.iter_batches():
                tenants = batch.column("tenant")
                for writer, group in zip(writers, members, strict=True):
                    writer.write_batch(batch.filter(pc.is_in(tenants, value_set=group)))
        for temporary, target in zip(temporaries, targets, strict=True):
            os.replace(temporary, target)
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
    return targets
