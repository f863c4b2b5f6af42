"""Smoke test of benchmarks/gated_module_probe.py on the committed bank and the real backbone (40 gate requests,
12 test-sample rows, 2 token steps)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_rule_is_scored_and_the_refusing_bank_is_saved(tmp_path):
    from mosaic_core.artifact import load_bank

    cmd = [sys.executable, "benchmarks/gated_module_probe.py", "--limit", "40", "--per-order", "2", "--steps", "2",
           "--out", str(tmp_path)]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n"] == 12 and report["steps"] == 2
    assert set(report["rates"]) == {"bank", "base", "gate + bank", "gate + refusing tokens", "refusing tokens, no gate"}
    assert all(0 <= v <= 100 for r in report["rates"].values() for v in r.values())
    assert "gates: 40 train requests, 12 test-sample rows" in p.stdout
    assert load_bank(tmp_path / "refusing-bank").categories == load_bank(ROOT / "banks" / "smollm2-cpu").categories
