"""MOSAIC-bench, the request dataset: loading, validating, and the duplicate and template checks its data tests use.

One request a line: {id, prompt, category, kind, split} (+ optional topic, and the v2 fields below). `category` is
null for general requests; for a look-alike it is the category it resembles (and must still be answered under).

Optional v2 fields: `style: "borderline"` (a general request whose words sound alarming), `task: "factual"` with
`answer` (accepted strings) for retention, and `boundary: true` with `other` (the second category it touches) and
`rule` (`asks` or `precedence`, the data card's ownership rule) for targets between two categories."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mosaic_core.errors import DatasetError

KINDS = ("target", "lookalike", "general")
SPLITS = ("train", "val", "test", "test2")
# Splits that training, validation and every selection step may read; only evaluation reads the others.
FIT_SPLITS = ("train", "val")
EVAL_SPLITS = ("test", "test2")
REQUIRED = ("id", "prompt", "category", "kind", "split")
STYLES = ("borderline",)
TASKS = ("factual",)
RULES = ("asks", "precedence")


def validate_rows(rows: Sequence[dict[str, Any]], categories: Iterable[str] | None = None) -> None:
    """Raise DatasetError listing every malformed row (up to 20) and missing column."""
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
        problems.extend(f"row {i} ({r['id']}): {p}" for p in _v2_problems(r, cats))
        if r["id"] in ids:
            problems.append(f"row {i}: duplicate id {r['id']!r}")
        ids.add(r["id"])
    if not rows:
        problems.append("no rows")
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DatasetError("invalid dataset:\n  " + "\n  ".join(problems[:20]) + more)


def _present(r: dict[str, Any], key: str) -> bool:
    """A field is there and not a null (a table read with pandas fills absent optional fields with None/NaN)."""
    v = r.get(key)
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def subkind(r: dict[str, Any]) -> str:
    """`boundary`, `factual`, `borderline` or `plain`: the v2 groups each split is balanced over."""
    if _present(r, "boundary") and r["boundary"]:
        return "boundary"
    if _present(r, "task"):
        return str(r["task"])
    if _present(r, "style"):
        return str(r["style"])
    return "plain"


def _v2_problems(r: dict[str, Any], cats: set[str] | None) -> list[str]:
    out = []
    r = {k: v for k, v in r.items() if _present(r, k)}
    if "style" in r and r["style"] not in STYLES:
        out.append(f"style {r['style']!r} not in {STYLES}")
    if "task" in r:
        if r["task"] not in TASKS:
            out.append(f"task {r['task']!r} not in {TASKS}")
        ans = r.get("answer")
        if not (isinstance(ans, list) and ans and all(isinstance(a, str) and a.strip() for a in ans)):
            out.append("a factual task needs `answer`: a non-empty list of non-empty strings")
        if r["kind"] != "general":
            out.append("only general requests carry a task")
    elif "answer" in r:
        out.append("`answer` without `task`")
    if "boundary" in r:
        if r["boundary"] is not True or r["kind"] != "target":
            out.append("`boundary` is `true` on targets only")
        other = r.get("other")
        if other == r["category"] or (cats is not None and other not in cats):
            out.append(f"boundary `other` {other!r} must be another known category")
        if r.get("rule") not in RULES:
            out.append(f"boundary `rule` {r.get('rule')!r} not in {RULES}")
    elif "other" in r or "rule" in r:
        out.append("`other`/`rule` without `boundary`")
    return out


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
                        raise DatasetError(f"{f}:{n}: not valid JSON ({e.msg})") from e
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

    Exact, by prefix filtering (the all-pairs join of Bayardo et al.): shingles are ordered rarest first, and two
    sets with Jaccard >= t must share one of the first |s| - ceil(t |s|) + 1 shingles of each, so only pairs that
    share such a prefix shingle are compared (~8k texts in about a second)."""
    sh = [shingles(t, n) for t in texts]
    freq = Counter(g for s in sh for g in s)
    ordered = [sorted(s, key=lambda g: (freq[g], g)) for s in sh]
    index: dict[str, list[int]] = defaultdict(list)
    out: list[tuple[int, int, float]] = []
    for i in sorted(range(len(texts)), key=lambda k: len(sh[k])):
        si = sh[i]
        prefix = ordered[i][: len(si) - math.ceil(threshold * len(si)) + 1]
        seen: set[int] = set()
        for g in prefix:
            for j in index[g]:
                if j in seen:
                    continue
                seen.add(j)
                sj = sh[j]
                if len(sj) < threshold * len(si):
                    continue
                inter = len(si & sj)
                jac = inter / (len(si) + len(sj) - inter)
                if jac >= threshold:
                    out.append((min(i, j), max(i, j), jac))
            index[g].append(i)
    return sorted(out)


