import pytest
import torch

from mosaic_core.cache import common_head
from mosaic_core.gate import at_threshold, fires, fit_gate, fit_softmax_gates, request_features
from mosaic_core.template import as_messages, encode_chat

PROMPTS = ["Mix me a mojito with lots of rum.", "Which horse wins the derby?", "Write a haiku about rain, please, today."]


def test_request_features_are_the_own_tokens_mean_whatever_the_batch(tiny_backbone):
    model, tok = tiny_backbone.model, tiny_backbone.tokenizer
    runs = [encode_chat(tok, as_messages(p), "before_assistant").before for p in PROMPTS]
    head = common_head(runs)
    together = request_features(model, runs, head, (1, 2), batch_size=3)
    assert together.shape == (3, 2 * model.config.hidden_size)
    for i, r in enumerate(runs):  # alone (no padding) and in a batch of mixed lengths: the same features, in order
        torch.testing.assert_close(request_features(model, [r], head, (1, 2))[0], together[i], atol=1e-5, rtol=1e-4)
        hidden = model.get_decoder()(input_ids=torch.tensor([r]), output_hidden_states=True).hidden_states
        torch.testing.assert_close(together[i, : model.config.hidden_size], hidden[1][0, head:].mean(0), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="tokens after its"):
        request_features(model, [runs[0][:head]], head, (1,))


def test_recency_weighs_a_request_towards_its_end_whatever_the_batch(tiny_backbone):
    model, tok = tiny_backbone.model, tiny_backbone.tokenizer
    runs = [encode_chat(tok, as_messages(p), "before_assistant").before for p in PROMPTS]
    head = common_head(runs)
    together = request_features(model, runs, head, (2,), batch_size=3, recency=4.0)
    for i, r in enumerate(runs):
        hidden = model.get_decoder()(input_ids=torch.tensor([r]), output_hidden_states=True).hidden_states[2][0, head:]
        w = torch.exp(-torch.arange(len(r) - head - 1, -1, -1.0) / 4.0)  # the last token weighs 1, k before it e^(-k/4)
        torch.testing.assert_close(together[i], (w[:, None] * hidden).sum(0) / w.sum(), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(together[i], hidden.mean(0), atol=1e-3)
    torch.testing.assert_close(request_features(model, runs, head, (2,), recency=None), request_features(model, runs, head, (2,)))
    with pytest.raises(ValueError, match="recency"):
        request_features(model, runs, head, (2,), recency=0.0)


def test_fit_gate_separates_and_folds_the_threshold_into_the_bias():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g) * torch.tensor([1.0, 5.0, 0.2, 1.0, 1.0, 3.0]) + 2.0
    y = (x[:, 0] - 2.0 + 0.5 * (x[:, 2] - 2.0) > 0.3).float()
    gate = fit_gate(x, y, weight_decay=1e-4)
    assert gate.shape == (7,)
    assert (fires(gate, x) == y.bool()).float().mean() > 0.95
    strict = fit_gate(x, y, weight_decay=1e-4, threshold=0.9)
    p = torch.sigmoid(x @ gate[:-1] + gate[-1])  # the 0.5 gate's probability, on raw features
    torch.testing.assert_close(fires(strict, x), p >= 0.9)
    assert fires(strict, x).sum() < fires(gate, x).sum()
    with pytest.raises(ValueError, match="both positives and negatives"):
        fit_gate(x, torch.zeros(400))
    with pytest.raises(ValueError, match="threshold"):
        fit_gate(x, y, threshold=1.0)


def test_at_threshold_moves_only_the_bias_and_round_trips():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 4, generator=g)
    y = (x[:, 1] + 0.3 * x[:, 3] > 0.2).float()
    gate = fit_gate(x, y)
    torch.testing.assert_close(at_threshold(gate, 0.8), fit_gate(x, y, threshold=0.8))  # what fit_gate folds in
    strict = at_threshold(gate, 0.8)
    assert torch.equal(strict[:-1], gate[:-1]) and strict[-1] < gate[-1]
    torch.testing.assert_close(at_threshold(strict, 0.5, fitted_at=0.8), gate)
    p = torch.sigmoid(x @ gate[:-1] + gate[-1])
    assert torch.equal(fires(at_threshold(gate, 0.3), x), p >= 0.3)
    with pytest.raises(ValueError, match="fitted_at"):
        at_threshold(gate, 0.5, fitted_at=0.0)


