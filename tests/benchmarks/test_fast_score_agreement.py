"""Smoke test of benchmarks/fast_score_agreement.py on the committed bank and the real backbone (6 rows)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_rule_is_compared_with_judged_generations():
    cmd = [sys.executable, "benchmarks/fast_score_agreement.py", "--bank", "banks/smollm2-cpu", "--per-order", "1"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "6 test rows (orders 1-3, 3 should refuse)" in p.stdout
    rules = re.findall(r"^(gm>0\.5|greedy) \(n=(\d)\)\s+agree\s+(\d+)/6\s+DSR\s+([\d.]+) %\s+OR\s+([\d.]+) %", p.stdout, re.MULTILINE)
    assert sorted((r[0], r[1]) for r in rules) == [("gm>0.5", "3"), ("gm>0.5", "4"), ("greedy", "3"), ("greedy", "4")]
    assert all(0 <= int(r[2]) <= 6 and 0 <= float(r[3]) <= 100 and 0 <= float(r[4]) <= 100 for r in rules)
    gens = re.search(r"^generations: positives with the whole template\s+([\d.]+) %\s+negatives the base model's answer, token "
                     r"for token\s+([\d.]+) %", p.stdout, re.MULTILINE)  # fmt: skip
    assert gens and all(0 <= float(x) <= 100 for x in gens.groups())
