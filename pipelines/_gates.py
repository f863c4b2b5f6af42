"""The training stage's gate step (recipe `gate.layers`): one linear gate per category, fitted on the features of the
run's train requests (plain and framed; mosaic_core.gate) before the tokens train, so the per-epoch validation
scores the gated modules as they will serve. Written once per run as `gates.safetensors` + `gates.json` and reused
while the recipe's gate section and the run's data are unchanged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

GATES_FILE, GATES_INFO = "gates.safetensors", "gates.json"


def _key(recipe: Any, run: Path, categories: list[str]) -> str:
    """What the gates depend on: the gate section, the categories fitted and the data stage's content hash."""
    data = json.loads((run / "data" / "manifest.json").read_text()).get("content_hash")
    parts = {"gate": [list(recipe.gate.layers), recipe.gate.weight_decay, recipe.gate.threshold], "fit": categories, "data": data}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def fit_run_gates(run: Path, recipe: Any, train_df: Any, categories: list[str]) -> Path:
    """Fit (or reuse) the gates of `categories` on the distinct requests of `train_df` (the run's train rows: a
    request is a positive for its own category where it is a target, a negative for every other category).
    Returns the gates file."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from mosaic_core.backbone import load_backbone
    from mosaic_core.cache import PrefixCache
    from mosaic_core.compose import as_messages, encode_chat
    from mosaic_core.gate import fires, fit_gate, request_features
    from mosaic_core.training import request_of

    out, info_path = run / GATES_FILE, run / GATES_INFO
    key = _key(recipe, run, categories)
    if out.is_file() and info_path.is_file() and json.loads(info_path.read_text()).get("key") == key:
        print(f"[gates] reusing {out.name} (key {key})")
        return out
    messages = train_df["messages"] if "messages" in train_df else [None] * len(train_df)
    requests = train_df.assign(_chat=[m or "" for m in messages]).drop_duplicates(["prompt", "_chat"])
    own = [r.category if r.kind == "target" else None for r in requests.itertuples()]
    bb = load_backbone(recipe.backbone)
    head = PrefixCache.for_chat(bb.model, bb.tokenizer).head
    runs = [encode_chat(bb.tokenizer, as_messages(request_of(r)), "before_assistant").before for r in requests.to_dict("records")]
    parts = []
    for i in tqdm(range(0, len(runs), 256), desc="[gates] request features", unit="x256", mininterval=10):
        parts.append(request_features(bb.model, runs[i : i + 256], head, recipe.gate.layers))
    features = torch.cat(parts)
    gates, stats = {}, {}
    for c in categories:
        labels = torch.tensor([o == c for o in own], dtype=torch.float32)
        gates[c] = fit_gate(features, labels, recipe.gate.weight_decay, recipe.gate.threshold)
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
        "layers": list(recipe.gate.layers),
        "weight_decay": recipe.gate.weight_decay,
        "threshold": recipe.gate.threshold,
        "requests": len(runs),
        "categories": stats,
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return out


def set_run_gates(bank: Any, path: Path, layers: tuple[int, ...]) -> None:
    """Give the bank's modules the gates in `path` (those it holds a gate for)."""
    from safetensors.torch import load_file

    for c, g in load_file(str(path)).items():
        if c in bank.categories:
            bank.set_gate(c, g.to(next(iter(bank.vectors.values())).device), layers)
