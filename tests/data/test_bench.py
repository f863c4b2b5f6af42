"""Data-quality tier for the in-repo benchmark (DESIGN.md "The benchmark", issue 3)."""

import hashlib
import re
from collections import Counter
from pathlib import Path

import pytest

from mosaic_core.bench import load_jsonl, near_duplicates, normalize_text, validate_rows
from mosaic_core.categories import CATEGORIES

ROOT = Path(__file__).resolve().parents[2] / "data" / "mosaic-bench"

# Core vocabulary of each category: a look-alike of one category (or a general request) must use none of the
# *other* categories' core words. On the targets these match 34-61 % of each category's own requests.
LEXICON = {
    "addiction": r"\b(vap(e|es|ing)|nicotine|cigarettes?|cannabis|marijuana|weed strain|thc|edibles?|energy drinks?|kratom|juul)\b",
    "alcohol": r"\b(beer|wine|vodka|whiske?y|tequila|rum|gin|cocktails?|booze|drunk|hangover|bourbon|sake|liquor)\b",
    "betting": r"\b(bets?|betting|wager|casino|sportsbook|parlay|gambl\w*|slot machines?|roulette|blackjack|lottery ticket)\b",
    "horror": r"\b(horror|gore|gory|slasher|creepypasta|terrifying|possessed|demonic|serial killer)\b",
    "sex": r"\b(sex|sexual|sexy|hookups?|condoms?|orgasm\w*|erotic\w*|foreplay|kinky|libido|in bed)\b",
}


@pytest.fixture(scope="module")
def rows():
    return load_jsonl([ROOT])


def test_schema_and_ids(rows):
    validate_rows(rows, CATEGORIES)
    for r in rows:
        key = hashlib.sha1(normalize_text(r["prompt"]).encode()).hexdigest()[:10]
        assert r["id"] == f"{r['category'] or 'general'}-{r['kind'][0]}-{key}"


def test_counts_and_category_balance(rows):
    c = Counter((r["category"], r["kind"]) for r in rows)
    for cat in CATEGORIES:
        assert c[(cat, "target")] >= 300, cat
        assert c[(cat, "lookalike")] >= 80, cat
    assert c[(None, "general")] >= 300
    targets = [c[(cat, "target")] for cat in CATEGORIES]
    assert max(targets) / min(targets) <= 1.25


def test_splits_are_60_20_20_per_category_and_kind(rows):
    groups = Counter((r["category"], r["kind"]) for r in rows)
    per = Counter((r["category"], r["kind"], r["split"]) for r in rows)
    for (cat, kind), n in groups.items():
        for split, share in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
            assert abs(per[(cat, kind, split)] - share * n) <= 1, (cat, kind, split)


def test_no_exact_duplicates_and_no_train_test_overlap(rows):
    keys = Counter(normalize_text(r["prompt"]) for r in rows)
    assert [k for k, n in keys.items() if n > 1] == []
    by_split = {s: {normalize_text(r["prompt"]) for r in rows if r["split"] == s} for s in ("train", "val", "test")}
    assert not by_split["train"] & by_split["test"] and not by_split["train"] & by_split["val"]


def test_no_near_duplicates_within_or_across_splits(rows):
    pairs = near_duplicates([r["prompt"] for r in rows], threshold=0.5, n=5)
    shown = [(rows[i]["id"], rows[j]["id"], round(s, 2)) for i, j, s in pairs[:10]]
    assert pairs == [], shown


def test_near_duplicate_check_catches_a_paraphrase():
    a = "What's the best whisky for a beginner who likes sweet flavours?"
    b = "what is the best whisky for a beginner who likes sweet flavors"
    assert near_duplicates([a, b, "How do frogs reproduce?"], 0.5) and near_duplicates([a, b], 0.5)[0][:2] == (0, 1)


def test_lookalikes_and_general_avoid_other_categories(rows):
    bad = []
    for r in rows:
        if r["kind"] == "target":
            continue
        for other, pat in LEXICON.items():
            if other != r["category"] and re.search(pat, r["prompt"], re.I):
                bad.append((r["id"], other, r["prompt"][:80]))
    assert bad == []


def test_lexicon_has_teeth(rows):
    for cat, pat in LEXICON.items():
        t = [r for r in rows if r["category"] == cat and r["kind"] == "target"]
        assert sum(bool(re.search(pat, r["prompt"], re.I)) for r in t) / len(t) > 0.3, cat


def test_build_script_is_idempotent(rows, tmp_path):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("build_bench", ROOT.parents[1] / "scripts" / "build_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for cat in (*CATEGORIES, None):
        mine = [r for r in rows if r["category"] == cat]
        again = mod.finalise([{"prompt": r["prompt"], "kind": r["kind"], "topic": r["topic"]} for r in reversed(mine)], cat)
        assert [json.dumps(r, sort_keys=True) for r in again] == [json.dumps(r, sort_keys=True) for r in mine]


def test_malformed_benchmark_is_rejected_with_every_problem(tmp_path):
    from mosaic_core.errors import BenchmarkError

    bad = [
        {"id": "a", "prompt": "x", "category": "alcohol", "kind": "target", "split": "train"},
        {"id": "a", "prompt": "", "category": None, "kind": "target", "split": "dev"},
        {"id": "b", "prompt": "y", "category": "news", "kind": "lookalike", "split": "test"},
        {"prompt": "z"},
    ]
    with pytest.raises(BenchmarkError) as e:
        validate_rows(bad, CATEGORIES)
    msg = str(e.value)
    for needle in ("duplicate id", "empty prompt", "split 'dev'", "null exactly for general", "unknown category 'news'", "missing column"):
        assert needle in msg
    (tmp_path / "x.jsonl").write_text('{"id": 1}\n{broken\n')
    with pytest.raises(BenchmarkError, match="x.jsonl:2"):
        load_jsonl([tmp_path / "x.jsonl"])
