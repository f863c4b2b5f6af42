"""Deep control tokens: does giving each module's m tokens a key and value at *every* layer buy the selectivity that
input-embedding tokens do not reach on this backbone?

    .venv/bin/python benchmarks/deep_prompt_probe.py [--bank banks/smollm2-cpu] [--steps 900] [--lr 0.01]

A module's tokens today are m rows of the input embedding: what they do at layer l is whatever the frozen layers
below make of them (and, with `before_assistant` placement, of the request before them). Here each module owns, per
layer, m key vectors (before RoPE) and m value vectors for the layer's key/value heads — m positions of the KV cache,
written directly (prefix tuning / P-tuning v2; 30 x 2 x 3 x 64 = 11,520 numbers per token on SmolLM2-135M against 576
for an embedding row). The answer position then reads a module through attention: its query, computed from the
request, against the module's keys — per layer and head, a bilinear test of "is this my category", the shape of the
linear read-out that `linear_probe_ceiling.py` found in the backbone's states.

Start: each module's tokens' own keys and values in the committed `--bank`, averaged over `--init-prompts` train
requests with that module alone active (so step 0 is close to the bank as it is), or `--resume` an earlier run's
deep_bank.pt (fresh Adam). Training: a plain torch loop (2 threads) on the recipe's train-split examples (orders
interleaved; `--data resample` draws them again each epoch, so more of the train split is seen) or `--data pairs`
(decision_margin_probe.py's counterfactual batches), with decision_margin_probe.py's loss (softplus margins of
"I'm sorry" over the best other token; KL of the first answer position to the base model on negatives). The
request's own keys and values come from a PrefixCache (constants: the backbone is frozen and nothing before the
block depends on it), so a step runs only the assistant header and the answer tokens trained. Every `--every`
steps: greedy-prefix DSR / OR on fast_score_agreement.py's seeded 180-row test sample; at the end, on the whole
test split under every subset of orders 1-3 (`--full`), the way evaluation scores a bank, and greedy generations on
the sample (`--gen` tokens), judged as evaluation judges them and compared token for token with the base model's.

`--loss first` (the default, the runs BENCHMARKS.md's first rows record) trains only the refusal's first 3 tokens;
its generations drift from the base model's after the first token. `--loss full` trains whole answers as the recipe
does: positives the refusal template + EOS, negatives the base model's own greedy answer (`--answer-tokens`,
generated once per prompt: an online teacher) with KL to it at every position. `--ema` scores and saves a moving
average of the parameters. `--split train` scores the whole train split instead of the test split (how much of the
test split's shortfall is generalisation); `--req-dropout` hides a share of each training row's request tokens and
`--train-splits train,val` draws examples from the val split too (two remedies for it). A measured prototype, not the
product's module contract.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from decision_margin_probe import counterfactual_batches, decision_loss, probe_setup  # the sibling scripts
from fast_score_agreement import generation_checks, sample_rows
from linear_probe_ceiling import rate_key

from mosaic_core.artifact import load_bank, save_bank
from mosaic_core.bank import DeepTokenBank
from mosaic_core.compose import DroppingCache, PrefixCache, answer_logits, encode_batch
from mosaic_core.config import DEFAULT_REFUSAL
from mosaic_core.generation import generate
from mosaic_core.judge import make_judge
from mosaic_core.losses import decision_margin, margins, masked_ce
from mosaic_core.sampling import Request, interleave_orders, sample_examples
from mosaic_core.training import refusal_target

Item = tuple[str, list[str], bool]  # prompt, active set, should refuse


def new_deep_bank(model: Any, cats: Sequence[str], init: dict[str, torch.Tensor]) -> DeepTokenBank:
    """A DeepTokenBank for `model` holding `init`'s (layers, 2, kv_heads, m, hd) tensors."""
    deep = DeepTokenBank.for_model(model, init[cats[0]].shape[3])
    for c in cats:
        deep.add(c, init[c])
    return deep


@torch.no_grad()
def ema_update_(avg: DeepTokenBank, live: DeepTokenBank, decay: float) -> None:
    """avg <- decay * avg + (1 - decay) * live, per category's (layers, 2, kv_heads, m, hd) tensor."""
    for c, p in live.vectors.items():
        avg.vectors[c].lerp_(p, 1 - decay)


