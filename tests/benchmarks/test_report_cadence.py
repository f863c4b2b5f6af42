"""Smoke test of benchmarks/report_cadence.py: two real `mosaic train` runs on the tiny model (4 steps each)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_both_cadences_train_and_are_compared():
    cmd = [sys.executable, "benchmarks/report_cadence.py", "--steps", "4", "--every", "1", "2"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = re.findall(r"^\| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", p.stdout, re.MULTILINE)
    assert [(r[0], r[1]) for r in rows] == [("1", "4"), ("2", "4")]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)
    assert re.search(r"^report_every 2 vs 1: epoch [\d.]+x faster, whole fit [\d.]+x faster$", p.stdout, re.MULTILINE)
