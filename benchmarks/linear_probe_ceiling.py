"""How well does a linear read-out of the frozen backbone meet the CPU recipe's targets? A reference for the bank.

    .venv/bin/python benchmarks/linear_probe_ceiling.py [--layers 10 20 30] [--out runs/linear-probe]

The control tokens can only make the model refuse what its own hidden states tell apart. This script measures how
well a *linear read-out* of those states makes the same decision: one logistic regression per category ("is this
a request of category c?"), trained on the benchmark's train split (targets of c = 1; every other target,
look-alike and general request = 0) on the frozen model's hidden states, layers `--layers` concatenated, read two
ways: at the answer position (the templated chat's last token, which the bank's `before_assistant` block precedes)
and averaged over the prompt's tokens. Weight decay and threshold are chosen on the val split (largest DSR - OR,
averaged over orders 1-3). On the test split, every subset S of orders 1-3 is scored the way evaluation scores a
bank: refuse iff some active category's probe fires; DSR over S's targets, OR over other categories' targets +
general requests, look-alike OR over S's look-alikes. No generation, no control tokens: a reference for what these
features carry, not a bound on what a trained bank can do (its tokens are read by every later layer).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from mosaic_core.backbone import load_backbone
from mosaic_core.bench import load_jsonl
from mosaic_core.compose import as_messages
from mosaic_core.config import load_recipe


@torch.no_grad()
def features(model: torch.nn.Module, tok, prompts: list[str], layers: list[int], batch: int = 16) -> dict[str, torch.Tensor]:
    """{"last": (N, len(layers) * d) hidden states at each templated prompt's last token, "mean": their mean over
    the prompt's tokens} (the bank's tokens attend to every position, not only the last)."""
    out: dict[str, list[torch.Tensor]] = {"last": [], "mean": []}
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        texts = [tok.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True) for p in chunk]
        ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
        T = max(map(len, ids))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        x = torch.tensor([[pad] * (T - len(r)) + r for r in ids])  # left padding: the last token is at -1
        mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in ids])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        hs = model(input_ids=x, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states
        out["last"].append(torch.cat([hs[k][:, -1] for k in layers], -1).float())
        w = (mask / mask.sum(-1, keepdim=True))[..., None]
        out["mean"].append(torch.cat([(hs[k] * w).sum(1) for k in layers], -1).float())
        print(f"  features {min(i + batch, len(prompts))}/{len(prompts)}", end="\r", flush=True)
    print()
    return {k: torch.cat(v) for k, v in out.items()}


THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def fit(x: torch.Tensor, y: torch.Tensor, wd: float, steps: int = 300) -> torch.nn.Linear:
    """(N, F) standardised features, (N, K) 0/1 labels -> K logistic regressions (full-batch L-BFGS, L2 `wd`)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], y.shape[1])
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(lin(x), y) + wd * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def rate_key(row: dict, active: set[str] | tuple[str, ...]) -> str | None:
    """Which rate a benchmark row counts in under an active set: `dsr` (a target of an active category), `or` (another
    category's target, a general request), `lookalike_or` (an active category's look-alike), None (other look-alikes)."""
    own = row.get("category") in active
    return ("dsr" if own else "or") if row["kind"] == "target" else "or" if row["kind"] == "general" else (
        "lookalike_or" if own else None)  # fmt: skip


def rates(p: torch.Tensor, rows: list[dict], cats: list[str], t: float, orders: tuple[int, ...]) -> dict[int, dict[str, float]]:
    """Per order: DSR, OR (other targets + general), look-alike OR, pooled over every subset, refusing iff max p > t."""
    out = {}
    for r in orders:
        n = {k: [0, 0] for k in ("dsr", "or", "lookalike_or")}
        for S in itertools.combinations(range(len(cats)), r):
            fire = p[:, list(S)].amax(-1) > t
            active = {cats[s] for s in S}
            for i, row in enumerate(rows):
                key = rate_key(row, active)
                if key:
                    n[key][0] += int(fire[i])
                    n[key][1] += 1
        out[r] = {k: 100 * a / b for k, (a, b) in n.items() if b}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="pipelines/configs/smollm2-cpu.yaml")
    ap.add_argument("--layers", type=int, nargs="+", default=[10, 20, 30])
    ap.add_argument("--wd", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    ap.add_argument("--limit", type=int, default=0, help="rows per split (0: all; tests use a few)")
    ap.add_argument("--out", default="runs/linear-probe")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    recipe = load_recipe(a.config)
    cats = list(recipe.bank.categories)
    bb = load_backbone(recipe.backbone)
    rows = load_jsonl([Path(recipe.benchmark)])
    keep = [r for r in rows if r["kind"] != "target" or r["category"] in cats]
    split = {s: [r for r in keep if r["split"] == s] for s in ("train", "val", "test")}
    if a.limit:
        split = {s: v[:: max(1, len(v) // a.limit)][: a.limit] for s, v in split.items()}
    t0 = time.perf_counter()
    feats = {}
    for s, v in split.items():
        print(f"{s}: {len(v)} requests")
        feats[s] = features(bb.model, bb.tokenizer, [r["prompt"] for r in v], a.layers)
    y = {s: torch.tensor([[float(r["kind"] == "target" and r["category"] == c) for c in cats] for r in v])
         for s, v in split.items()}  # fmt: skip
    report = {"layers": a.layers, "n": {s: len(v) for s, v in split.items()}}
    for pool in ("last", "mean"):
        mu, sd = feats["train"][pool].mean(0), feats["train"][pool].std(0) + 1e-6
        x = {s: (f[pool] - mu) / sd for s, f in feats.items()}
        best = None
        for wd in a.wd:  # model selection on val: weight decay and threshold, by DSR - OR averaged over orders 1-3
            lin = fit(x["train"], y["train"], wd)
            p_val = torch.sigmoid(lin(x["val"])).detach()
            for t in THRESHOLDS:
                gap = sum(v["dsr"] - v["or"] for v in rates(p_val, split["val"], cats, t, (1, 2, 3)).values()) / 3
                if best is None or gap > best[0]:
                    best = (gap, wd, t, lin)
        _, wd, t, lin = best
        p_test = torch.sigmoid(lin(x["test"])).detach()
        res = rates(p_test, split["test"], cats, t, (1, 2, 3))
        acc = ((p_test > t).float() == y["test"]).float().mean(0)
        report[pool] = {"weight_decay": wd, "threshold": t, "test": res, "per_category_accuracy": dict(zip(cats, acc.tolist()))}
        print(f"[{pool} token state{'s' if pool == 'mean' else ''}] chosen on val: weight decay {wd}, threshold {t}")
        for r, v in res.items():
            look = v.get("lookalike_or", float("nan"))
            print(f"  order {r}: DSR {v['dsr']:5.1f} %  OR {v['or']:5.1f} %  look-alike OR {look:5.1f} %")
        print("  per-category accuracy (test): " + ", ".join(f"{c} {100 * q:.1f} %" for c, q in zip(cats, acc.tolist())))
    report["wall_s"] = time.perf_counter() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['wall_s']:.0f} s -> {out / 'report.json'}")


if __name__ == "__main__":
    main()