def deep_logits(model: Any, tok: Any, deep: DeepTokenBank, prompts: list[str], active: list[list[str]],
                targets: list[list[int]], cache: PrefixCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """answer_logits with each row's deep block after its request: (B, T, V), (B, T), (B, T)."""
    return answer_logits(model, encode_batch(tok, model.get_input_embeddings(), deep, prompts, active, "before_assistant",
                                             targets, cache=cache))  # fmt: skip


@torch.no_grad()
def flag_hits(logits_fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]], items: list[Item],
              ref: list[int], batch: int = 32) -> list[bool]:  # fmt: skip
    """Per item: does greedy decoding start with the refusal's first 3 tokens (evaluation's fast flag)? `logits_fn`
    (prompts, active, targets) -> answer logits (B, T, V), targets (B, T), mask (B, T) places the blocks."""
    hits: list[bool] = []
    for i in range(0, len(items), batch):
        ch = items[i : i + batch]
        logits, tgt, mask = logits_fn([x[0] for x in ch], [x[1] for x in ch], [ref[:3]] * len(ch))
        hits += ((logits.argmax(-1) == tgt) | (mask == 0)).all(-1).tolist()
    return hits


def greedy_hits(model: Any, tok: Any, deep: DeepTokenBank, items: list[Item], ref: list[int], cache: PrefixCache,
                batch: int = 32) -> list[bool]:  # fmt: skip
    """flag_hits with each item's deep block after its request."""
    return flag_hits(lambda p, a, t: deep_logits(model, tok, deep, p, a, t, cache), items, ref, batch)


def deep_generate(model: Any, tok: Any, deep: DeepTokenBank, items: list[Item], cache: PrefixCache, max_new_tokens: int,
                  batch: int = 16) -> list[list[int]]:  # fmt: skip
    """Greedy answers' token ids (max_new_tokens, EOS appended where the answer ended) with each item's deep block
    after its request (an empty set: the base model)."""
    out: list[list[int]] = []
    for i in range(0, len(items), batch):
        ch = items[i : i + batch]
        enc = encode_batch(tok, model.get_input_embeddings(), deep, [x[0] for x in ch], [x[1] for x in ch], "before_assistant",
                           cache=cache)  # fmt: skip
        gens = generate(model, enc, max_new_tokens=max_new_tokens, eos_token_ids=[tok.eos_token_id])
        out += [g.token_ids + ([tok.eos_token_id] if g.finish_reason == "stop" else []) for g in gens]
    return out


class OnlineTeacher:
    """The base model's own greedy answer (token ids) per prompt, generated once when first asked for."""

    def __init__(self, model: Any, tok: Any, deep: DeepTokenBank, cache: PrefixCache, max_new_tokens: int):
        self.model, self.tok, self.deep, self.cache, self.n = model, tok, deep, cache, max_new_tokens
        self.answers: dict[str, list[int]] = {}

    def __call__(self, prompts: Sequence[str]) -> list[list[int]]:
        missing = list(dict.fromkeys(p for p in prompts if p not in self.answers))
        if missing:
            with self.cache.whole() if isinstance(self.cache, DroppingCache) else contextlib.nullcontext():
                ids = deep_generate(self.model, self.tok, self.deep, [(p, [], False) for p in missing], self.cache, self.n)
            self.answers.update(zip(missing, ids))
        return [self.answers[p] for p in prompts]


def full_answer_loss(model: Any, tok: Any, deep: DeepTokenBank, prompts: list[str], active: list[list[str]],
                     is_pos: torch.Tensor, refusal: list[int], teacher: OnlineTeacher, cache: PrefixCache,
                     delta: float, kl: float, pos_weight: float) -> torch.Tensor:  # fmt: skip
    """(B,) loss on whole answers, the recipe's loss with deep blocks and an online teacher: positives
    pos_weight x (CE on the refusal template + EOS + the margins of its first 3 tokens); negatives CE on the base
    model's greedy answer + kl x KL(base || controlled) at every answer position (full vocabulary) + the margin
    keeping "I'm sorry" from being greedy — except where the base model's own answer starts with it: there the
    base model refuses, and its answer is the target."""
    neg = (~is_pos).nonzero().squeeze(-1).tolist()
    answers = teacher([prompts[i] for i in neg])
    targets = [list(refusal) if p else [] for p in is_pos.tolist()]
    for i, a in zip(neg, answers):
        targets[i] = a
    logits, tgt, mask = deep_logits(model, tok, deep, prompts, active, targets, cache)  # (B, T, V)
    loss = logits.new_zeros(len(prompts))
    if is_pos.any():  # margins on positives only: a negative's answer may be shorter than 3 tokens (-100 beyond it)
        idx = is_pos.nonzero().squeeze(-1)
        dec = decision_margin(margins(logits[idx, :3], tgt[idx, :3]), torch.ones_like(idx, dtype=torch.bool), delta)
        loss = loss.index_put((idx,), pos_weight * (masked_ce(logits[idx], tgt[idx], mask[idx]) + dec))
    if neg:
        idx = torch.tensor(neg)
        with torch.no_grad():
            enc = encode_batch(tok, model.get_input_embeddings(), None, [prompts[i] for i in neg], [[] for _ in neg],
                               "before_assistant", [targets[i] for i in neg], cache=cache)  # fmt: skip
            base, _, _ = answer_logits(model, enc)  # (n, T', V): T' = the negatives' longest answer <= T
        T = base.shape[1]
        d = F.kl_div(F.log_softmax(logits[idx, :T], -1), F.log_softmax(base, -1), log_target=True, reduction="none")
        m = mask[idx, :T].float()
        kl_row = (d.sum(-1) * m).sum(-1) / m.sum(-1).clamp_min(1)
        probe, ptgt, _ = deep_logits(model, tok, deep, [prompts[i] for i in neg], [active[i] for i in neg],
                                     [refusal[:3]] * len(neg), cache)  # fmt: skip
        base_refuses = torch.tensor([a[:3] == refusal[:3] for a in answers])
        keep_off = decision_margin(margins(probe, ptgt), torch.zeros_like(idx, dtype=torch.bool), delta).masked_fill(base_refuses, 0.0)
        loss = loss.index_put((idx,), masked_ce(logits[idx], tgt[idx], mask[idx]) + kl * kl_row + keep_off)
    return loss


