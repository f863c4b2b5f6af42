"""Fault injection for the training tests, through `pipelines.train.main(step_hook=...)`: the loop calls the hook
after every step and does not know what it does."""

from __future__ import annotations

import os
import time
from pathlib import Path

KILL_STEP = 3
MARKER = ".fail_injected"


def kill_last_rank_once(step: int, rank: int, world: int, run_dir: str) -> None:
    """SIGKILL the last rank once, after step KILL_STEP (the test's recipe reports every step).

    After that step's report: Ray Train's per-worker result queue holds one report and a poll takes one every 2 s, so
    the last checkpoint's report may still sit unconsumed in a queue; dying then would lose it (the restart would
    begin at step 0). The report having returned means this rank's was consumed; the wait lets the other ranks' be
    too."""
    marker = Path(run_dir) / MARKER
    if step != KILL_STEP or rank != world - 1 or marker.exists():
        return
    time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)))
    marker.write_text(f"killed rank {rank} at step {step}\n")
    os.kill(os.getpid(), 9)
