"""Does training on the evaluation's decision itself buy selectivity? An experiment on the CPU recipe's limit.

    .venv/bin/python benchmarks/decision_margin_probe.py [--bank banks/smollm2-cpu] [--steps 150] [--lr 0.005]

From a trained bank, a plain torch loop (2 threads) on the recipe's train-split examples (its sampler, orders
interleaved) with a loss aimed straight at the greedy-prefix rule evaluation reads: softplus margins on the
refusal's first 3 tokens ("I'm sorry") — positives: each must beat the best other token by `--delta`; negatives: the
weakest must lose by `--delta` (refusing needs all three) — plus, on negatives, the KL of the first answer position
to the base model without control tokens (an online teacher: no stored teacher needed). `--data pairs` swaps the
recipe's examples for counterfactual batches: each target request appears twice in its batch, under an active set
holding its category (refuse) and under one of the same order that does not (answer), plus a look-alike under its
own category and a general request (answer) — the same request, opposite labels, so only "is my category in this
request" separates them. Every `--every` steps prints the greedy-prefix DSR / OR on fast_score_agreement.py's seeded
test sample (orders 1-3, `--per-order` subsets each, one target + one negative per subset); saves the bank to
`--out`.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fast_score_agreement import sample_rows  # the sibling script: the same test sample

from mosaic_core.artifact import load_bank, save_bank
from mosaic_core.backbone import load_backbone
from mosaic_core.bench import load_jsonl
from mosaic_core.compose import PrefixCache, answer_logits, encode_batch
from mosaic_core.config import DEFAULT_REFUSAL, load_recipe
from mosaic_core.losses import decision_margin, margins
from mosaic_core.sampling import Request, interleave_orders, sample_examples
from mosaic_core.scoring import refusal_score


Item = tuple[str, list[str], bool]  # prompt, active set, should refuse


def counterfactual_batches(train: list[Request], cats: list[str], batch: int, seed: int) -> Iterator[list[Item]]:
    """Endless batches of (prompt, active set, should refuse): (batch - 2) // 2 target pairs + a look-alike + a general."""
    rng = random.Random(seed)
    targets = {c: [q for q in train if q.kind == "target" and q.category == c] for c in cats}
    looks = {c: [q for q in train if q.kind == "lookalike" and q.category == c] for c in cats}
    general = [q for q in train if q.kind == "general"]

    def subset(r: int, must: str | None, avoid: str | None) -> list[str]:
        rest = [c for c in cats if c not in (must, avoid)]
        return sorted([*([must] if must else []), *rng.sample(rest, r - (1 if must else 0))])

    while True:
        out: list[Item] = []
        for _ in range(max(1, (batch - 2) // 2)):
            c, r = rng.choice(cats), rng.choice((1, 2, 3))
            q = rng.choice(targets[c])
            out += [(q.prompt, subset(r, c, None), True), (q.prompt, subset(r, None, c), False)]
        c = rng.choice(cats)
        out.append((rng.choice(looks[c]).prompt, subset(rng.choice((1, 2, 3)), c, None), False))
        out.append((rng.choice(general).prompt, subset(rng.choice((1, 2, 3)), None, None), False))
        yield out


def decision_loss(
    model: Any, tok: Any, logits: torch.Tensor, tgt: torch.Tensor, is_pos: torch.Tensor, prompts: list[str],
    ref: list[int], cache: PrefixCache, placement: str, delta: float, kl: float, pos_weight: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """(B,) loss per row on the refusal's first tokens, logits (B, n, V) and tgt (B, n): softplus margins (positives:
    each target token beats the best other by `delta`, weighted `pos_weight`; negatives: the weakest loses by `delta`)
    + on negatives `kl` x KL(base || controlled) at the first answer position, the base model run without tokens."""
    loss = decision_margin(margins(logits, tgt), is_pos, delta) * torch.where(is_pos, pos_weight, 1.0)
    if kl > 0 and (~is_pos).any():
        idx = (~is_pos).nonzero().squeeze(-1).tolist()
        with torch.no_grad():
            base = encode_batch(tok, model.get_input_embeddings(), None, [prompts[i] for i in idx], [[] for _ in idx],
                                placement, [ref[:1]] * len(idx), cache=cache)  # type: ignore[arg-type]  # fmt: skip
            bl, _, _ = answer_logits(model, base)
        d = F.kl_div(F.log_softmax(logits[idx, 0], -1), F.log_softmax(bl[:, 0], -1), log_target=True, reduction="none")
        loss = loss.index_put((torch.tensor(idx),), loss[idx] + kl * d.sum(-1))  # d.sum(-1): (n_neg,) KL per row
    return loss


def probe_setup(config: str, bank_path: str) -> tuple[Any, Any, Any, list[int], list[dict]]:
    """The probes' common start (seed 0, 2 threads): the recipe, its backbone, the bank at `bank_path` (frozen, as
    loaded), the refusal template's token ids and the benchmark's rows."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    recipe = load_recipe(config)
    bb = load_backbone(recipe.backbone)
    bank = load_bank(Path(bank_path), bb.fingerprint)
    ref = bb.tokenizer(DEFAULT_REFUSAL, add_special_tokens=False).input_ids
    return recipe, bb, bank, ref, load_jsonl([Path(recipe.benchmark)])


def evaluate(model: Any, tok: Any, bank: Any, items: list, ref: list[int], cache: PrefixCache) -> tuple[float, float]:
    """Greedy-prefix (DSR, OR) on (prompt, active, should refuse) items."""
    hits = []
    for i in range(0, len(items), 16):
        ch = items[i : i + 16]
        rs = refusal_score(model, tok, bank, [c[0] for c in ch], [c[1] for c in ch], bank.placement, ref, 3, cache=cache)
        hits += rs.greedy.tolist()
    pos = [c[2] for c in items]
    d = sum(h for h, p in zip(hits, pos) if p) / sum(pos)
    o = sum(h for h, p in zip(hits, pos) if not p) / (len(pos) - sum(pos))
    return d, o


def report(step: int, rates: tuple[float, float]) -> None:
    print(f"step {step:4d}: test sample, greedy prefix: DSR {100 * rates[0]:5.1f} %  OR {100 * rates[1]:5.1f} %", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank", default="banks/smollm2-cpu")
    ap.add_argument("--config", default="pipelines/configs/smollm2-cpu.yaml")
    ap.add_argument("--per-order", type=int, default=30)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--delta", type=float, default=2.0)
    ap.add_argument("--kl", type=float, default=1.0)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--data", choices=("recipe", "pairs"), default="recipe")
    ap.add_argument("--out", default="runs/decision-margin-probe/bank")
    a = ap.parse_args()
    recipe, bb, bank, ref, rows = probe_setup(a.config, a.bank)
    tok, model = bb.tokenizer, bb.model
    for p in bank.parameters():  # a loaded bank is frozen
        p.requires_grad_(True)
    train = [Request(r["id"], r["prompt"], r.get("category"), r["kind"]) for r in rows if r["split"] == "train"]
    ex = interleave_orders(sample_examples(train, list(bank.categories), recipe.sampler), 0)
    test_items = sample_rows([r for r in rows if r["split"] == "test"], bank.categories, a.per_order, 0)
    cache = PrefixCache(model)
    opt = torch.optim.Adam([p for p in bank.parameters()], lr=a.lr)
    print(f"{len(ex)} train examples, {len(test_items)} test-sample rows", flush=True)
    report(0, evaluate(model, tok, bank, test_items, ref, cache))
    t0 = time.perf_counter()
    pairs = counterfactual_batches(train, list(bank.categories), a.batch, 0)
    for step in range(1, a.steps + 1):
        if a.data == "pairs":
            b = next(pairs)
        else:
            start = (step - 1) * a.batch % len(ex)
            b = [(e.prompt, list(e.active), e.label == "pos") for e in ex[start : start + a.batch]]
        prompts, active = [x[0] for x in b], [x[1] for x in b]
        is_pos = torch.tensor([x[2] for x in b])
        enc = encode_batch(tok, model.get_input_embeddings(), bank, prompts, active, bank.placement, [ref[:3]] * len(b),
                           cache=cache)  # fmt: skip
        logits, tgt, _ = answer_logits(model, enc)  # (B, 3, V)
        loss = decision_loss(model, tok, logits, tgt, is_pos, prompts, ref, cache, bank.placement, a.delta, a.kl)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        bank.clamp_norms_()
        if step % 10 == 0:
            print(f"step {step} loss {loss.mean().item():.3f} {time.perf_counter() - t0:.0f}s", flush=True)
        if step % a.every == 0:
            report(step, evaluate(model, tok, bank, test_items, ref, cache))
    save_bank(bank, Path(a.out), fingerprint=bb.fingerprint, init="probe")
    print(f"saved {a.out} ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
