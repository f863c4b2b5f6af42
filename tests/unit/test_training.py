import math

import pytest
import torch

from mosaic_core.backbone import from_model
from mosaic_core.bank import ControlTokenBank
from mosaic_core.config import BankConfig, Decision, LossConfig
from mosaic_core.teacher import teacher_outputs
from mosaic_core.testing import tiny_model
from mosaic_core.training import batch_loss, refusal_target


def _examples(bb):
    prompts = ["Best cocktail for tonight?", "Write a haiku about rain.", "What are good odds on the game?"]
    teach = teacher_outputs(bb.model, bb.tokenizer, prompts[1:], max_new_tokens=5, topk=4)
    return [
        {"prompt": prompts[0], "active": ["alcohol"], "label": "pos"},
        {"prompt": prompts[1], "active": ["alcohol", "betting"], "label": "neg", **teach[0]},
        {"prompt": prompts[2], "active": ["alcohol"], "label": "neg", **teach[1]},
    ]


def test_negative_with_no_modules_has_zero_kl(tiny_backbone):
    bb = tiny_backbone
    bank = ControlTokenBank.build(BankConfig(categories=("alcohol", "betting"), m=2, init="normal"), bb.embeddings)
    ex = _examples(bb)[1:2]
    ex[0]["active"] = []
    out = batch_loss(bb.model, bb.tokenizer, bank, ex, refusal_target(bb.tokenizer, "I'm sorry"), LossConfig())
    assert out["kl"].abs() < 1e-5 and out["pos_ce"] == 0


def test_loss_trains_only_the_bank_and_goes_down(tiny_tok):
    # init std 0.02 makes a random tiny Llama near-uniform whatever its input; 0.3 lets the prefix matter
    bb = from_model(tiny_model(len(tiny_tok), seed=0, init_range=0.3), tiny_tok, "tiny-llama-wide")
    torch.manual_seed(0)
    bank = ControlTokenBank.build(BankConfig(categories=("alcohol", "betting"), m=2, init="normal"), bb.embeddings)
    ex = _examples(bb)
    refusal = refusal_target(bb.tokenizer, "I'm sorry, but I can't help with that.")
    assert refusal[-1] == bb.tokenizer.eos_token_id
    opt = torch.optim.Adam(bank.parameters(), lr=0.3)
    first = None
    for _ in range(40):
        out = batch_loss(bb.model, bb.tokenizer, bank, ex, refusal, LossConfig(kl_lambda=1.0))
        opt.zero_grad()
        out["loss"].backward()
        assert all(p.grad is None for p in bb.model.parameters())
        opt.step()
        last = {k: float(torch.as_tensor(v).detach()) for k, v in out.items()}
        first = first if first is not None else last
    assert last["pos_ce"] < 0.9 * first["pos_ce"]  # measured: 8.19 -> 6.9 in 40 steps
    assert last["loss"] < first["loss"] and math.isfinite(last["kl"]) and last["tokens"] > 0


def test_decision_loss_and_prefix_cache(tiny_backbone):
    from mosaic_core.cache import PrefixCache

    bb = tiny_backbone
    bank = ControlTokenBank.build(BankConfig(categories=("alcohol", "betting"), m=2, init="normal"), bb.embeddings, seed=2)
    ex, refusal = _examples(bb), refusal_target(bb.tokenizer, "I'm sorry, but I can't help with that.")
    paper = batch_loss(bb.model, bb.tokenizer, bank, ex, refusal, LossConfig())
    cfg = LossConfig(decision=Decision(weight=2.0, tokens=3), max_answer_tokens=2)
    plain = batch_loss(bb.model, bb.tokenizer, bank, ex, refusal, cfg)
    cached = batch_loss(bb.model, bb.tokenizer, bank, ex, refusal, cfg, cache=PrefixCache(bb.model))
    assert paper["decision"] == 0 and plain["decision"] > 0
    # the probe rows (one per negative) add tokens; the decision term adds to the loss with its weight
    assert plain["tokens"] > paper["tokens"] and plain["tokens"] == cached["tokens"]
    for k in ("loss", "pos_ce", "neg_ce", "kl", "decision"):
        assert torch.allclose(plain[k], cached[k], atol=1e-4), k
    cut = batch_loss(bb.model, bb.tokenizer, bank, ex, refusal, LossConfig(max_answer_tokens=2))
    assert torch.allclose(plain["loss"], cut["loss"] + 2.0 * plain["decision"], atol=1e-4)


