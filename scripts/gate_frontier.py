"""How far can the gates alone go on val? Refit a run's gates with other settings -- which layers they read, how many
framed copies of each train request, weight decay, logistic or softmax -- and read what they would refuse (logistic
gates at several thresholds), on val's held-out requests, plain and inside every val framing template
(docs/experiments/gate-frontier.md, docs/experiments/softmax-gates.md).

    python scripts/gate_frontier.py runs/smollm2-cpu --layers 9,18,30 --layers 6,12,18,24,30 \\
        [--kind logistic softmax] [--copies 1 2] [--weight-decay 0.01 0.03] [--thresholds 0.5,0.7] [--out DIR]

The run supplies its data (the train requests the gates are fitted on, as its gate step does) and its recipe (the
gate's recency, the seed, `sampler.val_share`). The backbone reads every request once, at the union of the layer
sets, into stores in `<run>/gate-frontier/`: a later call whose union was read before reads nothing, any other union
is read anew (20 minutes and more on 2 cores), so keep one sweep's sets within one union. Each variant is then a
slice of those features and a refit of seconds. Prints per order DSR / OR / look-alike OR, %
(`pipelines._gates.gate_rates`: where the tokens refuse wherever they are inserted, what the bank refuses, bare
refusals aside) and writes `frontier.json` and `frontier.png` (default: into the stores' directory)."""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch

from mosaic_core.backbone import load_backbone
from mosaic_core.config import load_recipe
from mosaic_core.dataset import frame, load_framings
from mosaic_core.gate import at_threshold, fires
from pipelines._gates import cached_features, fit_gates, gate_rates, gate_training_set
from pipelines._train_tables import load_tables
from pipelines.data import FRAMINGS
from pipelines.eval import EvalConfig, split_requests


def val_chats(recipe) -> tuple[list[dict], list[dict], list]:
    """(held-out val requests, one row per chat, the chats): every request plain, then inside each val template."""
    rows = split_requests(EvalConfig(bank_dir="", recipe=recipe, out_dir="", split="val"))
    templates = [t for t in load_framings(FRAMINGS) if t["split"] == "val"]
    meta = [{**r, "family": "plain"} for r in rows] + [{**r, "family": t["family"]} for t in templates for r in rows]
    chats = [r["prompt"] for r in rows] + [frame(r["prompt"], t) for t in templates for r in rows]
    return rows, meta, chats


