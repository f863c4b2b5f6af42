"""Continuous batching: rows that join mid-decode, leave early, sample or are cancelled decode exactly as each would
alone with mosaic_core's own generation, and a join never recomputes the rows already running."""

from __future__ import annotations

import pytest
import torch

from mosaic_core.bank import ControlTokenBank
from mosaic_core.batch import encode_segments
from mosaic_core.cache import PrefixCache
from mosaic_core.config import BankConfig
from mosaic_core.generation import generate
from mosaic_core.init import deep_from_input_bank
from mosaic_core.scheduler import ContinuousBatcher, RowSpec
from mosaic_core.template import as_messages, encode_chat
from mosaic_core.testing import tiny_model

PROMPTS = ["Mix me a mojito, please.", "Which horse wins?", "Write a scary story about a haunted house at night.", "hi"]
ACTIVE = [("alcohol",), (), ("alcohol", "betting"), ("betting",)]


@pytest.fixture(scope="module")
def model(tiny_tok):
    return tiny_model(len(tiny_tok), init_range=0.2)  # at 0.02 the tiny model answers newlines whatever comes first


def _banks(model, tok, positions="keep"):
    cfg = BankConfig(categories=("alcohol", "betting"), m=3, init="normal", placement="before_assistant")
    inp = ControlTokenBank.build(cfg, model.get_input_embeddings().weight, seed=1)
    with torch.no_grad():
        deep = deep_from_input_bank(model, tok, inp, PROMPTS[:1])
    deep.positions = positions
    return inp, deep


def _spec(tok, i, max_tokens, **kw):
    return RowSpec(encode_chat(tok, as_messages(PROMPTS[i]), "before_assistant"), ACTIVE[i], max_tokens, eos_token_ids=[-1], **kw)


def _alone(model, tok, bank, i, max_tokens, **kw):
    seg = encode_chat(tok, as_messages(PROMPTS[i]), "before_assistant")
    deep = bank.depth == "deep"
    batch = encode_segments(model.get_input_embeddings(), bank, [seg], [ACTIVE[i]], cache=PrefixCache(model) if deep else None)
    return generate(model, batch, max_new_tokens=max_tokens, eos_token_ids=[-1], **kw)[0]


def _drain(b: ContinuousBatcher, schedule: dict[int, list], bank) -> dict:
    """Step until empty; `schedule[s]` = rows joining before step s."""
    out, s = {}, 0
    while len(b) or any(k >= s for k in schedule):
        if s in schedule:
            b.join(schedule[s], bank)
        out.update(dict(b.step()))
        s += 1
    return out


@pytest.mark.parametrize("kind", ["input", "deep-keep", "deep-shift"])
def test_rows_joining_and_leaving_mid_decode_answer_as_they_would_alone(model, tiny_tok, kind):
    inp, deep = _banks(model, tiny_tok, "shift" if kind == "deep-shift" else "keep")
    bank = inp if kind == "input" else deep
    b = ContinuousBatcher(model, PrefixCache(model))
    budgets = {0: 12, 1: 3, 2: 9, 3: 6}  # row 1 leaves after 3 tokens while the others run on
    schedule = {
        0: [(0, _spec(tiny_tok, 0, budgets[0]))],
        2: [(1, _spec(tiny_tok, 1, budgets[1])), (2, _spec(tiny_tok, 2, budgets[2]))],
        5: [(3, _spec(tiny_tok, 3, budgets[3]))],
    }
    got = _drain(b, schedule, bank)
    for i, n in budgets.items():
        want = _alone(model, tiny_tok, bank, i, n)
        assert got[i].token_ids == want.token_ids and got[i].finish_reason == "length", (kind, i)
    assert b.mask is None and len(b) == 0


def test_a_join_prefills_only_the_newcomer_and_a_step_costs_one_position_per_row(model, tiny_tok):
    _, deep = _banks(model, tiny_tok)
    b = ContinuousBatcher(model, PrefixCache(model))
    b.join([(0, _spec(tiny_tok, 0, 20))], deep)
    b.step()
    b.step()
    before = b.forward_positions
    spec = _spec(tiny_tok, 2, 20)
    b.join([(2, spec)], deep)
    # the deep block's keys come from the bank and the request's from the prefix cache: the forward only reads
    # what follows the block (the assistant header)
    assert b.forward_positions - before == len(spec.segments.after)
    before = b.forward_positions
    b.step()
    assert b.forward_positions - before == 2  # one new position per running row, nobody recomputed