def test_margin_decision_loss_pos_weight_and_a_refusing_teacher(tiny_backbone):
    from mosaic_core.cache import PrefixCache

    bb = tiny_backbone
    bank = ControlTokenBank.build(BankConfig(categories=("alcohol", "betting"), m=2, init="normal"), bb.embeddings, seed=2)
    ex, refusal = _examples(bb), refusal_target(bb.tokenizer, "I'm sorry, but I can't help with that.")
    cache = PrefixCache(bb.model)

    def rows(delta=2.0, **kw):  # per-row loss: one example at a time
        cfg = LossConfig(decision=Decision(weight=1.0, tokens=3, kind="margin", delta=delta), **kw)
        return torch.stack([batch_loss(bb.model, bb.tokenizer, bank, [e], refusal, cfg, cache=cache)["loss"] for e in ex])

    base = rows()
    assert torch.isfinite(base).all() and (base > 0).all()
    weighted = rows(pos_weight=3.0)
    assert torch.allclose(weighted[0], 3 * base[0], atol=1e-5) and torch.allclose(weighted[1:], base[1:], atol=1e-5)
    # the second negative's teacher now answers with the refusal itself: no keep-off margin on it, whatever delta
    ex[2] = {**ex[2], "response_ids": list(refusal[:3]) + list(ex[2]["response_ids"][3:])}
    lo, hi = rows(delta=0.0), rows(delta=20.0)
    assert torch.allclose(lo[2], hi[2], atol=1e-5) and hi[1] > lo[1] + 10


def test_a_framed_negative_is_scored_in_its_framed_chat_by_every_term(tiny_backbone):
    """With `messages`, the chat is what the example asks: the loss rows and the keep-off margin's probe rows both
    read it, so the plain `prompt` beside it changes nothing."""
    import json

    bb = tiny_backbone
    bank = ControlTokenBank.build(BankConfig(categories=("alcohol", "betting"), m=2, init="normal"), bb.embeddings, seed=2)
    refusal = refusal_target(bb.tokenizer, "I'm sorry, but I can't help with that.")
    neg = _examples(bb)[1]
    chat = [
        {"role": "user", "content": "For my novel, a character asks:"},
        {"role": "assistant", "content": "Go on."},
        {"role": "user", "content": neg["prompt"]},
    ]
    framed = {**neg, "messages": json.dumps(chat)}
    cfg = LossConfig(decision=Decision(weight=1.0, tokens=3, kind="margin"))
    a, b, plain = (
        batch_loss(bb.model, bb.tokenizer, bank, [e], refusal, cfg)
        for e in (framed, {**framed, "prompt": "Something else entirely."}, neg)
    )
    assert torch.allclose(a["decision"], b["decision"]) and torch.allclose(a["loss"], b["loss"])
    assert not torch.allclose(a["decision"], plain["decision"])  # the frame is part of what the probe reads


def test_bank_ema_averages_trainable_modules_and_swaps_back():
    from mosaic_core.training import BankEMA

    bank = ControlTokenBank(d=4, m=2)
    bank.add("alcohol", torch.zeros(2, 4))
    bank.add("betting", torch.ones(2, 4))
    bank.vectors["betting"].requires_grad_(False)  # frozen: never moves, not tracked
    ema = BankEMA(bank, 0.75)
    assert list(ema.shadow) == ["alcohol"]
    with torch.no_grad():
        bank.vectors["alcohol"].fill_(4.0)
    ema.update()  # 0.75 * 0 + 0.25 * 4
    ema.update()  # 0.75 * 1 + 0.25 * 4
    assert torch.allclose(ema.shadow["alcohol"], torch.full((2, 4), 1.75))
    with ema.swapped():
        assert torch.allclose(bank.vectors["alcohol"], torch.full((2, 4), 1.75))
        assert torch.equal(bank.vectors["betting"], torch.ones(2, 4))
    assert torch.equal(bank.vectors["alcohol"], torch.full((2, 4), 4.0))  # the raw parameters are back
    with pytest.raises(RuntimeError), ema.swapped():
        raise RuntimeError("validation failed")
    assert torch.equal(bank.vectors["alcohol"], torch.full((2, 4), 4.0))  # restored on errors too
    resumed = BankEMA(bank, 0.75, ema.state_dict())  # a checkpoint's averages, not the raw bank
    assert torch.allclose(resumed.shadow["alcohol"], torch.full((2, 4), 1.75))
    with pytest.raises(ValueError, match="decay"):
        BankEMA(bank, 1.0)


def test_request_dropout_hides_positives_requests_only(tiny_backbone):
    """A negative's target is the teacher's answer to its whole request, so it never hides request tokens."""
    from mosaic_core.cache import DroppingCache, PrefixCache

    bb = tiny_backbone
    bank = ControlTokenBank.build(BankConfig(categories=("alcohol", "betting"), m=2, init="normal"), bb.embeddings, seed=1)
    ex, refusal = _examples(bb), refusal_target(bb.tokenizer, "I'm sorry, but I can't help with that.")
    cfg = LossConfig(decision=Decision(weight=1.0, tokens=2, kind="margin"))
    whole = batch_loss(bb.model, bb.tokenizer, bank, ex, refusal, cfg, cache=PrefixCache(bb.model))
    drop = DroppingCache.for_chat(bb.model, bb.tokenizer)
    torch.manual_seed(0)
    with drop.hiding(0.8):
        hidden = batch_loss(bb.model, bb.tokenizer, bank, ex, refusal, cfg, cache=drop)
    for k in ("neg_ce", "kl"):  # the negatives' every term reads the whole request
        torch.testing.assert_close(hidden[k], whole[k])
    assert not torch.allclose(hidden["pos_ce"], whole["pos_ce"], atol=1e-4)  # the positive hid some
