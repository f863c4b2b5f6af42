"""The training stage's gate step (recipe `gate.layers`): a gate per category (`gate.kind`), fitted on the features of the
run's train requests (plain and framed; mosaic_core.gate) before the tokens train, so the per-epoch validation
scores the gated modules as they will serve. Written once per run as `gates.safetensors` + `gates.json` and reused
while the recipe's gate section and the run's data are unchanged."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import torch

GATES_FILE, GATES_INFO, FEATURES_FILE = "gates.safetensors", "gates.json", "gate_features.pt"


def _key(recipe: Any, run: Path, categories: list[str]) -> str:
    """What the gates depend on: the gate section, the categories fitted and the data stage's content hash."""
    data = json.loads((run / "data" / "manifest.json").read_text()).get("content_hash")
    # 0.5: the probability logistic gates fire at, once a key (`gate.threshold`): gates fitted then stay reusable
    parts = {"gate": [list(recipe.gate.layers), recipe.gate.weight_decay, 0.5], "fit": categories, "data": data}
    for k in ("framed_copies", "recency"):  # only where set, so gates fitted before the key existed keep theirs
        if getattr(recipe.gate, k):
            parts[k] = getattr(recipe.gate, k)
    if recipe.gate.kind != "logistic":
        parts["kind"] = recipe.gate.kind
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def fit_run_gates(run: Path, recipe: Any, train_df: Any, categories: list[str]) -> Path:
    """Fit (or reuse) the gates of `categories` on the distinct requests of `train_df` (the run's train rows: a
    request is a positive for its own category where it is a target, a negative for every other category), and on
    `gate.framed_copies` framed copies of each plain one. Returns the gates file."""
    from safetensors.torch import save_file

    from mosaic_core.backbone import load_backbone
    from mosaic_core.gate import fires

    out, info_path = run / GATES_FILE, run / GATES_INFO
    key = _key(recipe, run, categories)
    if out.is_file() and info_path.is_file() and json.loads(info_path.read_text()).get("key") == key:
        print(f"[gates] reusing {out.name} (key {key})")
        return out
    chats, own = gate_training_set(train_df, recipe.gate.framed_copies)
    bb = load_backbone(recipe.backbone)
    features = cached_features(run / FEATURES_FILE, bb, chats, tuple(recipe.gate.layers), recipe.gate.recency)
    gates = fit_gates(features, own, categories, recipe.gate.kind, recipe.gate.weight_decay)
    stats = {}
    for c in categories:
        labels = torch.tensor([o == c for o in own], dtype=torch.float32)
        fired = fires(gates[c], features)
        pos = labels.bool()
        stats[c] = {
            "positives": int(pos.sum()),
            "negatives": int((~pos).sum()),
            "train_recall": round(float(fired[pos].float().mean()), 4),
            "train_false_fires": round(float(fired[~pos].float().mean()), 4),
        }
        print(f"[gates] {c}: {stats[c]}")
    save_file(gates, str(out))
    info = {
        "key": key,
        "kind": recipe.gate.kind,
        "layers": list(recipe.gate.layers),
        "weight_decay": recipe.gate.weight_decay,
        "recency": recipe.gate.recency,
        "requests": len(chats),
        "categories": stats,
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return out


def fit_gates(
    features: torch.Tensor, own: list[str | None], categories: list[str], kind: str, weight_decay: float
) -> dict[str, torch.Tensor]:
    """category -> its gate (`gate.kind`, mosaic_core.gate), fitted on features (N, F) of requests whose own
    category (None: none) is `own`: logistic, each category against the rest; softmax, one fit over all and none."""
    from mosaic_core.gate import fit_gate, fit_softmax_gates

    if kind == "softmax":
        classes = torch.tensor([categories.index(o) if o in categories else len(categories) for o in own])
        fitted = fit_softmax_gates(features, classes, len(categories), weight_decay)
        return {c: g.clone() for c, g in zip(categories, fitted)}  # safetensors stores no views of one tensor
    return {c: fit_gate(features, torch.tensor([o == c for o in own], dtype=torch.float32), weight_decay) for c in categories}


def gate_training_set(train_df: Any, copies: int) -> tuple[list[Any], list[str | None]]:
    """(chats, own category or None) the gates are fitted on: the distinct requests of `train_df` (the run's train
    rows; a request is its category's where it is a target, no category's otherwise), then `copies` framed copies of
    each plain one, copy by copy, so fewer copies are a prefix of more."""
    from mosaic_core.training import request_of

    messages = train_df["messages"] if "messages" in train_df else [None] * len(train_df)
    rows = train_df.assign(_chat=[m or "" for m in messages]).drop_duplicates(["prompt", "_chat"]).to_dict("records")
    chats = [request_of(r) for r in rows]
    own = [r["category"] if r["kind"] == "target" else None for r in rows]
    if copies:
        extra = framed_copies([(r["prompt"], o) for r, o in zip(rows, own) if not r.get("messages")], copies)
        chats += [c for c, _ in extra]
        own += [o for _, o in extra]
    return chats, own


def framed_copies(requests: list[tuple[str, Any]], copies: int) -> list[tuple[list[dict[str, str]], Any]]:
    """`copies` framed versions of each plain (request, label), each in a train-split framing template picked by a hash
    of the request and the copy (the same every run): the gates then see every framing around targets and
    non-targets alike, so its words are no evidence for a category."""
    from mosaic_core.dataset import frame, load_framings
    from pipelines.data import FRAMINGS

    templates = [t for t in load_framings(FRAMINGS) if t["split"] == "train"]
    out = []
    for j in range(copies):
        for prompt, label in requests:
            h = int(hashlib.sha256(f"gate-frame:{j}:{prompt}".encode()).hexdigest(), 16)
            out.append((frame(prompt, templates[h % len(templates)]), label))
    return out


def cached_features(path: Path, bb: Any, chats: list[Any], layers: tuple[int, ...], recency: float | None = None) -> torch.Tensor:
    """(N, len(layers) * d) request features of `chats` (mosaic_core.gate.request_features), computing only those
    `path` does not hold yet for this backbone, these layers and this recency, and storing the union there: refitting
    gates on more requests, or with other settings, reads the backbone once per request. The file keeps one section
    per way of reading a request, so alternating between them (comparing gates) reads nothing twice."""
    from tqdm import tqdm

    from mosaic_core.cache import PrefixCache
    from mosaic_core.gate import request_features
    from mosaic_core.template import as_messages, encode_chat

    ident = {"backbone": bb.fingerprint.digest, "layers": list(layers)}
    if recency is not None:  # only where set, so stores written before it existed stay valid
        ident["recency"] = recency
    keys = [hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest() for c in chats]
    found = torch.load(path) if path.is_file() else {"sections": []}
    sections = found.get("sections", [found])  # a file written before sections existed is one section
    stored = next((x for x in sections if x["ident"] == ident), {"ident": ident, "keys": [], "features": torch.zeros(0)})
    index = {k: i for i, k in enumerate(stored["keys"])}
    missing = sorted({k: i for i, k in enumerate(keys) if k not in index}.values())
    if missing:
        head = PrefixCache.for_chat(bb.model, bb.tokenizer).head
        runs = [encode_chat(bb.tokenizer, as_messages(chats[i]), "before_assistant").before for i in missing]
        parts = [
            request_features(bb.model, runs[i : i + 256], head, layers, recency=recency)
            for i in tqdm(range(0, len(runs), 256), desc="[gates] request features", unit="x256", mininterval=10)
        ]
        new = torch.cat(parts)
        old = stored["features"] if len(stored["keys"]) else new[:0]
        stored = {"ident": ident, "keys": stored["keys"] + [keys[i] for i in missing], "features": torch.cat([old, new])}
        torch.save({"sections": [x for x in sections if x["ident"] != ident] + [stored]}, path)
        index = {k: i for i, k in enumerate(stored["keys"])}
    print(f"[gates] {len(chats)} requests: {len(missing)} read by the backbone, {len(chats) - len(missing)} from {path.name}")
    return stored["features"][[index[k] for k in keys]]


def set_run_gates(bank: Any, path: Path, layers: tuple[int, ...], recency: float | None = None) -> None:
    """Give the bank's modules the gates in `path` (those it holds a gate for), reading `layers` with `recency`."""
    from safetensors.torch import load_file

    for c, g in load_file(str(path)).items():
        if c in bank.categories:
            bank.set_gate(c, g.to(next(iter(bank.vectors.values())).device), layers, recency)


def gate_rates(fired: torch.Tensor, rows: list[dict[str, Any]], cats: list[str]) -> dict[int, dict[str, float]]:
    """What gates alone would refuse: fired (N, K) bool, a gate per category of `cats` on the N requests `rows`
    ({kind, category}). Per order, the mean over the order's subsets of the share of rows where a gate of the subset
    fires, %, on the subset's targets (dsr), other categories' targets and general requests (or), and the subset's
    look-alikes (la)."""
    out = {}
    for r in range(1, len(cats) + 1):
        acc: dict[str, list[float]] = {"dsr": [], "or": [], "la": []}
        for subset in itertools.combinations(range(len(cats)), r):
            on = fired[:, list(subset)].any(1)
            active = {cats[i] for i in subset}
            groups = {
                "dsr": [i for i, q in enumerate(rows) if q["kind"] == "target" and q["category"] in active],
                "or": [
                    i
                    for i, q in enumerate(rows)
                    if q["kind"] == "general" or (q["kind"] == "target" and q["category"] not in active)
                ],
                "la": [i for i, q in enumerate(rows) if q["kind"] == "lookalike" and q["category"] in active],
            }
            for g, idx in groups.items():
                if idx:
                    acc[g].append(on[idx].float().mean().item())
        out[r] = {g: 100 * sum(v) / len(v) for g, v in acc.items()}
    return out
