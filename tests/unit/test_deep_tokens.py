"""DeepTokenBank: modules as key/value positions at every layer. A deep block read off an input bank's own keys and
values reproduces that bank exactly (RoPE, positions and padding are right), in scoring and in generation; it
trains, round-trips as an artifact and is refused where it cannot work."""

from __future__ import annotations

import json

import pytest
import torch

from mosaic_core.artifact import bank_from_modules, load_bank, read_meta, save_bank
from mosaic_core.backbone import from_model
from mosaic_core.bank import ControlTokenBank, DeepTokenBank
from mosaic_core.batch import encode_batch
from mosaic_core.cache import PrefixCache
from mosaic_core.config import BankConfig, LossConfig, load_recipe, recipe_from_dict
from mosaic_core.errors import ArtifactError, ConfigError
from mosaic_core.generation import generate
from mosaic_core.init import build_bank, deep_from_input_bank
from mosaic_core.losses import answer_logits
from mosaic_core.testing import tiny_model
from mosaic_core.training import batch_loss, refusal_target

LONG, SHORT = "What's a good cocktail for a summer party with mint and lime?", "How do odds work?"


def _input_bank(model) -> ControlTokenBank:
    cfg = BankConfig(categories=("alcohol", "betting"), m=3, init="normal", placement="before_assistant")
    return ControlTokenBank.build(cfg, model.get_input_embeddings().weight, seed=1)


def test_a_deep_block_read_off_a_bank_gives_the_banks_logits(tiny_backbone):
    tok, model = tiny_backbone.tokenizer, tiny_backbone.model
    bank = _input_bank(model)
    target = tok("I'm sorry", add_special_tokens=False).input_ids
    with torch.no_grad():
        deep = deep_from_input_bank(model, tok, bank, [LONG])  # one prompt: its exact states
        assert deep.module_shape == (2, 2, model.config.num_key_value_heads, 3, 8) and deep.depth == "deep"
        enc = encode_batch(
            tok,
            model.get_input_embeddings(),
            deep,
            [LONG, SHORT],
            [["alcohol"], []],
            "before_assistant",
            [target, target],
            cache=PrefixCache(model),
        )
        got, _, mask = answer_logits(model, enc)
        ref = encode_batch(
            tok, model.get_input_embeddings(), bank, [LONG, SHORT], [["alcohol"], []], "before_assistant", [target, target]
        )
        want, _, _ = answer_logits(model, ref)
    assert mask.all()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(enc.prompt_len, ref.prompt_len)  # the block's positions count as the input tokens' did
    # the same block after a request of another length: keys re-rotated, so it is not just a copy of `want`
    with torch.no_grad():
        enc = encode_batch(
            tok,
            model.get_input_embeddings(),
            deep,
            [SHORT],
            [["alcohol"]],
            "before_assistant",
            [target],
            cache=PrefixCache(model),
        )
        other, _, _ = answer_logits(model, enc)
    assert not torch.allclose(other[0], want[0], atol=1e-4)


def test_generating_with_a_deep_block_continues_as_the_bank_does(tiny_tok):
    # larger random weights than the fixture's: at 0.02 the tiny model answers newlines whatever comes before
    tok, model = tiny_tok, tiny_model(len(tiny_tok), init_range=0.2)
    bank = _input_bank(model)
    prompts, active = ["Mix me a mojito, please.", "Which horse wins?"], [["alcohol"], []]
    deep = deep_from_input_bank(model, tok, bank, prompts[:1])

    def answers(b, ps, act, cache):
        enc = encode_batch(tok, model.get_input_embeddings(), b, ps, act, "before_assistant", cache=cache)
        return [g.token_ids for g in generate(model, enc, max_new_tokens=8, eos_token_ids=[tok.eos_token_id])]

    want = answers(bank, prompts, active, None)
    assert answers(deep, prompts, active, PrefixCache(model)) == want
    assert answers(deep, prompts[:1], [[]], PrefixCache(model)) != want[:1]  # the block made the first answer


