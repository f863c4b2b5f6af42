"""Finalise the MOSAIC-bench files in place: give every request a stable id and a split.

The request texts are written by hand as {prompt, kind, topic, ...} lines. Finalised rows live in
data/mosaic-bench/<category>.jsonl and general.jsonl; drafts waiting to join them live in
data/mosaic-bench/incoming/ (<category>-t-*, <category>-l-*, boundary-* (each row names its owning `category`),
general-*, factual-*; checked first with scripts/check_incoming.py). This script

- adds `id` (a hash of the normalised prompt, so ids survive reordering) and `category` (null for general);
- keeps the split of every row that has one: the v1 rows' train/val/test (60/20/20) is frozen, and so is every
  split this script assigned before, so re-running it never reshuffles anything;
- gives rows without a split (drafts) `version: 2` and a split 50/20/30 into train / val / test2, by rank of a hash
  of the id within their category x kind x sub-kind (plain, boundary, borderline, factual): deterministic and
  independent of file order;
- merges the drafts into the category files, deletes them, and prints the counts and any duplicates.

    python scripts/build_dataset.py [--dir data/mosaic-bench]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

from mosaic_core.categories import CATEGORIES
from mosaic_core.dataset import factual_duplicates, near_duplicates, normalize_text, subkind, validate_rows

FIELDS = ("id", "prompt", "category", "kind", "split", "topic")
OPTIONAL = ("version", "style", "task", "answer", "boundary", "other", "rule")
NEW_SPLITS = (("train", 0.5), ("val", 0.2), ("test2", 0.3))


def finalise(rows: list[dict], category: str | None) -> list[dict]:
    """Rows of one file (existing and drafts) with ids, categories and splits, in a stable order."""
    out = []
    for r in rows:
        kind = r["kind"]
        key = hashlib.sha1(normalize_text(r["prompt"]).encode()).hexdigest()[:10]
        row = {
            "id": f"{category or 'general'}-{kind[0]}-{key}",
            "prompt": r["prompt"].strip(),
            "category": category,
            "kind": kind,
            "split": r.get("split"),
            "topic": r.get("topic"),
        }
        row.update({k: r[k] for k in OPTIONAL if r.get(k) is not None})
        if r.get("other") is not None:
            row["boundary"] = True
        if row["split"] is None:
            row["version"] = 2
        out.append(row)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in out:
        if r["split"] is None:
            groups[(r["kind"], subkind(r))].append(r)
    for members in groups.values():
        members.sort(key=lambda r: hashlib.sha256(("split:" + r["id"]).encode()).hexdigest())
        n = len(members)
        bounds, acc = [], 0.0
        for split, share in NEW_SPLITS:
            acc += share
            bounds.append((round(acc * n), split))
        for i, r in enumerate(members):
            r["split"] = next(s for b, s in bounds if i < b)
    return sorted(out, key=lambda r: (("target", "lookalike", "general").index(r["kind"]), r["id"]))


def drafts(root: Path) -> tuple[dict[str | None, list[dict]], list[Path]]:
    """Draft rows by the file they join (category, None for general), and the draft files read."""
    by: dict[str | None, list[dict]] = defaultdict(list)
    files = sorted((root / "incoming").glob("*.jsonl")) if (root / "incoming").is_dir() else []
    for f in files:
        for line in f.read_text(encoding="utf-8").split("\n"):
            if line.strip():
                r = json.loads(line)
                cat = (
                    r.get("category")
                    if f.name.startswith("boundary")
                    else next((c for c in CATEGORIES if f.name.startswith(c + "-")), None)
                )
                by[cat].append(r)
    return by, files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="data/mosaic-bench")
    args = ap.parse_args()
    root = Path(args.dir)
    new, files = drafts(root)
    every: list[dict] = []
    for name in (*CATEGORIES, "general"):
        cat = None if name == "general" else name
        f = root / f"{name}.jsonl"
        rows = [json.loads(line) for line in f.read_text(encoding="utf-8").split("\n") if line.strip()]
        rows = finalise(rows + new.get(cat, []), cat)
        f.write_text(
            "".join(json.dumps({k: r[k] for k in (*FIELDS, *OPTIONAL) if k in r}, ensure_ascii=False) + "\n" for r in rows),
            encoding="utf-8",
        )
        every.extend(rows)
    validate_rows(every, CATEGORIES)
    for f in files:
        f.unlink()
    if files:
        (root / "incoming").rmdir()
    counts = Counter((r["category"] or "general", r["kind"], subkind(r), r["split"]) for r in every)
    for (cat, kind, sub), _ in sorted(Counter((c, k, s) for c, k, s, _ in counts).items()):
        per = {s: counts[(cat, kind, sub, s)] for s in ("train", "val", "test", "test2")}
        print(f"{cat:10s} {kind:9s} {sub:10s} total {sum(per.values()):4d}  " + "  ".join(f"{s} {n}" for s, n in per.items()))
    exact = [k for k, n in Counter(normalize_text(r["prompt"]) for r in every).items() if n > 1]
    plain = [r for r in every if r.get("task") != "factual"]
    near = near_duplicates([r["prompt"] for r in plain], 0.5)
    fact = [r for r in every if r.get("task") == "factual"]
    same = factual_duplicates([r["prompt"] for r in fact], [r["answer"] for r in fact])
    print(
        f"exact duplicates: {len(exact)}; near duplicates (5-gram Jaccard >= 0.5): {len(near)}; factual questions asked twice: {len(same)}"
    )
    for i, j, s in near[:50]:
        print(f"  {s:.2f}  {plain[i]['id']}: {plain[i]['prompt'][:70]!r}\n        {plain[j]['id']}: {plain[j]['prompt'][:70]!r}")


if __name__ == "__main__":
    main()
