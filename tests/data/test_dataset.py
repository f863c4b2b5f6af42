"""Data-quality tier for the in-repo dataset (MOSAIC-bench v2; the data card is data/mosaic-bench/README.md)."""

import csv
import hashlib
import itertools
import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from mosaic_core.categories import CATEGORIES
from mosaic_core.dataset import (
    CORE_WORDS,
    SURFACE_WORDS,
    factual_duplicates,
    lexicon_problems,
    line_frames,
    load_jsonl,
    near_duplicates,
    normalize_text,
    subkind,
    validate_rows,
)
from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[2]
ROOT = REPO / "data" / "mosaic-bench"
XSTEST = Path(os.environ.get("XSTEST", ""))  # XSTest is not shipped here: `make test` passes its CSV's path
MAX_FRAME = 8  # lines that may share one whole line frame (scripts/check_incoming.py uses the same bound)


@pytest.fixture(scope="module")
def rows():
    return load_jsonl([ROOT])


def _build_dataset():
    return load_script("build_dataset")


def test_schema_and_ids(rows):
    validate_rows(rows, CATEGORIES)
    for r in rows:
        key = hashlib.sha1(normalize_text(r["prompt"]).encode()).hexdigest()[:10]
        assert r["id"] == f"{r['category'] or 'general'}-{r['kind'][0]}-{key}"


def test_counts_and_minimums(rows):
    c = Counter((r["category"], r["kind"]) for r in rows)
    for cat in CATEGORIES:
        assert c[(cat, "target")] >= 900, cat
        assert c[(cat, "lookalike")] >= 300, cat
    general = [r for r in rows if r["kind"] == "general"]
    assert len(general) >= 1500
    assert sum(r.get("style") == "borderline" for r in general) >= 400
    assert sum(r.get("task") == "factual" for r in general) >= 300
    targets = [c[(cat, "target")] for cat in CATEGORIES]
    assert max(targets) / min(targets) <= 1.25


def test_every_category_spreads_over_sub_topics(rows):
    for cat in CATEGORIES:
        topics = Counter(r["topic"] for r in rows if r["category"] == cat and r["kind"] == "target" and not r.get("boundary"))
        assert len(topics) >= 15, (cat, len(topics))
        assert min(topics.values()) >= 25, (cat, topics.most_common()[-3:])


def test_boundaries_cover_every_pair_with_an_owner_by_rule(rows):
    pairs = Counter(frozenset((r["category"], r["other"])) for r in rows if r.get("boundary"))
    for a, b in itertools.combinations(CATEGORIES, 2):
        assert pairs[frozenset((a, b))] >= 40, (a, b)
    prec = ["sex", "alcohol", "betting", "addiction", "horror"]  # the data card's precedence
    for r in rows:
        if r.get("rule") == "precedence":  # both asked for: the owner comes first in the card's order
            assert prec.index(r["category"]) < prec.index(r["other"]), r["id"]


def test_v1_splits_are_frozen_and_v2_rows_split_50_20_30(rows):
    v1 = [r for r in rows if "version" not in r]
    v2 = [r for r in rows if r.get("version") == 2]
    assert {r["split"] for r in v1} == {"train", "val", "test"} and {r["split"] for r in v2} == {"train", "val", "test2"}
    groups = Counter((r["category"], r["kind"], subkind(r)) for r in v2)
    per = Counter((r["category"], r["kind"], subkind(r), r["split"]) for r in v2)
    for g, n in groups.items():
        for split, share in (("train", 0.5), ("val", 0.2), ("test2", 0.3)):
            assert abs(per[(*g, split)] - share * n) <= 2, (g, split)
    assert sum(r["split"] == "test2" for r in rows) >= 0.15 * len(rows)


def test_rebuilding_changes_nothing(rows):
    mod = _build_dataset()
    for cat in (*CATEGORIES, None):
        mine = [r for r in rows if r["category"] == cat]
        again = mod.finalise(list(reversed(mine)), cat)
        assert [json.dumps(r, sort_keys=True) for r in again] == [json.dumps(r, sort_keys=True) for r in mine]