def test_blocks_compose_in_canonical_order_along_the_token_axis(tiny_backbone):
    deep = DeepTokenBank.for_model(tiny_backbone.model, 2)
    a, b = torch.randn(deep.module_shape), torch.randn(deep.module_shape)
    deep.add("alcohol", a)
    deep.add("betting", b)
    block = deep.compose(["betting", "alcohol"])
    assert block.shape == (2, 2, deep.kv_heads, 4, deep.head_dim)
    assert torch.equal(block[:, :, :, :2], a) and torch.equal(block[:, :, :, 2:], b)
    assert deep.compose([]).shape[3] == 0
    with pytest.raises(ValueError, match="expected shape"):
        deep.add("horror", torch.randn(2, 16))


def test_a_deep_bank_needs_the_prefix_cache_and_before_assistant(tiny_backbone):
    deep = DeepTokenBank.for_model(tiny_backbone.model, 2)
    deep.add("alcohol", torch.zeros(deep.module_shape))
    with pytest.raises(ValueError, match="PrefixCache"):
        encode_batch(
            tiny_backbone.tokenizer, tiny_backbone.model.get_input_embeddings(), deep, [SHORT], [["alcohol"]], "before_assistant"
        )
    with pytest.raises(ConfigError, match="bank.depth: deep tokens .* placement must be before_assistant"):
        recipe_from_dict({"name": "x", "bank": {"categories": ["alcohol"], "depth": "deep", "placement": "prefix"}})
    with pytest.raises(ConfigError, match="bank.depth: deep needs ZeRO stage 1 or 2"):
        load_recipe("pipelines/configs/smollm2-135m/cpu.yaml", {"bank.depth": "deep", "train.zero_stage": 3})


def test_the_recipe_loss_trains_only_the_deep_bank(tiny_tok):
    bb = from_model(tiny_model(len(tiny_tok), seed=0, init_range=0.3), tiny_tok, "tiny-llama-wide")
    torch.manual_seed(0)
    cfg = BankConfig(categories=("alcohol", "betting"), m=2, init="normal", depth="deep")
    deep = build_bank(cfg, bb.embeddings, bb.tokenizer, model=bb.model)
    before = {n: p.detach().clone() for n, p in bb.model.named_parameters()}
    ex = [{"prompt": SHORT, "active": ["betting"], "label": "pos"}, {"prompt": LONG, "active": ["alcohol"], "label": "pos"}]
    refusal = refusal_target(bb.tokenizer, "I'm sorry, but I can't help with that.")
    opt = torch.optim.Adam(deep.parameters(), lr=0.3)
    cache = PrefixCache(bb.model)
    losses = []
    for _ in range(30):
        out = batch_loss(bb.model, bb.tokenizer, deep, ex, refusal, LossConfig(), cache=cache)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(torch.equal(p, before[n]) for n, p in bb.model.named_parameters())
    with pytest.raises(ValueError, match="model="):
        build_bank(cfg, bb.embeddings, bb.tokenizer)


def test_a_deep_bank_round_trips_as_module_artifacts(tmp_path, tiny_backbone):
    deep = deep_from_input_bank(tiny_backbone.model, tiny_backbone.tokenizer, _input_bank(tiny_backbone.model), [SHORT])
    save_bank(deep, tmp_path / "deep", fingerprint=tiny_backbone.fingerprint, init="normal")
    back = load_bank(tmp_path / "deep", tiny_backbone.fingerprint)
    assert isinstance(back, DeepTokenBank) and back.module_shape == deep.module_shape and back.categories == deep.categories
    assert all(torch.equal(back.vectors[c], deep.vectors[c]) for c in deep.categories)
    meta = read_meta(tmp_path / "deep" / "alcohol")
    assert meta.depth == "deep" and tuple(meta.shape) == deep.module_shape and meta.m == 3 and meta.d == deep.d
    assert json.loads((tmp_path / "deep" / "manifest.json").read_text())["depth"] == "deep"
    # an input module and a deep one cannot share a block
    save_bank(_input_bank(tiny_backbone.model), tmp_path / "flat", fingerprint=tiny_backbone.fingerprint, init="normal")
    with pytest.raises(ArtifactError, match="depth"):
        bank_from_modules([tmp_path / "deep" / "alcohol", tmp_path / "flat" / "betting"])


def _deep_keep(model, tok):
    deep = deep_from_input_bank(model, tok, _input_bank(model), [LONG])
    deep.positions = "keep"
    return deep


