"""Check draft MOSAIC-bench rows before they are merged by build_dataset.py.

Drafts are JSONL files under data/mosaic-bench/incoming/ named <category>-t-*, <category>-l-* (targets, look-alikes),
boundary-*, general-*, factual-*; one {prompt, kind, topic, ...} a line. This prints every problem of the named
files — invalid JSON, bad fields, exact and near duplicates against the whole of MOSAIC-bench and every other draft,
vocabulary, repeated line frames, closeness to the external over-refusal set — and then the counts.

    python scripts/check_incoming.py data/mosaic-bench/incoming/alcohol-t-*.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

from mosaic_core.categories import CATEGORIES
from mosaic_core.dataset import (
    factual_duplicates,
    lexicon_problems,
    line_frames,
    load_jsonl,
    near_duplicates,
    normalize_text,
    validate_rows,
)

ROOT = Path(__file__).resolve().parents[1]

DATASET_DIR = ROOT / "data" / "mosaic-bench"
MAX_FRAME = 8


def draft_rows(path: Path) -> tuple[list[dict], list[str]]:
    """Rows of one draft file with id/category/split filled in as build_dataset.py would, and its parse problems."""
    name = path.name
    cat = next((c for c in CATEGORIES if name.startswith(c + "-")), None)
    rows, problems = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{name}:{n}: not valid JSON ({e.msg})")
            continue
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str):
            problems.append(f"{name}:{n}: not an object with a string prompt")
            continue
        r.setdefault("category", cat if not name.startswith(("general", "factual")) else None)
        if r.get("other") is not None or name.startswith("boundary"):
            r["boundary"] = True
        r.setdefault("split", "train")
        r["id"] = f"{name}:{n}"
        if not r.get("topic"):
            problems.append(f"{r['id']}: no topic")
        rows.append(r)
    return rows, problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--xstest", type=Path, help="XSTest's xstest_prompts.csv: general drafts must not come close to its prompts")
    args = ap.parse_args()
    mine_paths = {p.resolve() for p in args.files}
    existing = [r for r in load_jsonl([DATASET_DIR]) if r["kind"]]
    drafts, mine, problems = [], [], []
    for p in sorted((DATASET_DIR / "incoming").glob("*.jsonl")) + [
        p for p in args.files if p.resolve().parent != (DATASET_DIR / "incoming").resolve()
    ]:
        rows, probs = draft_rows(p)
        drafts += rows
        if p.resolve() in mine_paths:
            mine += rows
            problems += probs
    mine_ids = {r["id"] for r in mine}
    try:
        validate_rows(mine, CATEGORIES)
    except Exception as e:
        problems.append(str(e))
    for r in mine:
        problems += [f"{r['id']}: {p}: {r['prompt'][:70]!r}" for p in lexicon_problems(r)]
    every = existing + drafts
    keys = Counter(normalize_text(r["prompt"]) for r in every)
    problems += [f"{r['id']}: exact duplicate: {r['prompt'][:70]!r}" for r in mine if keys[normalize_text(r["prompt"])] > 1]
    texts = [r["prompt"] for r in every]
    factual = [r.get("task") == "factual" for r in every]
    for i, j, s in near_duplicates(texts, 0.5):
        if (every[i]["id"] in mine_ids or every[j]["id"] in mine_ids) and not (factual[i] and factual[j]):
            problems.append(f"near duplicate ({s:.2f}): {every[i]['id']} {texts[i][:60]!r} ~ {every[j]['id']} {texts[j][:60]!r}")
    fq = [k for k, f in enumerate(factual) if f]
    for a, b in factual_duplicates([texts[k] for k in fq], [every[k]["answer"] for k in fq]):
        i, j = fq[a], fq[b]
        if every[i]["id"] in mine_ids or every[j]["id"] in mine_ids:
            problems.append(f"same fact asked twice: {every[i]['id']} {texts[i][:60]!r} ~ {every[j]['id']} {texts[j][:60]!r}")
    plain = [k for k, f in enumerate(factual) if not f]
    frames = line_frames([texts[k] for k in plain])
    counts = Counter(fr for fr in frames if fr)
    flagged = {fr for k, fr in zip(plain, frames) if fr and counts[fr] > MAX_FRAME and every[k]["id"] in mine_ids}
    for fr in sorted(flagged, key=lambda f: -counts[f]):
        problems.append(f"line frame used by {counts[fr]} lines (max {MAX_FRAME}), yours among them: {' '.join(fr)!r}")
    if args.xstest:
        with args.xstest.open(encoding="utf-8") as f:
            ext = [row["prompt"] for row in csv.DictReader(f)]
        gen = [r for r in mine if r["kind"] == "general"]
        for i, j, s in near_duplicates(ext + [r["prompt"] for r in gen], 0.5):
            if i < len(ext) <= j:
                problems.append(f"{gen[j - len(ext)]['id']}: too close to a prompt of the external over-refusal set ({s:.2f})")
    print(
        f"{len(mine)} rows in {len(args.files)} file(s); {len(existing)} MOSAIC-bench rows and {len(drafts)} draft rows compared"
    )
    for p in problems:
        print("PROBLEM", p)
    print(f"{len(problems)} problem(s)")
    print("counts (these files):")
    for (cat, kind, topic), n in sorted(Counter((r["category"] or "general", r["kind"], r.get("topic")) for r in mine).items()):
        print(f"  {cat:10s} {kind:9s} {topic:28s} {n}")
    print("totals (MOSAIC-bench + all drafts) per category and kind:")
    for (cat, kind), n in sorted(Counter((r["category"] or "general", r["kind"]) for r in every).items()):
        print(f"  {cat:10s} {kind:9s} {n}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
