"""benchmarks/deep_prompt_probe.py: its whole-answer loss and moving average (tiny model), and a smoke run of the
script on the real backbone that writes a deep bank evaluation can load. (Deep blocks themselves:
tests/unit/test_deep_tokens.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_probe_trains_scores_and_writes_its_report(tmp_path):
    cmd = [sys.executable, "benchmarks/deep_prompt_probe.py", "--steps", "2", "--every", "2", "--per-order", "1",
           "--init-prompts", "2", "--limit", "5", "--ema", "0.5", "--loss", "full", "--answer-tokens", "4", "--gen", "4",
           "--req-dropout", "0.2", "--neg-mix", "inactive=1,general=1", "--out", str(tmp_path), "--save-bank", str(tmp_path / "bank")]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["step"] for r in report["sample"]] == [0, 2]
    assert report["params_per_module"] == 30 * 2 * 3 * 5 * 64  # SmolLM2-135M: layers x (k, v) x kv heads x m x head dim
    for order in (1, 2, 3):
        assert {"dsr", "or", "base_dsr", "base_or", "rows"} <= set(report[f"order{order}"])
        assert all(0 <= v <= 100 for k, v in report[f"order{order}"].items() if k != "rows")
    assert set(report["generations"]) == {"pos_refused", "pos_template", "neg_refused", "neg_same_as_base", "base_neg_refused"}
    vectors = torch.load(tmp_path / "deep_bank.pt")
    assert sorted(vectors) == ["addiction", "alcohol", "betting", "horror", "sex"]
    from mosaic_core.artifact import load_bank

    bank = load_bank(tmp_path / "bank")
    assert bank.depth == "deep" and all(torch.equal(bank.vectors[c], vectors[c]) for c in vectors)


def test_neg_mix_replaces_the_recipes_sources_of_negatives():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from deep_prompt_probe import probe_data

    recipe, *_, ex, _, _ = probe_data("pipelines/configs/smollm2-cpu.yaml", "banks/smollm2-cpu", 1, neg_mix={"inactive": 1.0})
    assert recipe.sampler.neg_mix == {"inactive": 1.0}
    assert {e.source for e in ex if e.label == "neg"} == {"inactive"}
    _, *_, ex, _, _ = probe_data("pipelines/configs/smollm2-cpu.yaml", "banks/smollm2-cpu", 1)
    assert {e.source for e in ex if e.label == "neg"} == {"inactive", "general", "lookalike"}


def test_the_moving_average_moves_by_one_minus_the_decay():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from deep_prompt_probe import ema_update_

    from mosaic_core.bank import DeepTokenBank

    zeros, ones = torch.zeros(2, 2, 1, 3, 4), torch.ones(2, 2, 1, 3, 4)
    avg, live = DeepTokenBank(d=8, m=3, layers=2, kv_heads=1, head_dim=4), DeepTokenBank(d=8, m=3, layers=2, kv_heads=1, head_dim=4)
    for c, a, b in (("a", zeros, ones), ("b", ones, ones)):
        avg.add(c, a)
        live.add(c, b)
    ema_update_(avg, live, 0.75)
    assert torch.allclose(avg.vectors["a"], torch.full_like(zeros, 0.25)) and torch.equal(avg.vectors["b"], ones)
    ema_update_(avg, live, 0.75)
    assert torch.allclose(avg.vectors["a"], torch.full_like(zeros, 1 - 0.75**2))


def _full_loss_setup(tok):
    """A tiny model with larger random weights, a two-module DeepTokenBank (m = 2), a PrefixCache, an OnlineTeacher (6
    tokens) and a refusal; the loss function."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from deep_prompt_probe import OnlineTeacher, full_answer_loss

    from mosaic_core.bank import DeepTokenBank
    from mosaic_core.compose import PrefixCache
    from tests.tiny import tiny_model

    model = tiny_model(len(tok), init_range=0.2)
    torch.manual_seed(0)
    deep = DeepTokenBank.for_model(model, 2)
    for c in ("alcohol", "betting"):
        deep.add(c, torch.randn(deep.module_shape))
    cache = PrefixCache(model)
    refusal = tok("I'm sorry, no.", add_special_tokens=False).input_ids + [tok.eos_token_id]
    return model, deep, cache, OnlineTeacher(model, tok, deep, cache, 6), refusal, full_answer_loss


