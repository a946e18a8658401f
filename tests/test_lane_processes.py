"""How many processes a run gets, and which tenants go together."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from runner import carried_columns
from runner.config import Job
from runner.lane_processes import AUTO_MIN_ROWS, process_count, tenant_groups
from runner.store import Store
from tests.conftest import new_run, python_then_report
from tests.test_store import request


def test_auto_splits_a_large_run_over_the_cores_and_never_over_more_than_its_tenants(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("runner.lane_processes._cores", lambda: 2)
    assert process_count("auto", rows=AUTO_MIN_ROWS - 1, tenants=20) == 1
    assert process_count("auto", rows=AUTO_MIN_ROWS, tenants=20) == 2
    assert process_count("auto", rows=10**6, tenants=1) == 1
    monkeypatch.setattr("runner.lane_processes._cores", lambda: 64)
    assert process_count("auto", rows=10**6, tenants=20) == 4  # AUTO_MAX_PROCESSES


def test_a_set_count_holds_at_any_size_but_never_exceeds_the_tenants() -> None:
    assert process_count(3, rows=5, tenants=10) == 3
    assert process_count(3, rows=5, tenants=2) == 2
    assert process_count(3, rows=0, tenants=0) == 1


def test_groups_hold_every_tenant_with_rows_once_balanced_by_their_work(
    tmp_path: Path,
) -> None:
    job = Job.model_validate(
        {
            "job": {"name": "j", "input": "in.jsonl", "output": "o.parquet", "processes": 2},
            "tenants": {name: {"rpm": 600} for name in ("a", "b", "c", "idle")},
        }
    )
    store = Store(tmp_path / "state.db")
    new_run(store, "r")
    counts = {"a": 300, "b": 200, "c": 100, "idle": 0}  # a alone; b and c together
    tenants = [tenant for tenant, count in counts.items() for _ in range(count)]
    requests = [request(seq, f"id{seq}", tenant) for seq, tenant in enumerate(tenants)]
    store.register(
        "r",
        requests,
        [],
        carried_columns.encode(pa.record_batch({"n": range(len(tenants))})),
        first_seq=0,
    )
    assert tenant_groups(store, "r", job) == [["a"], ["b", "c"]]
    one = job.model_copy(update={"job": job.job.model_copy(update={"processes": 1})})
    assert tenant_groups(store, "r", one) == [["a", "b", "c"]]
    store.close()


def test_a_lane_process_sends_without_importing_pyarrow_or_the_readers(tmp_path: Path) -> None:
    # (about 40 MB and a third of a second less for each lane process)
    # With stdin at its end the child returns at once, as when its parent is gone.
    report = (
        "import sys; sys.stderr.write(str(sorted(name for name in sys.modules"
        " if name.split('.')[0] == 'pyarrow'"
        " or name in ('runner.api', 'runner.runs', 'runner.sinks', 'runner.sources'))))"
    )
    command = "from runner.lane_processes import main; main()"
    assert python_then_report(command, report, cwd=tmp_path) == "[]"
