"""Smoke test of benchmarks/decision_margin_probe.py on the committed bank and the real backbone (2 steps, 6 rows),
with the recipe's examples and with counterfactual pairs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("data", ["recipe", "pairs"])
def test_two_steps_move_only_trainable_vectors_within_the_cap(tmp_path, data):
    from safetensors.torch import load_file

    from mosaic_core.artifact import load_bank

    out = tmp_path / "bank"
    cmd = [sys.executable, "benchmarks/decision_margin_probe.py", "--bank", "banks/smollm2-cpu", "--per-order", "1",
           "--steps", "2", "--every", "2", "--data", data, "--out", str(out)]  # fmt: skip
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


def test_counterfactual_batches_pair_each_target_with_opposite_labels():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from decision_margin_probe import counterfactual_batches

    from mosaic_core.sampling import Request

    cats = ["a", "b", "c", "d", "e"]
    train = [Request(f"{c}{k}{i}", f"{k} {c} {i}", None if k == "general" else c, k)
             for c in cats for k in ("target", "lookalike", "general") for i in range(3)]  # fmt: skip
    kinds = {q.prompt: q for q in train}
    gen = counterfactual_batches(train, cats, 8, seed=0)
    for _ in range(50):
        b = next(gen)
        assert len(b) == 8
        for (p1, s1, y1), (p2, s2, y2) in zip(b[0:6:2], b[1:6:2]):
            c = kinds[p1].category
            assert p1 == p2 and kinds[p1].kind == "target" and (y1, y2) == (True, False)
            assert c in s1 and c not in s2 and len(s1) == len(s2) and 1 <= len(s1) <= 3
        (pl, sl, yl), (pg, sg, yg) = b[6], b[7]
        assert kinds[pl].kind == "lookalike" and kinds[pl].category in sl and not yl
        assert kinds[pg].kind == "general" and not yg and len(set(sg)) == len(sg)
