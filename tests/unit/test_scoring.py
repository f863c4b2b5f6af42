import json

import torch

from mosaic_core.scoring import letter_ids, load_mmlu, mmlu_accuracy, mmlu_predictions, refusal_logprob, refusal_score


def test_refusal_logprob_equals_teacher_forced_mean(tiny_backbone):
    bb = tiny_backbone
    ids = bb.tokenizer("I'm sorry, but", add_special_tokens=False).input_ids
    lp = refusal_logprob(bb.model, bb.tokenizer, None, ["hello", "a longer question here"], [[], []], "prefix", ids, n_tokens=3)
    assert lp.shape == (2,) and (lp < 0).all()
    full = bb.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False)
    x = torch.tensor([bb.tokenizer(full, add_special_tokens=False).input_ids + ids[:3]])
    logp = torch.log_softmax(bb.model(input_ids=x).logits[0, -4:-1], -1)
    assert torch.allclose(lp[0], logp.gather(-1, torch.tensor(ids[:3])[:, None]).mean(), atol=1e-5)


def test_refusal_score_greedy_flag_is_what_greedy_decoding_emits(tiny_backbone):
    """`greedy` must say exactly whether generate() (greedy) starts with the refusal's first n tokens."""
    from mosaic_core.bank import ControlTokenBank
    from mosaic_core.batch import encode_batch
    from mosaic_core.config import BankConfig
    from mosaic_core.generation import generate

    bb = tiny_backbone
    bank = ControlTokenBank.build(BankConfig(categories=("alcohol", "betting"), m=2, init="normal"), bb.embeddings, seed=3)
    prompts, active = ["hello", "a longer question here"], [["alcohol"], ["alcohol", "betting"]]
    enc = encode_batch(bb.tokenizer, bb.model.get_input_embeddings(), bank, prompts, active, "before_assistant")
    gens = generate(bb.model, enc, max_new_tokens=3, eos_token_ids=[-1])  # never stops: 3 tokens each
    for i, g in enumerate(gens):
        same = refusal_score(bb.model, bb.tokenizer, bank, [prompts[i]], [active[i]], "before_assistant", g.token_ids, n_tokens=3)
        other = g.token_ids[:2] + [(g.token_ids[2] + 1) % len(bb.tokenizer)]  # the third token is not the argmax
        diff = refusal_score(bb.model, bb.tokenizer, bank, [prompts[i]], [active[i]], "before_assistant", other, n_tokens=3)
        assert same.greedy.tolist() == [True] and diff.greedy.tolist() == [False]
        assert same.logprob.item() > diff.logprob.item()
        lp = refusal_logprob(bb.model, bb.tokenizer, bank, [prompts[i]], [active[i]], "before_assistant", g.token_ids, n_tokens=3)
        assert torch.equal(lp, same.logprob)


def test_refusal_logprob_with_a_prefix_cache_is_unchanged(tiny_backbone):
    from mosaic_core.bank import ControlTokenBank
    from mosaic_core.cache import PrefixCache
    from mosaic_core.config import BankConfig

    bb = tiny_backbone
    bank = ControlTokenBank.build(BankConfig(categories=("alcohol", "betting"), m=2, init="normal"), bb.embeddings, seed=3)
    ids = bb.tokenizer("I'm sorry, but", add_special_tokens=False).input_ids
    prompts, active = ["hello", "a longer question here", "hello"], [["alcohol"], [], ["alcohol", "betting"]]
    plain = refusal_logprob(bb.model, bb.tokenizer, bank, prompts, active, "before_assistant", ids)
    cache = PrefixCache(bb.model)
    cached = refusal_logprob(bb.model, bb.tokenizer, bank, prompts, active, "before_assistant", ids, cache=cache)
    assert torch.allclose(plain, cached, atol=1e-5) and (cache.misses, cache.hits) == (2, 1)


def test_mmlu_scoring_on_a_tiny_file(tmp_path, tiny_backbone):
    rows = [
        {"id": f"q{i}", "subject": "biology", "question": f"Question {i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4}
        for i in range(6)
    ]
    f = tmp_path / "mini.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    qs = load_mmlu(f)
    preds = mmlu_predictions(tiny_backbone.model, tiny_backbone.tokenizer, None, qs, [], "prefix", batch_size=4)
    assert len(preds) == 6 and set(preds) <= {0, 1, 2, 3}
    assert mmlu_accuracy([q.answer for q in qs], qs) == 1.0
    assert mmlu_accuracy(preds, qs) == sum(p == q.answer for p, q in zip(preds, qs)) / 6
    assert len(set(letter_ids(tiny_backbone.tokenizer))) == 4


def test_committed_mmlu_subsets_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "data" / "mmlu"
    mini, big = load_mmlu(root / "mmlu-mini.jsonl"), load_mmlu(root / "mmlu-1k.jsonl")
    assert len(mini) == 285 and len({q.subject for q in mini}) == 57 and len(big) == 1000
    assert all(len(q.choices) == 4 and 0 <= q.answer < 4 for q in big)


def test_opening_kept_agrees_with_generation(tiny_backbone):
    """The teacher-forced fidelity flag is True exactly when greedy generation reproduces the opening."""
    import torch

    from mosaic_core.batch import encode_batch
    from mosaic_core.generation import generate
    from mosaic_core.scoring import opening_kept, opening_tokens

    tok, model = tiny_backbone.tokenizer, tiny_backbone.model
    prompts = ["How do frogs sleep?", "Name a colour.", "What is two plus two?"]
    empty = [[] for _ in prompts]
    b = encode_batch(tok, model.get_input_embeddings(), None, prompts, empty, "before_assistant")
    gens = generate(model, b, max_new_tokens=12, eos_token_ids=[tok.eos_token_id])
    bare = [g.token_ids for g in gens]
    assert opening_kept(model, tok, None, prompts, empty, "before_assistant", bare, n_words=3).all()
    wrong = [[(t + 1) % len(tok) for t in a] for a in bare]  # another answer entirely: not what greedy gives
    assert not opening_kept(model, tok, None, prompts, empty, "before_assistant", wrong, n_words=3).any()
    ids = tok("one two three four five", add_special_tokens=False).input_ids
    head = opening_tokens(tok, ids, 2)
    assert tok.decode(head).split() == ["one", "two"] and len(head) < len(ids)
    assert opening_tokens(tok, ids, 50) == ids
    assert torch.is_tensor(opening_kept(model, tok, None, prompts[:1], empty[:1], "before_assistant", [[]], n_words=3))