def generation_report(model: Any, tok: Any, deep: DeepTokenBank, items: list[Item], cache: PrefixCache, n: int) -> dict[str, float]:
    """Greedy generations (n new tokens) on items, judged as evaluation judges them (template + XSTest prefix), %:
    positives refused, and refused with the whole trained template; negatives refused, negatives whose answer is
    token-for-token the base model's, and the base model's own refusals on the same negatives."""
    judge = make_judge("template+prefix")
    text = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    gens = [text(g) for g in deep_generate(model, tok, deep, items, cache, n)]
    neg = [i for i, x in enumerate(items) if not x[2]]
    base = [text(g) for g in deep_generate(model, tok, deep, [(items[i][0], [], False) for i in neg], cache, n)]
    pos = [i for i, x in enumerate(items) if x[2]]
    whole, same = generation_checks(items, gens, base)

    def pct(flags: list[bool]) -> float:
        return round(100 * sum(flags) / max(len(flags), 1), 1)

    return {"pos_refused": pct([judge.is_refusal(items[i][0], gens[i]) for i in pos]),
            "pos_template": round(whole, 1),
            "neg_refused": pct([judge.is_refusal(items[i][0], gens[i]) for i in neg]),
            "neg_same_as_base": round(same, 1),
            "base_neg_refused": pct([judge.is_refusal(items[i][0], b) for i, b in zip(neg, base)])}  # fmt: skip


def rates(hits: list[bool], items: list[Item]) -> tuple[float, float]:
    """(DSR, OR) of refusal flags against the items' should-refuse labels."""
    pos = [x[2] for x in items]
    return (sum(h for h, p in zip(hits, pos) if p) / max(sum(pos), 1),
            sum(h for h, p in zip(hits, pos) if not p) / max(len(pos) - sum(pos), 1))  # fmt: skip


def full_items(rows: list[dict], cats: list[str], order: int) -> tuple[list[Item], list[str]]:
    """Every test request under every subset of this order that counts in a rate, and that rate
    (linear_probe_ceiling.rate_key: `dsr`, `or` or `lookalike_or`)."""
    items, keys = [], []
    for S in itertools.combinations(cats, order):
        for r in rows:
            key = rate_key(r, S)
            if key:
                items.append((r["prompt"], list(S), key == "dsr"))
                keys.append(key)
    return items, keys


