"""The benchmark suite: each scenario generates its inputs, starts the simulator
as a separate process, runs the CLI as a user would and prints one line per
figure with the ratio it is judged by.

    python bench/run.py                     # every scenario, full size
    python bench/run.py overhead latency    # some of them
    python bench/run.py --quick limits      # the small size the test suite runs

Results go to bench/RESULTS.md with the commit they were measured on.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import time
from pathlib import Path

SCENARIOS = ("overhead", "latency", "limits", "isolation", "scale", "resume")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", choices=[[], *SCENARIOS], metavar="SCENARIO")
    parser.add_argument("--quick", action="store_true", help="small sizes, for the tests")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
    ).stdout.strip()
    print(f"# commit {commit or 'unknown'}{' (quick sizes)' if args.quick else ''}", flush=True)
    for name in args.scenarios or SCENARIOS:
        started = time.monotonic()
        for line in importlib.import_module(name).run(args.quick):
            print(line, flush=True)
        print(f"  ({name} took {time.monotonic() - started:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