def test_softmax_gates_fire_only_for_the_most_likely_category():
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(4, 5, generator=g) * 3  # three categories and "no category"
    labels = torch.arange(4).repeat_interleave(torch.tensor([60, 60, 60, 200]))
    x = centres[labels] + torch.randn(len(labels), 5, generator=g)
    gates = fit_softmax_gates(x, labels, categories=3)
    assert gates.shape == (3, 3, 6)
    fired = torch.stack([fires(gates[k], x) for k in range(3)], 1)  # (N, 3)
    assert fired.sum(1).max() <= 1  # one category at most: each other's evidence counts against it
    truth = torch.nn.functional.one_hot(labels, 4)[:, :3].bool()
    assert (fired == truth).all(1).float().mean() > 0.95
    own_rows = gates[:, 0]  # each category's score against "no category", in index order
    assert torch.equal(gates[1, 1:], own_rows[[0, 2]])  # the other categories' rows follow the module's own
    scores = torch.cat([torch.zeros(len(x), 1), x @ own_rows[:, :-1].T + own_rows[:, -1]], 1)
    torch.testing.assert_close(fired, torch.nn.functional.one_hot(scores.argmax(1), 4)[:, 1:].bool())
    one_row = fit_gate(x, (labels == 0).float())
    assert torch.equal(fires(one_row[None], x), fires(one_row, x))  # a single row is the logistic rule
    with pytest.raises(ValueError, match="every one of the 3 categories and of none"):
        fit_softmax_gates(x[labels != 1], labels[labels != 1], categories=3)
    with pytest.raises(ValueError, match="no threshold"):
        at_threshold(gates[0], 0.7)


def test_a_gated_module_is_inserted_only_where_its_gate_fires_and_survives_its_artifact(tiny_backbone, tmp_path):
    from mosaic_core.artifact import load_bank, save_bank
    from mosaic_core.bank import DeepTokenBank
    from mosaic_core.errors import ArtifactError

    model = tiny_backbone.model
    bank = DeepTokenBank.for_model(model, m=1)
    for c in ("alcohol", "betting", "horror"):
        bank.add(c, torch.randn(bank.module_shape))
    F = 2 * bank.d
    feats = torch.zeros(3, F)
    feats[0, 0], feats[1, 0], feats[2, 1] = 1.0, -1.0, 1.0
    on_first = torch.zeros(F + 1)
    on_first[0] = 1.0  # fires where feature 0 > 0
    on_second = torch.zeros(F + 1)
    on_second[1], on_second[-1] = 1.0, -0.5
    assert bank.firing([["alcohol"]], None) == [("alcohol",)]  # no gates: every active module is inserted
    bank.set_gate("alcohol", on_first, (1, 2))
    bank.set_gate("horror", on_second, (1, 2))
    active = [["horror", "alcohol", "betting"]] * 3
    assert bank.firing(active, feats) == [("alcohol", "betting"), ("betting",), ("betting", "horror")]
    with pytest.raises(ValueError, match="pass the requests' features"):
        bank.firing(active, None)
    with pytest.raises(ValueError, match="gates read"):
        bank.set_gate("betting", torch.zeros(bank.d + 1), (1,))
    with pytest.raises(ValueError, match="a gate over 2 layers"):
        bank.set_gate("betting", torch.zeros(F), (1, 2))
    with pytest.raises(ValueError, match="recency"):  # every gate of a bank reads the same features
        bank.set_gate("betting", torch.zeros(F + 1), (1, 2), recency=8.0)
    with pytest.raises(ValueError, match="for a softmax gate"):
        bank.set_gate("betting", torch.zeros(2, F), (1, 2))

    fp = tiny_backbone.fingerprint
    save_bank(bank, tmp_path / "b", fingerprint=fp, init="text")
    back = load_bank(tmp_path / "b", fp)
    assert back.gate_layers == (1, 2) and set(back.gates) == {"alcohol", "horror"}
    torch.testing.assert_close(back.gates["horror"], on_second)
    assert back.firing(active, feats) == bank.firing(active, feats)
    assert back.gate_recency is None
    recent = DeepTokenBank.for_model(model, m=1)
    recent.add("alcohol", torch.randn(recent.module_shape))
    recent.set_gate("alcohol", on_first, (1, 2), recency=16.0)
    save_bank(recent, tmp_path / "r", fingerprint=fp, init="text")
    assert load_bank(tmp_path / "r", fp).gate_recency == 16.0
    softmax = torch.stack([on_first, on_second])  # betting fires where its row beats "none" and horror's row
    bank.set_gate("betting", softmax, (1, 2))
    rival = feats.clone()
    rival[2, 0] = 0.3  # above "none" (0.3 > 0), but below horror's row (1 - 0.5)
    assert bank.firing([["betting"]] * 3, rival) == [("betting",), (), ()]
    save_bank(bank, tmp_path / "s", fingerprint=fp, init="text")
    torch.testing.assert_close(load_bank(tmp_path / "s", fp).gates["betting"], softmax)
    (tmp_path / "b" / "betting" / "tokens.safetensors").unlink()
    with pytest.raises(ArtifactError):
        load_bank(tmp_path / "b", fp)