def test_drafts_get_version_2_and_splits_by_rank():
    mod = _build_dataset()
    drafts = [{"prompt": f"draft request number {i} about wine", "kind": "target", "topic": "wine"} for i in range(10)]
    old = {"prompt": "an old request", "kind": "target", "topic": "wine", "split": "test"}
    out = mod.finalise([old, *drafts], "alcohol")
    assert [r["split"] for r in out if r["prompt"] == "an old request"] == ["test"]
    new = [r for r in out if r.get("version") == 2]
    assert Counter(r["split"] for r in new) == {"train": 5, "val": 2, "test2": 3}
    assert mod.finalise(list(reversed(out)), "alcohol") == out


def test_no_exact_duplicates_and_no_overlap_between_splits(rows):
    keys = Counter(normalize_text(r["prompt"]) for r in rows)
    assert [k for k, n in keys.items() if n > 1] == []


def test_no_near_duplicates_within_or_across_splits(rows):
    plain = [r for r in rows if r.get("task") != "factual"]
    pairs = near_duplicates([r["prompt"] for r in plain], threshold=0.5, n=5)
    assert pairs == [], [(plain[i]["id"], plain[j]["id"], round(s, 2)) for i, j, s in pairs[:10]]
    fact = [r for r in rows if r.get("task") == "factual"]
    same = factual_duplicates([r["prompt"] for r in fact], [r["answer"] for r in fact])
    assert same == [], [(fact[i]["prompt"], fact[j]["prompt"]) for i, j in same[:10]]


def test_duplicate_checks_catch_a_paraphrase_and_a_repeated_fact():
    a = "What's the best whisky for a beginner who likes sweet flavours?"
    b = "what is the best whisky for a beginner who likes sweet flavors"
    assert near_duplicates([a, b, "How do frogs reproduce?"], 0.5) and near_duplicates([a, b], 0.5)[0][:2] == (0, 1)
    q = ["Which planet is known as the red planet?", "the red planet is which planet", "Which planet is the largest?"]
    assert factual_duplicates(q, [["Mars"], ["mars"], ["Jupiter"]]) == [(0, 1)]


def test_no_line_frame_repeated_across_many_lines(rows):
    plain = [r["prompt"] for r in rows if r.get("task") != "factual"]
    frames = Counter(f for f in line_frames(plain) if f)
    worst = [(" ".join(f), n) for f, n in frames.most_common(5) if n > MAX_FRAME]
    assert worst == []


def test_frame_check_catches_slot_filling(rows):
    plain = [r["prompt"] for r in rows if r.get("task") != "factual"]
    slots = [
        f"What's the best {x} for a {y} who likes it when the weather is nice?"
        for x, y in zip(
            ("kayak", "tent", "stove", "lantern", "map", "compass", "boot", "hat", "rope", "knife"), ("novice", "pro") * 5
        )
    ]
    frames = Counter(f for f in line_frames(plain + slots) if f)
    assert frames.most_common(1)[0][1] > MAX_FRAME


def test_vocabulary_rules(rows):
    """Look-alikes avoid the other categories' core words, general requests every category's; no target involves a
    minor; nothing is explicit."""
    bad = [(r["id"], p, r["prompt"][:80]) for r in rows for p in lexicon_problems(r)]
    assert bad == []


def test_lexicons_have_teeth(rows):
    for cat, pat in CORE_WORDS.items():
        t = [r for r in rows if r["category"] == cat and r["kind"] == "target"]
        assert sum(bool(re.search(pat, r["prompt"], re.I)) for r in t) / len(t) > 0.2, cat
    assert lexicon_problems({"prompt": "Which bourbon for a party?", "category": None, "kind": "general"})
    assert lexicon_problems({"prompt": "Best blackjack strategy for my 16-year-old?", "category": "betting", "kind": "target"})


def test_hard_lookalikes_share_their_category_surface(rows):
    """At least a third of each category's look-alikes share its words in another sense (smoked salmon, spirit level)."""
    for cat, pat in SURFACE_WORDS.items():
        la = [r for r in rows if r["category"] == cat and r["kind"] == "lookalike"]
        assert sum(bool(re.search(pat, r["prompt"], re.I)) for r in la) / len(la) >= 1 / 3, cat


@pytest.mark.skipif(not XSTEST.is_file(), reason="XSTEST (the external over-refusal set's CSV) is not set")
def test_dataset_is_not_close_to_the_external_over_refusal_set(rows):
    with XSTEST.open(encoding="utf-8") as f:
        ext = [r["prompt"] for r in csv.DictReader(f)]
    ours = [r["prompt"] for r in rows]
    close = [(ext[i], ours[j - len(ext)], round(s, 2)) for i, j, s in near_duplicates(ext + ours, 0.5) if i < len(ext) <= j]
    assert close == []


