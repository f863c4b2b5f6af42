"""Smoke test of benchmarks/linear_probe_ceiling.py on the real backbone (30 requests per split)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_both_read_outs_are_scored_on_every_order(tmp_path):
    cmd = [sys.executable, "benchmarks/linear_probe_ceiling.py", "--limit", "30", "--wd", "1e-3", "--out", str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n"] == {"train": 30, "val": 30, "test": 30}
    for pool in ("last", "mean"):
        r = report[pool]
        assert r["weight_decay"] == 1e-3 and 0 < r["threshold"] < 1
        assert sorted(r["test"]) == ["1", "2", "3"]
        assert all(0 <= v <= 100 for o in r["test"].values() for v in o.values())
        assert set(r["per_category_accuracy"]) == {"addiction", "alcohol", "betting", "horror", "sex"}
    lines = re.findall(r"^  order (\d): DSR +[\d.]+ %  OR +[\d.]+ %", p.stdout, re.MULTILINE)
    assert lines == ["1", "2", "3", "1", "2", "3"]