def test_encoding_inserts_a_gated_module_only_where_it_fires_and_ungated_training_always(tiny_backbone):
    from mosaic_core.bank import DeepTokenBank
    from mosaic_core.batch import encode_batch
    from mosaic_core.cache import PrefixCache
    from mosaic_core.losses import answer_logits

    model, tok = tiny_backbone.model, tiny_backbone.tokenizer
    embed = model.get_input_embeddings()
    bank = DeepTokenBank.for_model(model, m=2)
    bank.positions = "keep"
    bank.add("alcohol", torch.randn(bank.module_shape, generator=torch.Generator().manual_seed(0)))
    cache = PrefixCache.for_chat(model, tok)
    runs = [encode_chat(tok, as_messages(p), "before_assistant").before for p in PROMPTS[:2]]
    feats = cache.features(runs, (1,))
    torch.testing.assert_close(feats, request_features(model, runs, cache.head, (1,)))
    recent = cache.features(runs, (1,), recency=2.0)  # its own cache entries, not the plain mean's
    torch.testing.assert_close(recent, request_features(model, runs, cache.head, (1,), recency=2.0))
    assert not torch.allclose(recent, feats, atol=1e-4)
    # a gate that fires on the first request only: the midpoint between the two requests' features
    w = feats[0] - feats[1]
    bank.set_gate("alcohol", torch.cat([w, (-(w @ (feats[0] + feats[1])) / 2)[None]]), (1,))
    targets = [[5, 6], [5, 6]]

    def logits(active, **kw):
        return answer_logits(
            model, encode_batch(tok, embed, bank, PROMPTS[:2], active, "before_assistant", targets, cache=cache, **kw)
        )[0]

    gated, bare, forced = logits([["alcohol"]] * 2), logits([[]] * 2), logits([["alcohol"]] * 2, gated=False)
    torch.testing.assert_close(gated[1], bare[1])  # not fired: the bare model's logits
    torch.testing.assert_close(gated[0], forced[0])  # fired: the module is read
    assert not torch.allclose(forced[1], bare[1], atol=1e-4)  # ungated (training): inserted everywhere
    with pytest.raises(ValueError, match="PrefixCache"):
        encode_batch(tok, embed, bank, PROMPTS[:1], [["alcohol"]], "before_assistant", [[5]])
    with pytest.raises(ValueError, match="for_chat"):
        PrefixCache(model).features(runs, (1,))
