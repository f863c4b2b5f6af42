"""Order-based task sampling, as the MOSAIC paper states it (docs/architecture.md).

Subsets are grouped by order r = |S|. Every order gets the same total, N1 = per_subset * K (the first order's),
split evenly over its subsets: N1 // C(K, r) positives per subset. So no order outweighs another, and all K on (one
subset, the children's-app case) gets a whole order's budget instead of one subset's share. Negatives 1:1, drawn from targets of categories not in S, general requests, and
the look-alikes of S's categories. Deterministic under the seed; `sample_draws` makes `draws` such samples."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from mosaic_core.config import SamplerConfig


@dataclass(frozen=True)
class Request:
    """One request of the dataset (the parts sampling needs)."""

    id: str
    prompt: str
    category: str | None  # None for general requests
    kind: str  # target | lookalike | general


@dataclass(frozen=True)
class Example:
    """One training example: a request under an active set, labelled pos (refuse) or neg (answer)."""

    example_id: str
    prompt_id: str
    prompt: str
    active: tuple[str, ...]
    order: int
    label: str  # pos | neg
    kind: str  # source kind of the request
    category: str | None
    source: str  # target | inactive | general | lookalike
    draw: int = 0  # which of the sampler's draws (sample_draws) it belongs to
    messages: str = ""  # a framed request: the chat (JSON) its framing template makes of `prompt`; "" when plain


def frame_examples(examples: Sequence[Example], templates: Sequence[dict], share: float, seed: int) -> list[Example]:
    """About `share` of the requests (by a hash of seed and request id: the same ones every run and every draw) wrapped
    in a template drawn the same way, in every example that uses them; a framed example's prompt_id names its
    template, so the teacher answers the framed chat, not the plain request. Per request, not per example: fresh
    draws then reuse the framed chats the teacher has answered instead of asking for new ones every draw."""
    from mosaic_core.dataset import frame

    if not share or not templates:
        return list(examples)
    out = []
    for e in examples:
        h = int(hashlib.sha256(f"frame:{seed}:{e.prompt_id}".encode()).hexdigest(), 16)
        if (h % 10_000) / 10_000 >= share:
            out.append(e)
            continue
        t = templates[(h // 10_000) % len(templates)]
        out.append(replace(e, prompt_id=f"{e.prompt_id}@{t['id']}", messages=json.dumps(frame(e.prompt, t))))
    return out


def positives_per_subset(K: int, r: int, per_subset: int) -> int:
    """N1 // C(K, r) with N1 = per_subset * K: every order the same total (at least one per subset)."""
    return max(1, (per_subset * K) // math.comb(K, r))


def plan(categories: Sequence[str], cfg: SamplerConfig) -> dict[int, int]:
    """Positives per subset for each order 1..min(max_order, K)."""
    K = len(categories)
    return {r: positives_per_subset(K, r, cfg.per_subset) for r in range(1, min(cfg.max_order, K) + 1)}


class _Pool:
    """Cycles through a shuffled list, reshuffling at each pass: draws are spread evenly, deterministically."""

    def __init__(self, items: Sequence[Request], rng: random.Random):
        self.items, self.rng, self.order, self.i = list(items), rng, [], 0

    def __bool__(self) -> bool:
        return bool(self.items)

    def draw(self) -> Request:
        if self.i >= len(self.order):
            self.order = self.rng.sample(self.items, len(self.items))
            self.i = 0
        self.i += 1
        return self.order[self.i - 1]


def _eid(*parts: object) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


def sample_examples(requests: Sequence[Request], categories: Sequence[str], cfg: SamplerConfig, seed: int = 0) -> list[Example]:
    """All examples for every subset of every order, in a deterministic order (orders interleaved later)."""
    rng = random.Random(seed)
    cats = list(categories)
    targets = {c: _Pool([q for q in requests if q.kind == "target" and q.category == c], rng) for c in cats}
    looks = {c: _Pool([q for q in requests if q.kind == "lookalike" and q.category == c], rng) for c in cats}
    general = _Pool([q for q in requests if q.kind == "general"], rng)
    empty = [c for c in cats if not targets[c]]
    if empty:
        raise ValueError(f"no target requests for categories {empty}")
    out: list[Example] = []
    for r, n_pos in plan(cats, cfg).items():
        for subset in itertools.combinations(cats, r):
            inactive = [c for c in cats if c not in subset]
            sources = {
                "inactive": cfg.neg_mix.inactive if inactive else 0.0,
                "general": cfg.neg_mix.general if general else 0.0,
                "lookalike": cfg.neg_mix.lookalike if any(looks[c] for c in subset) else 0.0,
            }
            names = [s for s, w in sources.items() if w > 0]
            weights = [sources[s] for s in names]
            for j in range(n_pos):
                q = targets[subset[j % r]].draw()  # round-robin over S's categories
                out.append(Example(_eid(subset, "pos", j, q.id), q.id, q.prompt, subset, r, "pos", q.kind, q.category, "target"))
            for j in range(n_pos if names else 0):  # one negative per positive (the paper; more did not help)
                src = rng.choices(names, weights)[0]
                if src == "inactive":
                    q = targets[inactive[rng.randrange(len(inactive))]].draw()
                elif src == "general":
                    q = general.draw()
                else:
                    with_looks = [c for c in subset if looks[c]]
                    q = looks[with_looks[j % len(with_looks)]].draw()
                out.append(Example(_eid(subset, "neg", j, q.id), q.id, q.prompt, subset, r, "neg", q.kind, q.category, src))
    return out


def sample_draws(requests: Sequence[Request], categories: Sequence[str], cfg: SamplerConfig, seed: int = 0) -> list[Example]:
    """cfg.draws independent samples, each example tagged with its draw d (0 .. draws - 1, what training's epochs
    read): draw d is sample_examples with seed `seed` + 1000 d (draw 0 is sample_examples(cfg, seed) itself, ids
    included); other draws' ids carry d, so the same request under the same subset in two draws is two examples."""
    out: list[Example] = []
    for d in range(cfg.draws):
        ex = sample_examples(requests, categories, cfg, seed + 1000 * d)
        out += ex if d == 0 else [replace(e, example_id=_eid(e.example_id, d), draw=d) for e in ex]
    return out


def split_off(requests: Sequence[Request], share: float, seed: int) -> tuple[list[Request], list[Request]]:
    """(taken, kept): about `share` of the requests by a hash of (seed, id) -- the same split for the same ids
    whatever else the list holds -- and the rest, each in the input's order."""
    taken = [q for q in requests if int(_eid("val_share", seed, q.id), 16) < share * 16**16]
    ids = {q.id for q in taken}
    return taken, [q for q in requests if q.id not in ids]


def interleave_orders(examples: Sequence[Example], seed: int) -> list[Example]:
    """Shuffle so that every stretch of an epoch mixes all orders (training cycles through orders jointly)."""
    rng = random.Random(seed)
    out = list(examples)
    rng.shuffle(out)
    return out
