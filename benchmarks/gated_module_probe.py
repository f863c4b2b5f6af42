"""A module with a gate: does "tokens + a linear gate on the prompt" meet the targets where tokens alone do not?

    .venv/bin/python benchmarks/gated_module_probe.py [--bank banks/smollm2-cpu] [--steps 100] [--out runs/gated-module-probe]

`linear_probe_ceiling.py` found the frozen backbone's mean hidden states carry the category well enough for the
targets. This probe measures end to end what a module built on that would do, on fast_score_agreement.py's seeded
180-row test sample (orders 1-3, greedy-prefix refusal flag, as evaluation reads it):

1. gates: one logistic regression per category on the mean hidden states (layers 10, 20, 30) of the train split's
   requests (`--wd`, `--threshold`: linear_probe_ceiling.py's choice on val);
2. refusing tokens: from `--bank`, `--steps` plain-torch steps (2 threads) that teach each module's tokens to make the
   model refuse *whatever* the request (every kind of train request under random active sets of orders 1-3;
   softplus margins of "I'm sorry" over the best other token) — selectivity is the gate's job now;
3. serving rule: the modules whose gate fires on the prompt among the active ones are inserted; if none fires, no
   tokens at all — the base model answers, byte for byte as without MOSAIC.

Printed: the bank as it is, the gate in front of the bank as it is, the gate in front of the refusing tokens, and
the base model alone (its own "I'm sorry" rate: the floor under OR). A prototype for a design decision, not the
product's module contract.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from decision_margin_probe import evaluate, probe_setup  # the sibling scripts
from fast_score_agreement import sample_rows
from linear_probe_ceiling import features, fit

from mosaic_core.artifact import save_bank
from mosaic_core.compose import PrefixCache, answer_logits, encode_batch
from mosaic_core.losses import margins


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank", default="banks/smollm2-cpu")
    ap.add_argument("--config", default="pipelines/configs/smollm2-cpu.yaml")
    ap.add_argument("--layers", type=int, nargs="+", default=[10, 20, 30])
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--threshold", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--delta", type=float, default=2.0)
    ap.add_argument("--per-order", type=int, default=30)
    ap.add_argument("--limit", type=int, default=0, help="train requests for the gates (0: all; tests use a few)")
    ap.add_argument("--out", default="runs/gated-module-probe")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    recipe, bb, bank, ref, rows = probe_setup(a.config, a.bank)
    tok, model = bb.tokenizer, bb.model
    cats = list(bank.categories)
    train = [r for r in rows if r["split"] == "train"]
    if a.limit:
        train = train[:: max(1, len(train) // a.limit)][: a.limit]
    items = sample_rows([r for r in rows if r["split"] == "test"], cats, a.per_order, 0)
    cache = PrefixCache(model)

    # 1. gates on the mean hidden states
    print(f"gates: {len(train)} train requests, {len(items)} test-sample rows")
    x_train = features(model, tok, [r["prompt"] for r in train], a.layers)["mean"]
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    y = torch.tensor([[float(r["kind"] == "target" and r["category"] == c) for c in cats] for r in train])
    gate = fit((x_train - mu) / sd, y, a.wd)
    prompts = sorted({it[0] for it in items})
    x_test = (features(model, tok, prompts, a.layers)["mean"] - mu) / sd
    fires = dict(zip(prompts, (torch.sigmoid(gate(x_test)) > a.threshold).tolist()))
    gated = [[c for c in it[1] if fires[it[0]][cats.index(c)]] for it in items]

    def under(actives: list[list[str]]) -> tuple[float, float]:
        """(DSR, OR) in % of the test sample with each row's active set replaced (empty: the base model)."""
        d, o = evaluate(model, tok, bank, [(p, s, y) for (p, _, y), s in zip(items, actives)], ref, cache)
        return 100 * d, 100 * o

    results = {"bank": under([it[1] for it in items]), "base": under([[] for _ in items]), "gate + bank": under(gated)}
    pos = [bool(g) for g, it in zip(gated, items) if it[2]]
    neg = [bool(g) for g, it in zip(gated, items) if not it[2]]
    gate_dsr, gate_or = 100 * sum(pos) / len(pos), 100 * sum(neg) / len(neg)
    print(f"gate alone (fires on an active category): DSR {gate_dsr:.1f} %  OR {gate_or:.1f} %")

    # 2. refusing tokens: every request, any active set -> "I'm sorry"
    for p in bank.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(list(bank.parameters()), lr=a.lr)
    rng = random.Random(0)
    for step in range(1, a.steps + 1):
        b = [rng.choice(train)["prompt"] for _ in range(a.batch)]
        act = [sorted(rng.sample(cats, rng.choice((1, 2, 3)))) for _ in b]
        enc = encode_batch(tok, model.get_input_embeddings(), bank, b, act, bank.placement, [ref[:3]] * len(b), cache=cache)
        logits, tgt, _ = answer_logits(model, enc)
        loss = F.softplus(a.delta - margins(logits, tgt)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bank.clamp_norms_()
        if step % 10 == 0:
            print(f"refusing tokens: step {step} loss {loss.item():.3f} {time.perf_counter() - t0:.0f}s", flush=True)
    for p in bank.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        results["gate + refusing tokens"] = under(gated)
        results["refusing tokens, no gate"] = under([it[1] for it in items])

    out = Path(a.out)
    save_bank(bank, out / "refusing-bank", fingerprint=bb.fingerprint, init="probe")
    report = {"rates": {k: {"dsr": d, "or": o} for k, (d, o) in results.items()}, "n": len(items), "steps": a.steps,
              "wd": a.wd, "threshold": a.threshold, "wall_s": time.perf_counter() - t0}  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for k, (d, o) in results.items():
        print(f"{k:28s} DSR {d:5.1f} %  OR {o:5.1f} %")
    print(f"{report['wall_s']:.0f} s -> {out / 'report.json'}")


if __name__ == "__main__":
    main()
