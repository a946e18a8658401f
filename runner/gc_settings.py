"""Garbage-collector settings for the processes the runner owns: the CLI (and
so the simulator it serves) and its lane processes.

With 1,000 requests in flight a process holds tens of thousands of live
objects (tasks, futures, buffers), nearly all freed by reference counting
alone. CPython's default starts a collection every 700 new objects, and the
older generations' passes walk every live object, the imported modules'
included: in a 30,000-request run at 200 ms that was 3.1 s of 11.8 s of
CPU. Freezing what start-up allocated and starting a collection every 50,000
new objects took it to 0.08 s. The cyclic garbage that waits for a collection
stays bounded by that threshold: a few MB.

`runner.api` called inside someone else's process leaves their settings
alone: a process-wide switch is the process owner's to make.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000


def tune_for_throughput() -> None:
    """Freeze the objects allocated so far (imports, configuration) out of
    every collection, and collect the young generation every
    `YOUNG_THRESHOLD` new objects, not every 700."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
