"""What a gated bank would refuse on val, read off its gates alone, plain and framed: a minutes-long check of a gate
change before any evaluation (docs/experiments/one-recipe.md, candidate 2).

    python scripts/gate_report.py runs/smollm2-cpu runs/smollm2-cpu-fc1 [--thresholds 0.5,0.7] [--config RECIPE]

Requests: val's requests that `sampler.val_share` did not lend to training, each plain and wrapped in one of val's
framing templates (picked by a hash of its id). Per order, the mean over the order's subsets of "a gate of the active
set fires" on the subset's targets (DSR), on other categories' targets and general requests (OR) and on the subset's
look-alikes (LA). Where the tokens refuse wherever they are inserted (the shipped recipe from its second epoch), this
is what the bank refuses, bare refusals aside. Features are stored in `--features` and read by the backbone once."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from mosaic_core.backbone import load_backbone
from mosaic_core.config import load_recipe
from mosaic_core.dataset import frame, load_framings
from mosaic_core.gate import at_threshold, fires
from pipelines._gates import GATES_FILE, cached_features, gate_rates
from pipelines.data import FRAMINGS
from pipelines.eval import EvalConfig, split_requests


def val_requests(recipe) -> tuple[list[dict], list]:
    """Val's held-out requests of the recipe's categories (what `mosaic eval --split val` scores) and their chats:
    the plain ones, then the framed ones."""
    rows = split_requests(EvalConfig(bank_dir="", recipe=recipe, out_dir="", split="val"))
    templates = [t for t in load_framings(FRAMINGS) if t["split"] == "val"]
    framed = [
        frame(r["prompt"], templates[int(hashlib.sha256(f"val-frame:{r['id']}".encode()).hexdigest(), 16) % len(templates)])
        for r in rows
    ]
    return rows, [r["prompt"] for r in rows] + framed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories holding gates.safetensors")
    ap.add_argument(
        "--config",
        default="pipelines/configs/smollm2-135m/cpu.yaml",
        help="the recipe whose val split is read, and whose gate section applies to runs without a resolved_config.yaml",
    )
    ap.add_argument("--thresholds", default="0.5", help="comma-separated probabilities logistic gates fire at (softmax: argmax)")
    ap.add_argument("--features", default="runs/.gate-report-features.pt", help="feature store (reused across calls)")
    a = ap.parse_args()
    recipe = load_recipe(a.config)
    cats = list(recipe.bank.categories)
    rows, chats = val_requests(recipe)
    bb = load_backbone(recipe.backbone)
    n = len(rows)
    print(f"{n} held-out val requests, each plain and framed; per order: DSR / OR / look-alike OR, %")
    for run in a.runs:
        resolved = Path(run) / "resolved_config.yaml"
        gate = (load_recipe(resolved) if resolved.is_file() else recipe).gate  # what this run's gates read
        features = cached_features(Path(a.features), bb, chats, tuple(gate.layers), gate.recency)
        gates = load_file(str(Path(run) / GATES_FILE))
        softmax = any(g.ndim == 2 for g in gates.values())  # fires at its argmax: no threshold to move
        for t in [None] if softmax else [float(x) for x in a.thresholds.split(",")]:
            fired = torch.stack([fires(gates[c] if t is None else at_threshold(gates[c], t), features) for c in cats], 1)
            for part, rows_of in (("plain", fired[:n]), ("framed", fired[n:])):
                per = gate_rates(rows_of, rows, cats)
                cells = "  ".join(f"o{r} {v['dsr']:5.1f}/{v['or']:4.1f}/{v['la']:4.1f}" for r, v in per.items())
                fire = "argmax" if t is None else f"p>={t}"
                print(f"{Path(run).name:<24} {fire:<7} {part:<6} {cells}")


if __name__ == "__main__":
    main()