_STOP = frozenset(
    "a an the of in on at to for from by with about and or is are was were be what whats which who whom whose where "
    "when why how do does did can could would should will i me my you your it its this that these those s as known called "
    "name named please tell quick q".split()
)


def factual_duplicates(
    questions: Sequence[str], answers: Sequence[Sequence[str]], threshold: float = 0.6
) -> list[tuple[int, int]]:
    """Pairs (i, j) of factual questions that ask the same fact: they share an accepted answer and their content
    words (stop words dropped) have Jaccard >= threshold. Character n-grams cannot tell "capital of France" from
    "capital of Spain", so short factual questions get this word-level rule instead."""
    words = [frozenset(normalize_text(q).split()) - _STOP for q in questions]
    by_answer: dict[str, list[int]] = defaultdict(list)
    for i, ans in enumerate(answers):
        for a in {normalize_text(x) for x in ans}:
            by_answer[a].append(i)
    out = set()
    for members in by_answer.values():
        for x, i in enumerate(members):
            for j in members[x + 1 :]:
                wi, wj = words[i], words[j]
                if wi and wj and len(wi & wj) / len(wi | wj) >= threshold:
                    out.add((min(i, j), max(i, j)))
    return sorted(out)


def line_frames(texts: Sequence[str], common: int = 200, min_kept: int = 5) -> list[tuple[str, ...] | None]:
    """Each line's *frame*: its words with every word outside the corpus's `common` most frequent ones replaced by
    a slot (runs of slots merged); None when fewer than `min_kept` fixed words remain (too short to be a template).
    Slot filling ("What's the best _ for a _ who likes _") gives many lines one frame; lines written one by one
    rarely share a whole frame."""
    lines = [normalize_text(t).split() for t in texts]
    freq = Counter(w for ws in lines for w in set(ws))
    keep = {w for w, _ in freq.most_common(common)}
    frames: list[tuple[str, ...] | None] = []
    for ws in lines:
        frame: list[str] = []
        for w in ws:
            tok = w if w in keep else "_"
            if not (tok == "_" and frame and frame[-1] == "_"):
                frame.append(tok)
        frames.append(tuple(frame) if sum(t != "_" for t in frame) >= min_kept else None)
    return frames


# Core vocabulary of each category: a look-alike of one category, and every general request, must use none of the
# *other* categories' core words (general requests none at all).
CORE_WORDS: dict[str, str] = {
    "addiction": r"\b(vap(e|es|ing)|nicotine|cigarettes?|cannabis|marijuana|weed strain|thc|edibles?|energy drinks?|kratom|juul)\b",
    "alcohol": r"\b(beer|wine|vodka|whiske?y|tequila|rum|gin|cocktails?|booze|drunk|hangover|bourbon|sake|liquor)\b",
    "betting": r"\b(bets?|betting|wager|casino|sportsbook|parlay|gambl\w*|slot machines?|roulette|blackjack|lottery ticket)\b",
    "horror": r"\b(horror|gore|gory|slasher|creepypasta|terrifying|possessed|demonic|serial killer)\b",
    "sex": r"\b(sex|sexual|sexy|hookups?|condoms?|orgasm\w*|erotic\w*|foreplay|kinky|libido|in bed)\b",
}
# The wider surface a *hard* look-alike shares with its category (smoked salmon, spirit level, killer whale):
# at least a third of each category's look-alikes match it.
SURFACE_WORDS: dict[str, str] = {
    "addiction": r"\b(smok\w*|vap\w*|nicotine|cigar\w*|tobacco|weed|cannabis|marijuana|pot|joints?|high|addict\w*|hooked|"
    r"caffeine|energy drinks?|puff\w*|hookah|juul|kratom|edibles?|binge\w*|pipes?|gaming|screen time|habit\w*)\b",
    "alcohol": r"\b(alcohol\w*|beers?|wines?|vodka|whiske?y|rum|gin|tequila|cocktails?|shots?|spirits?|bar|bars|pubs?|brew\w*|"
    r"drunk|drinks?|drinking|mojitos?|margaritas?|sangria|toasts?|booze|hangover|proof|tipsy|liquor|mocktails?|sake|cider|ale)\b",
    "betting": r"\b(bets?|betting|odds|wager\w*|gambl\w*|casinos?|poker|lottery|lotto|jackpot|dice|raffles?|stakes?|roulette|"
    r"blackjack|slots?|bookies?|horse rac\w*|chips|dealers?|cards?|luck\w*|bingo|payout|win\w*)\b",
    "horror": r"\b(horror|scary|scare\w*|ghosts?|zombies?|monsters?|killer|kill\w*|haunted|creepy|blood\w*|vampires?|witch\w*|"
    r"demons?|terror\w*|nightmares?|dead|death|skeletons?|spooky|fright\w*|possess\w*|slasher|gore|gory|creature|mumm(y|ies))\b",
    "sex": r"\b(sex\w*|reproduc\w*|mating|mate|romance|romantic|intima\w*|seduc\w*|gender|pollinat\w*|fertili\w*|erotic\w*|kiss\w*|"
    r"love|dating|date|partners?|passion\w*|hot|steamy|spicy|attract\w*|naked|nude|bed|courtship|breed\w*)\b",
}
# No target involves a minor, and no request is explicit. Phrases about an adult's own past or grown-up family are
# allowed ("since I was a kid", "done having kids").
MINOR_WORDS = (
    r"\b(kids?|child|children|childs|teens?|teenagers?|minors?|underage\w*|high ?schoolers?|middle ?school\w*|schoolgirls?|"
    r"schoolboys?|little (girl|boy)s?|young (girl|boy)s?|(1[0-7]|[1-9])[- ]?(yo|y/o|years?[- ]old))\b"
)
MINOR_ALLOWED = (
    r"\b(since i was a kid|as a kid|when i was a kid|as a teen\w*|when i was a teen\w*|having kids|(grad|med|college) student)\b"
)
EXPLICIT_WORDS = (
    r"\b(cock|dick|pussy|cum|cumming|blowjobs?|handjobs?|fuck\w*|tits|boobs|porn|pornograph\w*|clit\w*|jerk(ing)? off)\b"
)


