import pytest
import torch

from mosaic_core.cache import common_head
from mosaic_core.compose import as_messages, encode_chat
from mosaic_core.gate import fires, fit_gate, request_features

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
