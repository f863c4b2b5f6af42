"""benchmarks/deep_prompt_probe.py: deep blocks taken from a bank's own keys/values reproduce the bank exactly (tiny
model: RoPE, positions and padding are right), and a smoke run of the script on the real backbone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_a_deep_block_read_off_the_bank_gives_the_banks_logits(tiny_backbone):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from deep_prompt_probe import DeepBank, deep_logits, init_from_bank

    from mosaic_core.bank import ControlTokenBank
    from mosaic_core.compose import PrefixCache, answer_logits, encode_batch
    from mosaic_core.config import BankConfig

    tok, model = tiny_backbone.tokenizer, tiny_backbone.model
    cfg = BankConfig(categories=("alcohol", "betting"), m=3, init="normal", placement="before_assistant", seed=1)
    bank = ControlTokenBank.build(cfg, model.get_input_embeddings().weight)
    long, short = "What's a good cocktail for a summer party with mint and lime?", "How do odds work?"
    target = tok("I'm sorry", add_special_tokens=False).input_ids
    with torch.no_grad():
        deep = DeepBank(bank.categories, init_from_bank(model, tok, bank, [long]))  # one prompt: its exact states
        got, _, mask = deep_logits(model, tok, deep, [long, short], [["alcohol"], []], [target, target], PrefixCache(model))
        enc = encode_batch(tok, model.get_input_embeddings(), bank, [long, short], [["alcohol"], []], "before_assistant",
                           [target, target])  # fmt: skip
        want, _, _ = answer_logits(model, enc)
    assert mask.all()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the same block after a request of another length: keys re-rotated, so it is not just a copy of `want`
    with torch.no_grad():
        other, _, _ = deep_logits(model, tok, deep, [short], [["alcohol"]], [target], PrefixCache(model))
    assert not torch.allclose(other[0], want[0], atol=1e-4)


@pytest.mark.slow
def test_the_probe_trains_scores_and_writes_its_report(tmp_path):
    cmd = [sys.executable, "benchmarks/deep_prompt_probe.py", "--steps", "2", "--every", "2", "--per-order", "1",
           "--init-prompts", "2", "--limit", "5", "--out", str(tmp_path)]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["step"] for r in report["sample"]] == [0, 2]
    assert report["params_per_module"] == 30 * 2 * 3 * 5 * 64  # SmolLM2-135M: layers x (k, v) x kv heads x m x head dim
    for order in (1, 2, 3):
        assert {"dsr", "or", "base_dsr", "base_or", "rows"} <= set(report[f"order{order}"])
        assert all(0 <= v <= 100 for k, v in report[f"order{order}"].items() if k != "rows")
    vectors = torch.load(tmp_path / "deep_bank.pt")
    assert sorted(vectors) == ["addiction", "alcohol", "betting", "horror", "sex"]
