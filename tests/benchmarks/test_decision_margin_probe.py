"""Smoke test of benchmarks/decision_margin_probe.py on the committed bank and the real backbone (2 steps, 6 rows)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_steps_move_only_trainable_vectors_within_the_cap(tmp_path):
    from safetensors.torch import load_file

    from mosaic_core.artifact import load_bank

    out = tmp_path / "bank"
    cmd = [sys.executable, "benchmarks/decision_margin_probe.py", "--bank", "banks/smollm2-cpu", "--per-order", "1",
           "--steps", "2", "--every", "2", "--out", str(out)]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "1200 train examples, 6 test-sample rows" in p.stdout
    rates = re.findall(r"^step +(\d+): test sample, greedy prefix: DSR +([\d.]+) %  OR +([\d.]+) %", p.stdout, re.MULTILINE)
    assert [r[0] for r in rates] == ["0", "2"] and all(0 <= float(x) <= 100 for r in rates for x in r[1:])
    before, after = load_bank(ROOT / "banks" / "smollm2-cpu"), load_bank(out)
    assert after.categories == before.categories
    changed = 0
    for c in before.categories:
        old = load_file(ROOT / "banks" / "smollm2-cpu" / c / "tokens.safetensors")["tokens"]
        new = load_file(out / c / "tokens.safetensors")["tokens"]
        changed += not new.equal(old)
        assert float(new.norm(dim=-1).max()) <= before.max_norm * (1 + 1e-5)
    assert changed >= 1  # modules active in the two batches moved (the others get no gradient)
