"""Finalise the MOSAIC benchmark files in place: give every request a stable id and a split.

The request texts are written by hand into data/mosaic-bench/<category>.jsonl (and general.jsonl) as
{prompt, kind, topic}; this script adds `id` (a hash of the normalised prompt, so ids survive reordering),
`category` (null for general) and `split` (60/20/20 per category and kind, by rank of a hash of the id:
deterministic, and independent of file order). Running it twice changes nothing. It then prints the counts
and any exact or near duplicates (character 5-gram Jaccard >= 0.5).

    python scripts/build_bench.py [--dir data/mosaic-bench]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mosaic_core.bench import near_duplicates, normalize_text, validate_rows  # noqa: E402
from mosaic_core.categories import CATEGORIES  # noqa: E402

FIELDS = ("id", "prompt", "category", "kind", "split", "topic")


def finalise(rows: list[dict], category: str | None) -> list[dict]:
    out = []
    for r in rows:
        kind = r["kind"]
        key = hashlib.sha1(normalize_text(r["prompt"]).encode()).hexdigest()[:10]
        rid = f"{category or 'general'}-{kind[0]}-{key}"
        out.append({"id": rid, "prompt": r["prompt"].strip(), "category": category, "kind": kind, "split": None, "topic": r.get("topic")})
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in out:
        groups[r["kind"]].append(r)
    for members in groups.values():
        members.sort(key=lambda r: hashlib.sha256(("split:" + r["id"]).encode()).hexdigest())
        n = len(members)
        n_train, n_val = round(0.6 * n), round(0.2 * n)
        for i, r in enumerate(members):
            r["split"] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return sorted(out, key=lambda r: (("target", "lookalike", "general").index(r["kind"]), r["id"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="data/mosaic-bench")
    args = ap.parse_args()
    root = Path(args.dir)
    every: list[dict] = []
    for name in (*CATEGORIES, "general"):
        f = root / f"{name}.jsonl"
        rows = [json.loads(line) for line in f.read_text(encoding="utf-8").split("\n") if line.strip()]
        rows = finalise(rows, None if name == "general" else name)
        f.write_text("".join(json.dumps({k: r[k] for k in FIELDS}, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        every.extend(rows)
    validate_rows(every, CATEGORIES)
    counts = Counter((r["category"] or "general", r["kind"], r["split"]) for r in every)
    for (cat, kind), _ in sorted(Counter((c, k) for c, k, _ in counts).items()):
        per = {s: counts[(cat, kind, s)] for s in ("train", "val", "test")}
        print(f"{cat:10s} {kind:9s} total {sum(per.values()):4d}  " + "  ".join(f"{s} {n}" for s, n in per.items()))
    exact = [k for k, n in Counter(normalize_text(r["prompt"]) for r in every).items() if n > 1]
    near = near_duplicates([r["prompt"] for r in every], 0.5)
    print(f"exact duplicates: {len(exact)}; near duplicates (5-gram Jaccard >= 0.5): {len(near)}")
    for i, j, s in near[:50]:
        print(f"  {s:.2f}  {every[i]['id']}: {every[i]['prompt'][:70]!r}\n        {every[j]['id']}: {every[j]['prompt'][:70]!r}")


if __name__ == "__main__":
    main()