def columns(union: tuple[int, ...], layers: tuple[int, ...], width: int) -> torch.Tensor:
    """The feature columns of `layers` in features read at `union` (each layer `width` columns, in `union`'s order)."""
    return torch.cat([torch.arange(union.index(x) * width, (union.index(x) + 1) * width) for x in layers])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run directory whose data stage has run")
    ap.add_argument("--layers", action="append", help="comma-separated layers a gate reads (repeat; default: the run's)")
    ap.add_argument("--copies", type=int, nargs="+", help="framed copies of each train request (default: the run's)")
    ap.add_argument("--weight-decay", type=float, nargs="+", help="default: the run's")
    ap.add_argument("--kind", nargs="+", choices=("logistic", "softmax"), help="gate kinds (default: the run's)")
    ap.add_argument("--thresholds", default="0.5,0.7", help="comma-separated probabilities logistic gates fire at")
    ap.add_argument("--out", help="where frontier.json/png go (default: <run>/gate-frontier, where the feature stores are)")
    a = ap.parse_args()
    run = Path(a.run)
    recipe = load_recipe(run / "resolved_config.yaml")
    gate, cats = recipe.gate, list(recipe.bank.categories)
    sets = [tuple(int(x) for x in s.split(",")) for s in a.layers] if a.layers else [tuple(gate.layers)]
    copies, decays = a.copies or [gate.framed_copies], a.weight_decay or [gate.weight_decay]
    kinds = a.kind or [gate.kind]
    thresholds = [float(t) for t in a.thresholds.split(",")]
    union = tuple(sorted({x for s in sets for x in s}))
    stores = run / "gate-frontier"
    out = Path(a.out) if a.out else stores
    for d in (stores, out):
        d.mkdir(parents=True, exist_ok=True)

    rows, meta, vchats = val_chats(recipe)
    train_df, _ = load_tables(run, recipe.seed, recipe.train.val_examples)
    chats, own = gate_training_set(train_df, max(copies))
    # fewer copies are a prefix: the distinct requests (framed ones included), then one block per copy of the plain ones
    n_requests = len(gate_training_set(train_df, 0)[0])
    per_copy = (len(chats) - n_requests) // max(copies) if max(copies) else 0
    print(f"{len(rows)} held-out val requests x {len(vchats) // len(rows)} (plain + val templates); {len(chats)} train chats")
    bb = load_backbone(recipe.backbone)
    val_x = cached_features(stores / "val_features.pt", bb, vchats, union, gate.recency)
    train_x = cached_features(stores / "train_features.pt", bb, chats, union, gate.recency)
    width = val_x.shape[1] // len(union)

    results = []
    plain = [i for i, m in enumerate(meta) if m["family"] == "plain"]
    framed = [i for i, m in enumerate(meta) if m["family"] != "plain"]
    print("per order: DSR / OR / look-alike OR, %")
    for layers, k, wd, kind in itertools.product(sets, copies, decays, kinds):
        cols, n = columns(union, layers, width), n_requests + k * per_copy
        gates = fit_gates(train_x[:n, cols], own[:n], cats, kind, wd)
        for t in thresholds if kind == "logistic" else [None]:  # a softmax gate fires at its argmax
            fired = torch.stack([fires(g if t is None else at_threshold(g, t), val_x[:, cols]) for g in gates.values()], 1)
            for part, idx in (("plain", plain), ("framed", framed)):
                per = gate_rates(fired[idx], [meta[i] for i in idx], cats)
                results.append(
                    {"kind": kind, "layers": list(layers), "copies": k, "weight_decay": wd, "threshold": t}
                    | {"requests": part, "per_order": per}
                )
                cells = "  ".join(f"o{r} {v['dsr']:5.1f}/{v['or']:4.1f}/{v['la']:4.1f}" for r, v in per.items())
                fire = "argmax" if t is None else f"p>={t}"
                print(
                    f"{kind:<8} layers {','.join(map(str, layers)):<16} copies {k} wd {wd:<6} {fire:<7} {part:<6} {cells}",
                    flush=True,
                )
    (out / "frontier.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "frontier.png")
    print(f"wrote {out / 'frontier.json'} and {out / 'frontier.png'}")


def plot(results: list[dict], path: Path) -> None:
    """DSR against OR at order 3, plain and framed, one line per variant through its thresholds (a softmax gate's
    argmax: one point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 6), sharey=True)
    for ax, part in zip(axes, ("plain", "framed")):
        lines: dict[str, list[tuple[float, float]]] = {}
        for r in results:
            if r["requests"] == part:
                name = f"{r['kind']}, layers {','.join(map(str, r['layers']))}, copies {r['copies']}, wd {r['weight_decay']}"
                lines.setdefault(name, []).append((r["per_order"][3]["or"], r["per_order"][3]["dsr"]))
        for i, (name, pts) in enumerate(lines.items()):  # ten colours, then the next line style
            ax.plot(*zip(*sorted(pts)), marker="o", linestyle=("-", "--", ":")[i // 10 % 3], label=name)
        ax.set(title=f"{part} val requests, order 3", xlabel="OR, % (other categories' targets + general)")
    axes[0].set_ylabel("DSR, %")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7)
    fig.suptitle("Gates alone on val: each line runs through the thresholds (softmax gates: one point each)")
    fig.tight_layout(rect=(0, 0.06 + 0.025 * math.ceil(len(labels) / 2), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