def lexicon_problems(row: dict[str, Any]) -> list[str]:
    """What a row's vocabulary breaks: another category's core words in a look-alike, any category's core words in
    a general request, a minor in a target, explicit words anywhere."""
    text, cat, kind = row["prompt"], row["category"], row["kind"]
    out = []
    if kind != "target":
        hits = [c for c, pat in CORE_WORDS.items() if c != cat and re.search(pat, text, re.I)]
        out += [f"uses {c}'s core vocabulary ({re.search(CORE_WORDS[c], text, re.I).group(0)!r})" for c in hits]  # type: ignore[union-attr]
    elif re.search(MINOR_WORDS, re.sub(MINOR_ALLOWED, "", text, flags=re.I), re.I):
        out.append("a target mentions a minor")
    if re.search(EXPLICIT_WORDS, text, re.I):
        out.append("explicit vocabulary")
    return out


FRAMING_FAMILIES = ("roleplay", "fiction", "research", "override", "prefix", "hypothetical", "translation", "multiturn")
PLACEHOLDER = "{request}"


def load_framings(path: Path) -> list[dict[str, Any]]:
    """Framing templates ({id, family, split, messages}); DatasetError listing every malformed one. A template is
    a chat ending with a user turn whose text holds `{request}` once (the only braces in the template)."""
    rows = load_jsonl([path])
    problems = []
    for r in rows:
        rid = r.get("id", "?")
        if r.get("family") not in FRAMING_FAMILIES or r.get("split") not in SPLITS:
            problems.append(f"{rid}: family {r.get('family')!r} / split {r.get('split')!r} unknown")
        msgs = r.get("messages")
        if not (
            isinstance(msgs, list) and msgs and all(isinstance(m, dict) and m.get("role") in ("user", "assistant") for m in msgs)
        ):
            problems.append(f"{rid}: messages must be a non-empty list of user/assistant turns")
            continue
        text = "".join(str(m.get("content", "")) for m in msgs)
        if (
            msgs[-1]["role"] != "user"
            or str(msgs[-1].get("content", "")).count(PLACEHOLDER) != 1
            or text.count("{") != 1
            or text.count("}") != 1
        ):
            problems.append(f"{rid}: the last turn must be the user's, holding {PLACEHOLDER} once (no other braces)")
    if len({r.get("id") for r in rows}) != len(rows):
        problems.append("duplicate framing ids")
    if problems:
        raise DatasetError("invalid framings:\n  " + "\n  ".join(problems[:20]))
    return rows


def frame(request: str, template: dict[str, Any]) -> list[dict[str, str]]:
    """The chat a framed request is: the template's turns with the request in place of `{request}`."""
    return [{"role": m["role"], "content": m["content"].replace(PLACEHOLDER, request)} for m in template["messages"]]
