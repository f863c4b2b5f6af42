import torch

from mosaic_core.bank import ControlTokenBank
from mosaic_core.batch import encode_batch
from mosaic_core.config import BankConfig
from mosaic_core.generation import generate


def _reference_greedy(model, embeds, n):
    """No cache, one full forward per step: the slow obviously-correct decoder."""
    out = []
    for _ in range(n):
        logits = model(inputs_embeds=embeds).logits[:, -1]
        t = int(logits.argmax(-1))
        out.append(t)
        embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[t]]))], 1)
    return out


def test_cached_batched_greedy_matches_reference_per_row(tiny_backbone):
    bb = tiny_backbone
    bank = ControlTokenBank.build(BankConfig(categories=("alcohol", "betting"), m=2, init="normal"), bb.embeddings)
    prompts, active = ["hello there friend", "odds?"], [["alcohol", "betting"], []]
    batch = encode_batch(bb.tokenizer, bb.model.get_input_embeddings(), bank, prompts, active, "before_assistant")
    gens = generate(bb.model, batch, max_new_tokens=6, eos_token_ids=[-1])
    for i in range(2):
        single = encode_batch(bb.tokenizer, bb.model.get_input_embeddings(), bank, [prompts[i]], [active[i]], "before_assistant")
        with torch.no_grad():
            ref = _reference_greedy(bb.model, single.inputs_embeds, 6)
        assert gens[i].token_ids == ref and gens[i].finish_reason == "length"


def test_eos_stop_and_seeded_sampling(tiny_backbone):
    bb = tiny_backbone
    batch = encode_batch(bb.tokenizer, bb.model.get_input_embeddings(), None, ["hi"], [[]], "prefix")
    first = generate(bb.model, batch, max_new_tokens=4, eos_token_ids=[-1])[0]
    assert len(first.token_ids) == 4 and first.finish_reason == "length"
    stopped = generate(bb.model, batch, max_new_tokens=4, eos_token_ids=[first.token_ids[0]])[0]
    assert stopped.token_ids == [] and stopped.finish_reason == "stop"  # the stop token itself is not returned
    s1 = generate(bb.model, batch, max_new_tokens=8, eos_token_ids=[-1], temperature=1.0, top_p=0.9, seed=3)
    s2 = generate(bb.model, batch, max_new_tokens=8, eos_token_ids=[-1], temperature=1.0, top_p=0.9, seed=3)
    assert s1 == s2
    early = generate(bb.model, batch, max_new_tokens=8, eos_token_ids=[-1], should_stop=lambda i, toks: len(toks) == 2)
    assert len(early[0].token_ids) == 2 and early[0].finish_reason == "stop"