def test_with_keep_positions_everything_after_the_block_has_the_bare_models_positions(tiny_backbone):
    """bank.positions keep: whatever the active set, the assistant header and the answer get the position ids they
    have with no module; only what they attend to changes. An empty active set is the bare backbone exactly."""
    tok, model = tiny_backbone.tokenizer, tiny_backbone.model
    deep = _deep_keep(model, tok)
    target = tok("I'm sorry", add_special_tokens=False).input_ids
    prompts = [LONG, SHORT, SHORT]
    with torch.no_grad():
        bare = encode_batch(tok, model.get_input_embeddings(), None, prompts, [[], [], []], "before_assistant", [target] * 3)
        want, _, _ = answer_logits(model, bare)
        for active in ([[], [], []], [["alcohol"], ["betting"], ["alcohol", "betting"]]):
            enc = encode_batch(
                tok,
                model.get_input_embeddings(),
                deep,
                prompts,
                active,
                "before_assistant",
                [target] * 3,
                cache=PrefixCache(model),
            )
            real = bare.attention_mask.bool()
            for i in range(3):  # the positions after the request (header + answer) are the bare row's last ones
                n = enc.position_ids.shape[1]
                assert torch.equal(enc.position_ids[i], bare.position_ids[i, real[i]][-n:])
            got, _, _ = answer_logits(model, enc)
            if not any(active):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            else:
                assert not torch.allclose(got, want, atol=1e-3)
        shifted = encode_batch(
            tok,
            model.get_input_embeddings(),
            deep_from_input_bank(model, tok, _input_bank(model), [LONG]),
            [SHORT],
            [["alcohol"]],
            "before_assistant",
            [target],
            cache=PrefixCache(model),
        )
        kept = encode_batch(
            tok,
            model.get_input_embeddings(),
            deep,
            [SHORT],
            [["alcohol"]],
            "before_assistant",
            [target],
            cache=PrefixCache(model),
        )
    assert torch.equal(shifted.position_ids, kept.position_ids + deep.m)  # `shift` moves them back by the block


def test_keep_positions_round_trip_and_only_compose_with_their_kind(tmp_path, tiny_backbone):
    tok, model = tiny_backbone.tokenizer, tiny_backbone.model
    deep = _deep_keep(model, tok)
    save_bank(deep, tmp_path / "keep", fingerprint=tiny_backbone.fingerprint, init="normal")
    assert json.loads((tmp_path / "keep" / "manifest.json").read_text())["positions"] == "keep"
    assert read_meta(tmp_path / "keep" / "alcohol").positions == "keep"
    assert load_bank(tmp_path / "keep", tiny_backbone.fingerprint).positions == "keep"
    deep.positions = "shift"
    save_bank(deep, tmp_path / "shift", fingerprint=tiny_backbone.fingerprint, init="normal")
    with pytest.raises(ArtifactError, match="positions"):
        bank_from_modules([tmp_path / "keep" / "alcohol", tmp_path / "shift" / "betting"])
    with pytest.raises(ConfigError, match="bank.positions: keep is for deep banks"):
        recipe_from_dict({"name": "x", "bank": {"categories": ["alcohol"], "positions": "keep"}})
    assert BankConfig(categories=("alcohol",), depth="deep", positions="keep").positions == "keep"


def test_both_banks_meet_the_bank_protocol_and_neither_derives_from_the_other(tiny_backbone):
    from mosaic_core.bank import Bank

    flat = ControlTokenBank.build(BankConfig(categories=("alcohol",), m=2, init="normal"), tiny_backbone.embeddings)
    deep = DeepTokenBank.for_model(tiny_backbone.model, m=2)
    assert isinstance(flat, Bank) and isinstance(deep, Bank)
    assert not isinstance(deep, ControlTokenBank) and not isinstance(flat, DeepTokenBank)
    deep.add("alcohol", torch.zeros(deep.module_shape))
    with pytest.raises(ValueError, match="expected shape"):
        deep.add("betting", torch.zeros(flat.module_shape))
    assert deep.compose(["alcohol"]).shape[3] == 2 and flat.compose(["alcohol"]).shape == (2, flat.d)
