import math
from collections import Counter

import pytest

from mosaic_core.config import SamplerConfig
from mosaic_core.sampling import Request, interleave_orders, plan, positives_per_subset, sample_draws, sample_examples, split_off

CATS = ("addiction", "alcohol", "betting", "horror", "sex")


def _requests():
    reqs = []
    for c in CATS:
        reqs += [Request(f"{c}-t{i}", f"{c} target {i}", c, "target") for i in range(40)]
        reqs += [Request(f"{c}-l{i}", f"{c} lookalike {i}", c, "lookalike") for i in range(10)]
    reqs += [Request(f"g{i}", f"general {i}", None, "general") for i in range(50)]
    return reqs


def test_paper_budget_for_k5():
    # every order the same total (500), split evenly over its subsets: all five on is one subset with 500
    assert [positives_per_subset(5, r, 100) for r in range(1, 6)] == [100, 50, 50, 100, 500]
    assert plan(CATS, SamplerConfig(per_subset=100, max_order=5)) == {1: 100, 2: 50, 3: 50, 4: 100, 5: 500}
    assert positives_per_subset(5, 2, 1) == 1  # never zero


def test_counts_end_to_end_k5():
    cfg = SamplerConfig(per_subset=20, max_order=5)
    ex = sample_examples(_requests(), CATS, cfg)
    per = Counter((e.active, e.label) for e in ex)
    expected = {1: 20, 2: 10, 3: 10, 4: 20, 5: 100}
    for r, n in expected.items():
        subsets = [s for s in {e.active for e in ex} if len(s) == r]
        assert len(subsets) == math.comb(5, r)
        for s in subsets:
            assert per[(s, "pos")] == n and per[(s, "neg")] == n  # 1:1
    # no order's total exceeds the first order's total
    totals = Counter(e.order for e in ex if e.label == "pos")
    assert max(totals.values()) <= totals[1] == 100


def test_labels_follow_the_active_set():
    ex = sample_examples(_requests(), CATS, SamplerConfig(per_subset=10, max_order=3))
    for e in ex:
        assert list(e.active) == [c for c in CATS if c in e.active]  # canonical order
        if e.label == "pos":
            assert e.kind == "target" and e.category in e.active
        elif e.kind == "target":
            assert e.category not in e.active and e.source == "inactive"
        elif e.kind == "lookalike":
            assert e.category in e.active  # look-alikes of S's own categories are negatives
        else:
            assert e.kind == "general" and e.category is None
    # order 5 has no inactive categories: its negatives come from general and look-alikes only
    full = sample_examples(_requests(), CATS, SamplerConfig(per_subset=10, max_order=5))
    assert {e.source for e in full if e.order == 5 and e.label == "neg"} <= {"general", "lookalike"}


def test_positives_round_robin_over_the_subset():
    ex = sample_examples(_requests(), CATS, SamplerConfig(per_subset=20, max_order=2))  # order 2: min(20, 100 // 10)
    pos = [e for e in ex if e.label == "pos" and e.active == ("alcohol", "betting")]
    assert Counter(e.category for e in pos) == {"alcohol": 5, "betting": 5}


def test_deterministic_under_seed_and_seed_matters():
    a = sample_examples(_requests(), CATS, SamplerConfig(per_subset=10), 7)
    b = sample_examples(_requests(), CATS, SamplerConfig(per_subset=10), 7)
    c = sample_examples(_requests(), CATS, SamplerConfig(per_subset=10), 8)
    assert a == b and a != c
    assert interleave_orders(a, 1) == interleave_orders(b, 1)
    assert len({e.example_id for e in a}) == len(a)


def test_missing_targets_is_an_error():
    reqs = [r for r in _requests() if r.category != "horror"]
    with pytest.raises(ValueError, match="horror"):
        sample_examples(reqs, CATS, SamplerConfig(per_subset=5))


def test_draws_are_independent_samples_of_one_size_and_draw_0_is_the_plain_sample():
    cfg = SamplerConfig(per_subset=10, max_order=2, draws=3)
    ex = sample_draws(_requests(), CATS, cfg, 3)
    by_draw = {d: [e for e in ex if e.draw == d] for d in range(3)}
    assert sorted({e.draw for e in ex}) == [0, 1, 2]
    plain = sample_examples(_requests(), CATS, SamplerConfig(per_subset=10, max_order=2), 3)
    assert by_draw[0] == plain  # one draw: the examples (and ids) of before draws existed
    assert all(len(v) == len(plain) for v in by_draw.values())
    assert len({e.example_id for e in ex}) == len(ex)  # unique across draws
    # each draw follows the same plan (same subsets and counts), over other requests
    plan_of = lambda es: Counter((e.active, e.label) for e in es)  # noqa: E731
    assert plan_of(by_draw[1]) == plan_of(by_draw[2]) == plan_of(plain)
    neg_prompts = [{e.prompt_id for e in v if e.label == "neg"} for v in by_draw.values()]
    assert neg_prompts[0] != neg_prompts[1] and len(set.union(*neg_prompts)) > len(neg_prompts[0])
    assert sample_draws(_requests(), CATS, cfg, 3) == ex  # deterministic


def test_split_off_takes_a_stable_share_by_id():
    reqs = _requests()
    taken, kept = split_off(reqs, 0.5, seed=0)
    assert {q.id for q in taken}.isdisjoint(q.id for q in kept) and len(taken) + len(kept) == len(reqs)
    assert 0.4 < len(taken) / len(reqs) < 0.6
    assert [q.id for q in kept] == [q.id for q in reqs if q not in taken]  # input order kept
    again, _ = split_off(list(reversed(reqs))[:150], 0.5, seed=0)  # same ids, same fate, whatever else is listed
    assert {q.id for q in again} == {q.id for q in taken} & {q.id for q in reversed(reqs[-150:])}
    assert {q.id for q in split_off(reqs, 0.5, seed=1)[0]} != {q.id for q in taken}
    assert split_off(reqs, 0.0, seed=0) == ([], reqs)


def test_framing_wraps_a_stable_share_of_examples_with_train_templates():
    import json
    from pathlib import Path

    from mosaic_core.dataset import load_framings
    from mosaic_core.sampling import frame_examples

    templates = [
        f
        for f in load_framings(Path(__file__).resolve().parents[2] / "data" / "framings" / "framings.jsonl")
        if f["split"] == "train"
    ]
    ex = sample_examples(_requests(), CATS, SamplerConfig(per_subset=20, max_order=2))
    framed = frame_examples(ex, templates, 0.25, seed=0)
    assert frame_examples(ex, templates, 0.25, seed=0) == framed and frame_examples(ex, templates, 0.0, seed=0) == ex
    hit = [f for f in framed if f.messages]
    assert 0.15 < len(hit) / len(ex) < 0.35 and {f.label for f in hit} == {"pos", "neg"}
    for e, f in zip(ex, framed):
        assert (f.prompt, f.active, f.label) == (e.prompt, e.active, e.label)
        if f.messages:
            chat = json.loads(f.messages)
            assert e.prompt in chat[-1]["content"] and f.prompt_id.startswith(e.prompt_id + "@")
            assert f.prompt_id.split("@")[1] in {t["id"] for t in templates}
    # per request: a request is framed with the same template in every example (draw) that uses it
    by_request: dict[str, set[str]] = {}
    for f in framed:
        by_request.setdefault(f.prompt_id.split("@")[0], set()).add(f.prompt_id)
    assert all(len(ids) == 1 for ids in by_request.values())
