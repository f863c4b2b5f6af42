"""The MOSAIC benchmark: loading, validating, and the duplicate checks its data tests use.

One request a line: {id, prompt, category, kind, split} (+ optional topic). `category` is null for general
requests; for a look-alike it is the category it resembles (and must still be answered under)."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mosaic_core.errors import BenchmarkError

KINDS = ("target", "lookalike", "general")
SPLITS = ("train", "val", "test")
REQUIRED = ("id", "prompt", "category", "kind", "split")


def validate_rows(rows: Sequence[dict[str, Any]], categories: Iterable[str] | None = None) -> None:
    """Raise BenchmarkError listing every malformed row (up to 20) and missing column."""
    cats = set(categories) if categories is not None else None
    problems: list[str] = []
    ids: set[str] = set()
    for i, r in enumerate(rows):
        missing = [k for k in REQUIRED if k not in r]
        if missing:
            problems.append(f"row {i}: missing column(s) {missing}")
            continue
        if not isinstance(r["prompt"], str) or not r["prompt"].strip():
            problems.append(f"row {i} ({r['id']}): empty prompt")
        if r["kind"] not in KINDS:
            problems.append(f"row {i} ({r['id']}): kind {r['kind']!r} not in {KINDS}")
        if r["split"] not in SPLITS:
            problems.append(f"row {i} ({r['id']}): split {r['split']!r} not in {SPLITS}")
        if (r["kind"] == "general") != (r["category"] is None):
            problems.append(f"row {i} ({r['id']}): category must be null exactly for general requests")
        if cats is not None and r["category"] is not None and r["category"] not in cats:
            problems.append(f"row {i} ({r['id']}): unknown category {r['category']!r}")
        if r["id"] in ids:
            problems.append(f"row {i}: duplicate id {r['id']!r}")
        ids.add(r["id"])
    if not rows:
        problems.append("no rows")
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise BenchmarkError("invalid benchmark:\n  " + "\n  ".join(problems[:20]) + more)


def load_jsonl(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Rows of one or more JSONL files (a directory means every *.jsonl in it, sorted)."""
    rows: list[dict[str, Any]] = []
    for p in paths:
        p = Path(p)
        files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
        for f in files:
            for n, line in enumerate(f.read_text(encoding="utf-8").split("\n"), 1):  # not splitlines(): U+2028
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise BenchmarkError(f"{f}:{n}: not valid JSON ({e.msg})") from e
    return rows


def normalize_text(text: str) -> str:
    """Lower-case, accents folded, punctuation dropped, spaces collapsed: the exact-duplicate key."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9 ]+", " ", text)).strip()


def shingles(text: str, n: int = 5) -> frozenset[str]:
    t = normalize_text(text)
    return frozenset(t[i : i + n] for i in range(max(1, len(t) - n + 1)))


def near_duplicates(texts: Sequence[str], threshold: float = 0.5, n: int = 5) -> list[tuple[int, int, float]]:
    """Pairs (i, j, jaccard) of texts whose character n-gram Jaccard similarity is >= threshold.

    Jaccard >= t needs size ratio >= t, so texts are sorted by shingle count and each is compared only with
    the ones inside that window (pure Python; ~2.5k texts in a few seconds)."""
    sh = [shingles(t, n) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(sh[i]))
    out = []
    for a_pos, i in enumerate(order):
        si = sh[i]
        for j in order[a_pos + 1 :]:
            sj = sh[j]
            if len(si) < threshold * len(sj):
                break
            inter = len(si & sj)
            if inter and inter / (len(si) + len(sj) - inter) >= threshold:
                out.append((min(i, j), max(i, j), inter / (len(si) + len(sj) - inter)))
    return sorted(out)