def test_leaving_trims_padding_and_cancel_frees_the_row_at_once(model, tiny_tok):
    inp, _ = _banks(model, tiny_tok)
    b = ContinuousBatcher(model)
    b.join([(2, _spec(tiny_tok, 2, 2)), (3, _spec(tiny_tok, 3, 8)), (1, _spec(tiny_tok, 1, 8))], inp)
    width = b.mask.shape[1]
    b.step()
    finished = dict(b.step())
    assert list(finished) == [2] and len(b) == 2
    assert b.mask.shape[1] < width and bool(b.mask[:, 0].any())  # the long row's columns went with it
    assert b.cancel(3) and not b.cancel(3) and len(b) == 1 and b.keys[0].shape[0] == 1
    rest = _drain(b, {}, inp)
    assert rest[1].token_ids == _alone(model, tiny_tok, inp, 1, 8).token_ids


def test_sampled_seeded_and_greedy_rows_share_steps_and_keep_their_answers(model, tiny_tok):
    inp, _ = _banks(model, tiny_tok)
    sampled = dict(temperature=1.0, top_p=0.9, seed=7)
    b = ContinuousBatcher(model)
    got = _drain(
        b,
        {0: [(0, _spec(tiny_tok, 0, 10, **sampled)), (1, _spec(tiny_tok, 1, 10))], 3: [(3, _spec(tiny_tok, 3, 6, **sampled))]},
        inp,
    )
    assert got[0].token_ids == _alone(model, tiny_tok, inp, 0, 10, **sampled).token_ids
    assert got[3].token_ids == _alone(model, tiny_tok, inp, 3, 6, **sampled).token_ids
    assert got[1].token_ids == _alone(model, tiny_tok, inp, 1, 10).token_ids


def test_stop_callback_and_eos_end_a_row(model, tiny_tok):
    inp, _ = _banks(model, tiny_tok)
    first = _alone(model, tiny_tok, inp, 1, 4).token_ids
    b = ContinuousBatcher(model)
    spec = _spec(tiny_tok, 1, 10, should_stop=lambda toks: len(toks) == 2)
    eos = RowSpec(spec.segments, spec.active, 10, eos_token_ids=[first[0]])
    got = _drain(b, {0: [("cb", spec), ("eos", eos)]}, inp)
    assert got["cb"].token_ids == first[:2] and got["cb"].finish_reason == "stop"
    assert got["eos"].token_ids == [] and got["eos"].finish_reason == "stop"


def test_a_gated_module_the_request_does_not_fire_leaves_the_row_as_the_bare_model_decodes_it(model, tiny_tok):
    _, deep = _banks(model, tiny_tok)
    cache = PrefixCache.for_chat(model, tiny_tok)
    segs = [encode_chat(tiny_tok, as_messages(p), "before_assistant") for p in PROMPTS[:2]]
    feats = cache.features([s.before for s in segs], (1,))
    w = feats[0] - feats[1]  # fires on PROMPTS[0] only
    deep.set_gate("alcohol", torch.cat([w, (-(w @ (feats[0] + feats[1])) / 2)[None]]), (1,))
    b = ContinuousBatcher(model, cache)
    specs = [(i, RowSpec(segs[i], ("alcohol",), 8, eos_token_ids=[-1])) for i in range(2)]
    got = _drain(b, {0: specs}, deep)

    def alone(i, active):
        batch = encode_segments(model.get_input_embeddings(), deep, [segs[i]], [active], cache=cache, gated=False)
        return generate(model, batch, max_new_tokens=8, eos_token_ids=[-1])[0].token_ids

    assert got[0].token_ids == alone(0, ("alcohol",)) and got[1].token_ids == alone(1, ())
    assert alone(1, ("alcohol",)) != alone(1, ())  # the module would change row 1's answer were it inserted