def test_only_evaluation_reads_the_test_splits():
    """Training, validation and every selection step read train/val only: no stage but the evaluation names a test
    split or reads rows without filtering them to FIT_SPLITS."""
    for f in sorted((REPO / "pipelines").glob("*.py")) + sorted((REPO / "mosaic_core").glob("*.py")):
        if f.name in ("eval.py", "dataset.py", "cli.py"):
            continue
        text = f.read_text()
        assert not re.search(r"""["']test2?["']""", text), f"{f.name} names a test split"
    data = (REPO / "pipelines" / "data.py").read_text()
    assert 'df["split"] == "train"' in data and 'df["split"] == "val"' in data


def test_malformed_dataset_is_rejected_with_every_problem(tmp_path):
    from mosaic_core.errors import DatasetError

    bad = [
        {"id": "a", "prompt": "x", "category": "alcohol", "kind": "target", "split": "train"},
        {"id": "a", "prompt": "", "category": None, "kind": "target", "split": "dev"},
        {"id": "b", "prompt": "y", "category": "news", "kind": "lookalike", "split": "test"},
        {"prompt": "z"},
        {"id": "c", "prompt": "q", "category": None, "kind": "general", "split": "test2", "task": "factual", "answer": []},
        {
            "id": "d",
            "prompt": "q",
            "category": "sex",
            "kind": "target",
            "split": "val",
            "boundary": True,
            "other": "sex",
            "rule": "x",
        },
    ]
    with pytest.raises(DatasetError) as e:
        validate_rows(bad, CATEGORIES)
    msg = str(e.value)
    for needle in (
        "duplicate id",
        "empty prompt",
        "split 'dev'",
        "null exactly for general",
        "unknown category 'news'",
        "missing column",
        "non-empty list",
        "must be another known category",
        "boundary `rule`",
    ):
        assert needle in msg
    (tmp_path / "x.jsonl").write_text('{"id": 1}\n{broken\n')
    with pytest.raises(DatasetError, match="x.jsonl:2"):
        load_jsonl([tmp_path / "x.jsonl"])


def test_framings_cover_eight_families_each_split_between_training_and_test2():
    from mosaic_core.dataset import FRAMING_FAMILIES, frame, load_framings

    framings = load_framings(REPO / "data" / "framings" / "framings.jsonl")
    assert len(framings) >= 40
    for fam in FRAMING_FAMILIES:
        splits = Counter(f["split"] for f in framings if f["family"] == fam)
        assert splits["train"] >= 2 and splits["val"] >= 1 and splits["test2"] >= 1, (fam, splits)
    multi = [f for f in framings if f["family"] == "multiturn"]
    assert all(len(f["messages"]) >= 3 and f["messages"][1]["role"] == "assistant" for f in multi)
    chat = frame("How do frogs sleep?", multi[0])
    assert chat[-1]["role"] == "user" and "How do frogs sleep?" in chat[-1]["content"] and "{request}" not in str(chat)
    words = [set(normalize_text(" ".join(m["content"] for m in f["messages"])).split()) for f in framings]
    close = [
        (framings[i]["id"], framings[j]["id"])
        for i, j in itertools.combinations(range(len(words)), 2)
        if len(words[i] & words[j]) / len(words[i] | words[j]) > 0.5
    ]
    assert close == []
    bad = [
        f["id"]
        for f in framings
        for m in f["messages"]
        for p in lexicon_problems({"prompt": m["content"], "category": None, "kind": "general"})
    ]
    assert bad == []


def test_malformed_framings_are_rejected(tmp_path):
    from mosaic_core.dataset import load_framings
    from mosaic_core.errors import DatasetError

    (tmp_path / "f.jsonl").write_text(
        json.dumps(
            {"id": "a", "family": "fiction", "split": "train", "messages": [{"role": "user", "content": "no placeholder"}]}
        )
        + "\n"
        + json.dumps({"id": "b", "family": "poetry", "split": "train", "messages": [{"role": "user", "content": "{request}"}]})
        + "\n"
    )
    with pytest.raises(DatasetError) as e:
        load_framings(tmp_path / "f.jsonl")
    assert "a: the last turn" in str(e.value) and "poetry" in str(e.value)