def probe_data(config: str, bank_path: str, per_order: int, split: str = "test", train_splits: Sequence[str] = ("train",),
               neg_mix: dict[str, float] | None = None,
               ) -> tuple[Any, Any, Any, list[int], list[Request], list[Any], list[dict], list[Item]]:  # fmt: skip
    """probe_setup, then the `train_splits`' requests, the recipe's examples drawn from them (orders interleaved), the
    rows of `split` (the whole-split scoring's) and fast_score_agreement.py's test sample (`per_order` subsets per
    order, always from the test split). `neg_mix` replaces the recipe's sampler.neg_mix."""
    recipe, bb, bank, ref, rows = probe_setup(config, bank_path)
    if neg_mix:
        recipe = dataclasses.replace(recipe, sampler=dataclasses.replace(recipe.sampler, neg_mix=neg_mix))
    train = [Request(r["id"], r["prompt"], r.get("category"), r["kind"]) for r in rows if r["split"] in train_splits]
    ex = interleave_orders(sample_examples(train, list(bank.categories), recipe.sampler), 0)
    test_rows = [r for r in rows if r["split"] == "test"]
    scored_rows = [r for r in rows if r["split"] == split]
    return recipe, bb, bank, ref, train, ex, scored_rows, sample_rows(test_rows, list(bank.categories), per_order, 0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank", default="banks/smollm2-cpu")
    ap.add_argument("--config", default="pipelines/configs/smollm2-cpu.yaml")
    ap.add_argument("--init-prompts", type=int, default=16)
    ap.add_argument("--resume", default="", help="a deep_bank.pt written by an earlier run, or a deep bank directory: "
                    "start from it (fresh Adam)")
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--delta", type=float, default=2.0)
    ap.add_argument("--kl", type=float, default=1.0)
    ap.add_argument("--pos-weight", type=float, default=1.0, help="positives' loss weight (> 1 trades OR for DSR)")
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--per-order", type=int, default=30)
    ap.add_argument("--data", choices=("recipe", "resample", "pairs"), default="recipe",
                    help="resample: the recipe's sampler drawn again (seed = epoch) each epoch: more of the train split")
    ap.add_argument("--full", type=int, default=1, help="1: score the whole test split at the end (0: skip)")
    ap.add_argument("--limit", type=int, default=0, help="test requests for --full (0: all; tests use a few)")
    ap.add_argument("--split", choices=("test", "train", "val"), default="test",
                    help="the split --full scores (train: how much of the test split's gap is overfitting)")
    ap.add_argument("--seed", type=int, default=0, help="resample's draws use seed 1000 * seed + epoch (a resumed run: pass 1)")
    ap.add_argument("--loss", choices=("first", "full"), default="first",
                    help="first: margins on the refusal's first 3 tokens + first-position KL; full: whole answers "
                    "(refusal template; the base model's own greedy answer + KL at every position)")
    ap.add_argument("--answer-tokens", type=int, default=16, help="--loss full: the base model's answer length")
    ap.add_argument("--gen", type=int, default=20, help="> 0: at the end, greedy generations of this many tokens on the "
                    "test sample, judged (0: skip)")
    ap.add_argument("--ema", type=float, default=0.0, help="> 0: score and save an exponential moving average of the "
                    "parameters with this decay (step-to-step noise of the sample DSR was ~4 points without)")
    ap.add_argument("--save-bank", default="", help="also write the scored parameters as a bank directory (module artifacts "
                    "+ manifest: `mosaic evaluate/register/serve` load it)")
    ap.add_argument("--req-dropout", type=float, default=0.0, help="> 0: training rows hide this share of their request's "
                    "tokens (augmentation against memorised words; scoring never does)")
    ap.add_argument("--train-splits", default="train", help="comma-separated splits the training examples are drawn from "
                    "(train,val: a third more requests; nothing here selects on val)")
    ap.add_argument("--neg-mix", default="", help="the negatives' sources, e.g. inactive=0.6,general=0.2,lookalike=0.2 "
                    "(default: the recipe's sampler.neg_mix)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (two runs side by side on 2 cores: 1 each)")
    ap.add_argument("--out", default="runs/deep-prompt-probe")
    a = ap.parse_args(argv)
    neg_mix = {k: float(v) for k, v in (kv.split("=") for kv in a.neg_mix.split(",") if kv)}
    recipe, bb, bank, ref, train, ex, test_rows, sample = probe_data(a.config, a.bank, a.per_order, a.split,
                                                                        a.train_splits.split(","), neg_mix)
    torch.set_num_threads(a.threads)
    tok, model = bb.tokenizer, bb.model
    cats = list(bank.categories)
    t0 = time.perf_counter()
    init_prompts = [q.prompt for q in train[:: max(1, len(train) // a.init_prompts)][: a.init_prompts]]  # spread over kinds
    if a.resume:  # a deep_bank.pt, or a deep bank's directory (mosaic train's run/bank)
        init = load_bank(Path(a.resume)).vectors if Path(a.resume).is_dir() else torch.load(a.resume)
    else:
        init = DeepTokenBank.from_input_bank(model, tok, bank, init_prompts).vectors
    deep = new_deep_bank(model, cats, dict(init))
    scored = new_deep_bank(model, cats, dict(init)) if a.ema else deep  # what checkpoints score and the run saves
    n_params = sum(p.numel() for p in deep.parameters())
    cache = DroppingCache.for_chat(model, tok, max_bytes=6 << 30)
    opt = torch.optim.Adam(deep.parameters(), lr=a.lr)
    refusal = refusal_target(tok, DEFAULT_REFUSAL)  # the template + EOS, as the recipe's positives
    teacher = OnlineTeacher(model, tok, deep, cache, a.answer_tokens)  # only ever asked for empty blocks: the base model
    print(f"{len(ex)} train examples, {len(sample)} test-sample rows, {n_params:,} parameters "
          f"({n_params // len(cats):,} per module), init {time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
    log: list[dict[str, Any]] = []
    out = Path(a.out)

    def checkpoint(step: int) -> None:
        d, o = rates(greedy_hits(model, tok, scored, sample, ref, cache), sample)
        log.append({"step": step, "dsr": d, "or": o, "s": round(time.perf_counter() - t0, 1)})
        out.mkdir(parents=True, exist_ok=True)  # saved at every checkpoint: a stopped run keeps its last one
        torch.save({c: p.detach() for c, p in scored.vectors.items()}, out / "deep_bank.pt")
        print(f"step {step:4d}: test sample, greedy prefix: DSR {100 * d:5.1f} %  OR {100 * o:5.1f} %", flush=True)

    checkpoint(0)
    pairs = counterfactual_batches(train, cats, a.batch, 0)
    for step in range(1, a.steps + 1):
        if a.data == "pairs":
            b = next(pairs)
        else:
            epoch, start = divmod((step - 1) * a.batch, len(ex))
            if a.data == "resample" and start < a.batch and epoch:  # a new epoch: a new draw
                draw = dataclasses.replace(recipe.sampler, seed=1000 * a.seed + epoch)
                ex = interleave_orders(sample_examples(train, cats, draw), epoch)
            b = [(e.prompt, list(e.active), e.label == "pos") for e in ex[start : start + a.batch]]
        prompts, active = [x[0] for x in b], [x[1] for x in b]
        is_pos = torch.tensor([x[2] for x in b])
        with cache.hiding(a.req_dropout):  # this step's loss only: checkpoints and the online teacher see whole requests
            if a.loss == "full":
                loss = full_answer_loss(model, tok, deep, prompts, active, is_pos, refusal, teacher, cache, a.delta, a.kl,
                                        a.pos_weight)  # (B,)  # fmt: skip
            else:
                logits, tgt, _ = deep_logits(model, tok, deep, prompts, active, [ref[:3]] * len(b), cache)  # (B, 3, V)
                loss = decision_loss(model, tok, logits, tgt, is_pos, prompts, ref, cache, "before_assistant", a.delta,
                                     a.kl, a.pos_weight)  # (B,)  # fmt: skip
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        if a.ema:
            ema_update_(scored, deep, a.ema)
        if step % 20 == 0:
            print(f"step {step} loss {loss.mean().item():.3f} {time.perf_counter() - t0:.0f}s", flush=True)
        if step % a.every == 0 or step == a.steps:
            checkpoint(step)
    report: dict[str, Any] = {"args": vars(a), "params_per_module": n_params // len(cats), "sample": log}
    if a.gen:
        report["generations"] = generation_report(model, tok, scored, sample, cache, a.gen)
        print("test sample, greedy generations: " + "  ".join(f"{k} {v:5.1f} %" for k, v in report["generations"].items()),
              flush=True)  # fmt: skip
    if a.full:
        test = test_rows if not a.limit else test_rows[:: max(1, len(test_rows) // a.limit)]
        # the base model's own flag per request (no block: it does not depend on the active set), scored on the same rows
        prompts = list(dict.fromkeys(r["prompt"] for r in test))
        base = dict(zip(prompts, greedy_hits(model, tok, scored, [(p, [], False) for p in prompts], ref, cache)))
        for order in (1, 2, 3):
            items, keys = full_items(test, cats, order)
            for name, hits in (("", greedy_hits(model, tok, scored, items, ref, cache)), ("base_", [base[x[0]] for x in items])):
                res = {name + k: 100 * sum(h for h, kk in zip(hits, keys) if kk == k) / keys.count(k) for k in sorted(set(keys))}
                report.setdefault(f"order{order}", {"rows": len(items)}).update(res)
                print(f"{a.split} split, order {order}: " + "  ".join(f"{k} {v:5.1f} %" for k, v in res.items()), flush=True)
    if a.save_bank:  # a module artifact per category: what evaluation, registration and serving load
        save_bank(scored, Path(a.save_bank), fingerprint=bb.fingerprint, init=f"deep_prompt_probe from {a.resume or a.bank}")
        print(f"wrote the deep bank {a.save_bank}", flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'report.json'} ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