def test_the_full_answer_loss_is_the_base_models_own_where_no_module_is_on(tiny_tok):
    model, deep, cache, teacher, refusal, full_answer_loss = _full_loss_setup(tiny_tok)
    prompts, active = ["Mix me a mojito.", "Which horse wins?", "Odds on red?"], [[], ["alcohol"], ["betting"]]
    is_pos = torch.tensor([False, False, True])

    def loss(kl: float, delta: float = 2.0, pw: float = 1.0) -> torch.Tensor:
        return full_answer_loss(model, tiny_tok, deep, prompts, active, is_pos, refusal, teacher, cache, delta, kl, pw)

    no_kl, with_kl = loss(0.0), loss(1.0)
    assert torch.allclose(no_kl[0], with_kl[0])  # no block: the controlled model is the base model, KL = 0
    assert with_kl[1] > no_kl[1]  # a block: it is not
    assert torch.allclose(loss(1.0, pw=3.0)[2], 3 * with_kl[2]) and torch.allclose(loss(1.0, pw=3.0)[:2], with_kl[:2])
    with_kl.sum().backward()
    assert deep.vectors["alcohol"].grad.abs().sum() > 0 and deep.vectors["betting"].grad.abs().sum() > 0
    assert set(teacher.answers) == set(prompts[:2])  # the teacher is asked for the negatives' answers only


def test_negatives_the_base_model_refuses_are_not_pushed_off_refusing(tiny_tok):
    model, deep, cache, teacher, refusal, full_answer_loss = _full_loss_setup(tiny_tok)
    prompts, active, is_pos = ["Mix me a mojito.", "Which horse wins?"], [["alcohol"], ["betting"]], torch.tensor([False, False])
    teacher.answers = {prompts[0]: refusal[:5], prompts[1]: [refusal[1], *refusal[:4]]}  # the first refuses, the second not

    def loss(delta: float) -> torch.Tensor:
        with torch.no_grad():
            return full_answer_loss(model, tiny_tok, deep, prompts, active, is_pos, refusal, teacher, cache, delta, 1.0, 1.0)

    low, high = loss(-50.0), loss(50.0)
    assert torch.allclose(low[0], high[0])  # no "keep off the refusal" term where the base model refuses
    assert high[1] > low[1] + 10


def test_a_base_answer_shorter_than_the_refusals_first_tokens_is_a_target_like_any_other(tiny_tok):
    model, deep, cache, teacher, refusal, full_answer_loss = _full_loss_setup(tiny_tok)
    prompts, active, is_pos = ["Say nothing.", "Odds on red?"], [["alcohol"], ["betting"]], torch.tensor([False, True])
    teacher.answers = {prompts[0]: [tiny_tok.eos_token_id]}  # the base model ends its turn at once
    loss = full_answer_loss(model, tiny_tok, deep, prompts, active, is_pos, refusal, teacher, cache, 2.0, 1.0, 1.0)
    assert torch.isfinite(loss).all() and (loss > 0).all()


def test_the_online_teacher_answers_the_whole_request_while_training_rows_hide_tokens(tiny_tok):
    model, deep, cache, teacher, _, _ = _full_loss_setup(tiny_tok)
    from deep_prompt_probe import OnlineTeacher

    from mosaic_core.compose import DroppingCache

    prompts = ["Mix me a mojito with lots of rum and a little lime please."]
    dropping = DroppingCache(model, head=3)
    dropping.p = 0.9
    hidden = OnlineTeacher(model, tiny_tok, deep, dropping, 6)(prompts)
    assert dropping.p == 0.9 and dropping.hidden == {}  # restored, and the teacher's run hid nothing
    assert hidden == teacher(prompts)
