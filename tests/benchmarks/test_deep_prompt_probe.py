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


def test_generating_with_a_deep_block_continues_as_the_bank_does(tiny_tok):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from deep_prompt_probe import DeepBank, deep_generate, init_from_bank

    from mosaic_core.bank import ControlTokenBank
    from mosaic_core.compose import PrefixCache, encode_batch
    from mosaic_core.config import BankConfig
    from mosaic_core.generation import generate
    from tests.tiny import tiny_model

    # larger random weights than the fixture's: at 0.02 the tiny model answers newlines whatever comes before
    tok, model = tiny_tok, tiny_model(len(tiny_tok), init_range=0.2)
    cfg = BankConfig(categories=("alcohol", "betting"), m=3, init="normal", placement="before_assistant", seed=1)
    bank = ControlTokenBank.build(cfg, model.get_input_embeddings().weight)
    prompts, active = ["Mix me a mojito, please.", "Which horse wins?"], [["alcohol"], []]
    deep = DeepBank(bank.categories, init_from_bank(model, tok, bank, prompts[:1]))
    got = deep_generate(model, tok, deep, [(p, a, False) for p, a in zip(prompts, active)], PrefixCache(model), 8)
    enc = encode_batch(tok, model.get_input_embeddings(), bank, prompts, active, "before_assistant")
    gens = generate(model, enc, max_new_tokens=8, eos_token_ids=[tok.eos_token_id])
    want = [g.token_ids + ([tok.eos_token_id] if g.finish_reason == "stop" else []) for g in gens]
    assert got == want
    without = deep_generate(model, tok, deep, [(prompts[0], [], False)], PrefixCache(model), 8)
    assert without != want[:1]  # the block is what made the first answer: the check above can fail


@pytest.mark.slow
def test_the_probe_trains_scores_and_writes_its_report(tmp_path):
    cmd = [sys.executable, "benchmarks/deep_prompt_probe.py", "--steps", "2", "--every", "2", "--per-order", "1",
           "--init-prompts", "2", "--limit", "5", "--ema", "0.5", "--loss", "full", "--answer-tokens", "4", "--gen", "4",
           "--out", str(tmp_path)]  # fmt: skip
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


def test_the_moving_average_moves_by_one_minus_the_decay():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from deep_prompt_probe import DeepBank, ema_update_

    zeros, ones = torch.zeros(2, 2, 1, 3, 4), torch.ones(2, 2, 1, 3, 4)
    avg, live = DeepBank(["a", "b"], {"a": zeros, "b": ones}), DeepBank(["a", "b"], {"a": ones, "b": ones})
    ema_update_(avg, live, 0.75)
    assert torch.allclose(avg.vectors["a"], torch.full_like(zeros, 0.25)) and torch.equal(avg.vectors["b"], ones)
    ema_update_(avg, live, 0.75)
    assert torch.allclose(avg.vectors["a"], torch.full_like(zeros, 1 - 0.75**2))


def _full_loss_setup(tok):
    """A tiny model with larger random weights, a two-module DeepBank (m = 2), a PrefixCache, an OnlineTeacher (6
    tokens) and a refusal; the loss function."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from deep_prompt_probe import DeepBank, OnlineTeacher, full_answer_loss

    from mosaic_core.compose import PrefixCache
    from tests.tiny import tiny_model

    model = tiny_model(len(tok), init_range=0.2)
    torch.manual_seed(0)
    cfg = model.config
    shape = (cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 2, cfg.hidden_size // cfg.num_attention_heads)
    deep = DeepBank(["alcohol", "betting"], {c: torch.randn(shape) for c in ("alcohol", "betting")})
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
