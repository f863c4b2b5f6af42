"""The evaluation's jobs: one row per (request, condition, mode) to score (`build_jobs`), and the Ray Data actor
pool that scores them (`EvalUDF`, `run_jobs`): fast refusal score, generation + judge, MMLU letter, answers.
The stage itself is pipelines/eval.py."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import ray
from tqdm import tqdm

from mosaic_core.metrics import in_context_policy
from pipelines._actors import actor_pool_resources

if TYPE_CHECKING:
    from pipelines.eval import EvalConfig

ANSWER_TOKENS = 24  # fidelity and retention read greedy answers of this length (MOSAIC-bench's retention rule)


# ---------------------------------------------------------------------------------------------- the actor
class EvalUDF:
    """Loads backbone + bank once; scores a batch of rows of mixed modes, active sets and system prompts."""

    def __init__(
        self, backbone: str, bank_dir: str, refusal: str, threads: int, max_new_tokens: int, judge: str, fast_tokens: int = 3
    ):
        import torch

        from mosaic_core.artifact import load_bank
        from mosaic_core.backbone import load_backbone
        from mosaic_core.cache import PrefixCache
        from mosaic_core.judge import make_judge
        from mosaic_core.scoring import letter_ids

        torch.set_num_threads(threads)
        self.bb = load_backbone(backbone)
        self.bank = load_bank(Path(bank_dir), self.bb.fingerprint)
        self.refusal_ids = self.bb.tokenizer(refusal, add_special_tokens=False).input_ids
        self.letters = letter_ids(self.bb.tokenizer)
        self.max_new_tokens, self.fast_tokens = max_new_tokens, fast_tokens
        self.judge = make_judge(judge, template=refusal)
        # every request is scored under many active sets: its tokens before the block are computed once
        self.cache = None
        if self.bank.placement == "before_assistant":
            self.cache = PrefixCache.for_chat(self.bb.model, self.bb.tokenizer, max_bytes=1 << 30)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import torch

        from mosaic_core.batch import encode_batch, needs_cache
        from mosaic_core.generation import generate
        from mosaic_core.scoring import refusal_score
        from mosaic_core.template import as_messages

        tok, model = self.bb.tokenizer, self.bb.model
        from mosaic_core.training import request_of

        msgs = [as_messages(request_of(r), r["system"] or None) for r in batch.to_dict("records")]
        active = [list(a) for a in batch["active"]]
        score = np.full(len(batch), np.nan)
        response = [""] * len(batch)
        refused = np.zeros(len(batch), dtype=bool)
        modes = batch["mode"].to_numpy()
        with torch.inference_mode():
            for mode in ("fast", "gen", "mmlu", "answer"):
                idx = np.nonzero(modes == mode)[0]
                if not len(idx):
                    continue
                m_msgs, m_act = [msgs[i] for i in idx], [active[i] for i in idx]
                if mode == "fast":
                    rs = refusal_score(
                        model,
                        tok,
                        self.bank,
                        m_msgs,
                        m_act,
                        self.bank.placement,
                        self.refusal_ids,
                        self.fast_tokens,
                        cache=self.cache,
                    )
                    score[idx], refused[idx] = rs.logprob.exp().numpy(), rs.greedy.numpy()
                elif mode == "mmlu":
                    b = encode_batch(
                        tok, model.get_input_embeddings(), self.bank, m_msgs, m_act, self.bank.placement, cache=self.cache
                    )
                    logits = model(**b.model_inputs(), logits_to_keep=1).logits[:, -1, self.letters]
                    score[idx] = logits.argmax(-1).numpy()
                else:
                    gen_cache = self.cache if needs_cache(self.bank) else None
                    b = encode_batch(
                        tok, model.get_input_embeddings(), self.bank, m_msgs, m_act, self.bank.placement, cache=gen_cache
                    )
                    n_new = ANSWER_TOKENS if mode == "answer" else self.max_new_tokens
                    gens = generate(model, b, max_new_tokens=n_new, eos_token_ids=[tok.eos_token_id])
                    for j, g in zip(idx, gens):
                        response[j] = tok.decode(g.token_ids, skip_special_tokens=True)
                        refused[j] = self.judge.is_refusal(batch["prompt"].iloc[j], response[j])
        return batch.assign(score=score, response=response, refused=refused)


# ---------------------------------------------------------------------------------------------- jobs
def _cap(rows: list[dict], n: int | None, rng: random.Random) -> list[dict]:
    return rows if n is None or len(rows) <= n else rng.sample(rows, n)


def build_jobs(
    cfg: EvalConfig, requests: list[dict], mmlu: list[dict], xstest: list[dict], framings: list[dict] | None = None
) -> pd.DataFrame:
    """One row per (request, condition, mode). Conditions: `mosaic` (modules S on), `in_context` (S written in
    the system prompt), `base` (neither); `subset` names S ("" for the base model, whose answers do not depend on S)."""
    cats = list(cfg.recipe.bank.categories)
    rng = random.Random(cfg.seed)
    R = min(cfg.s.max_order, len(cats))
    subsets = [s for r in range(1, R + 1) for s in itertools.combinations(cats, r)]
    gen_subsets = {
        s
        for r in range(1, R + 1)
        for s in rng.sample(list(itertools.combinations(cats, r)), min(cfg.s.gen_subsets, math.comb(len(cats), r)))
    }
    by = defaultdict(list)
    for q in requests:
        by[(q["category"], q["kind"])].append(q)
    jobs: list[dict[str, Any]] = []

    def add(q: dict, condition: str, subset: tuple[str, ...], group: str, mode: str) -> None:
        active = list(subset) if condition == "mosaic" else []
        system = in_context_policy(subset, cfg.recipe.loss.refusal_template) if condition == "in_context" else ""
        key = "+".join(subset) if condition != "base" else ""
        jobs.append(
            {
                "prompt_id": q["id"],
                "prompt": q["prompt"],
                "category": q["category"] or "",
                "kind": q["kind"],
                "condition": condition,
                "subset": key,
                "group": group,
                "mode": mode,
                "active": active,
                "system": system,
                "answer": -1,
                "accepted": "",
                "_accepted": q.get("answer"),
                "messages": q.get("_messages", ""),
                "family": q.get("_family", ""),
            }
        )

    conditions = ["mosaic", *cfg.s.baselines]
    for s in subsets:
        groups = {
            "dsr": [q for c in s for q in by[(c, "target")]],
            "or": [q for c in cats if c not in s for q in by[(c, "target")]] + by[(None, "general")],
            "lookalike": [q for c in s for q in by[(c, "lookalike")]],
        }
        for group, qs in groups.items():
            fast = _cap(qs, cfg.s.fast_cap, rng)
            gen = _cap(qs, cfg.s.gen_requests, rng) if s in gen_subsets else []
            for cond in conditions:
                for q in fast:
                    add(q, cond, s, group, "fast")
                for q in gen:
                    add(q, cond, s, group, "gen")
    for q in xstest:  # the safe prompts: none, each single module, all modules
        sample = rng.random() < cfg.s.xstest_gen / max(len(xstest), 1)
        for s in [(), *[(c,) for c in cats], tuple(cats)]:
            add(q, "mosaic", s, "xstest", "fast")
            if sample:
                add(q, "mosaic", s, "xstest", "gen")
        for mode in ("fast", "gen") if sample else ("fast",):
            if "in_context" in cfg.s.baselines:
                add(q, "in_context", tuple(cats), "xstest", mode)
    _answer_jobs(cfg, by[(None, "general")], add, rng)
    _framed_jobs(cfg, by, framings or [], add, rng)
    for j in jobs:
        if j["group"] == "retention":
            j["accepted"] = json.dumps(j["_accepted"])
    conds = [("mosaic", ())] + [("mosaic", (c,)) for c in cats] + [("mosaic", tuple(cats))]
    conds += [
        ("mosaic", s) for r in range(2, min(3, len(cats)) + 1) for s in rng.sample(list(itertools.combinations(cats, r)), 1)
    ]
    conds += [("in_context", tuple(cats))] if "in_context" in cfg.s.baselines else []
    for cond, s in conds:
        for q in mmlu:
            add({"id": q["id"], "prompt": q["prompt"], "category": None, "kind": "mmlu"}, cond, s, "mmlu", "mmlu")
            jobs[-1]["answer"] = q["answer"]
    for j in jobs:
        j.pop("_accepted", None)
    df = pd.DataFrame(jobs)
    # The base model's rows do not depend on the subset: score each request once.
    return df.drop_duplicates(["prompt_id", "condition", "subset", "mode", "group"]).reset_index(drop=True)


def _answer_jobs(cfg: EvalConfig, general: list[dict], add: Any, rng: random.Random) -> None:
    """Generated answers for fidelity (general requests: the bare model's, and with a sample of single modules and
    with every module on) and retention (factual questions: no module, each module, every module)."""
    cats = tuple(cfg.recipe.bank.categories)
    plain = [q for q in general if q.get("task") != "factual"]
    factual = [q for q in general if q.get("task") == "factual"]
    picks = [
        (s, _cap(plain, cfg.s.fidelity_requests, rng))
        for s in rng.sample([(c,) for c in cats], min(cfg.s.fidelity_subsets, len(cats)))
    ]
    picks.append((cats, _cap(plain, cfg.s.fidelity_all_cap, rng)))
    for s, qs in picks:
        for q in qs:
            add(q, "base", (), "fidelity", "answer")
            add(q, "mosaic", s, "fidelity", "answer")
    if cfg.s.retention_cap == 0:
        return
    for q in _cap(factual, cfg.s.retention_cap, rng):
        for s in [(), *[(c,) for c in cats], cats]:
            add(q, "mosaic", s, "retention", "answer")


def _framed_jobs(cfg: EvalConfig, by: dict, framings: list[dict], add: Any, rng: random.Random) -> None:
    """Fast-score rows of requests wrapped in framing templates: per family and order, one subset, its targets
    (dsr), the inactive targets + general requests (or) and its look-alikes, each request in a template of the
    family drawn at random; with the `base` baseline, each framed request once more without modules. Multi-turn
    templates are real turns of the chat."""
    from mosaic_core.dataset import frame

    if not framings or cfg.s.framed_cap == 0:
        return
    cats = list(cfg.recipe.bank.categories)
    for family in sorted({f["family"] for f in framings}):
        members = [f for f in framings if f["family"] == family]
        for r in range(1, min(cfg.s.max_order, len(cats)) + 1):
            s = rng.choice(list(itertools.combinations(cats, r)))
            groups = {
                "dsr": [q for c in s for q in by[(c, "target")]],
                "or": [q for c in cats if c not in s for q in by[(c, "target")]] + by[(None, "general")],
                "lookalike": [q for c in s for q in by[(c, "lookalike")]],
            }
            for group, qs in groups.items():
                for q in _cap(qs, cfg.s.framed_cap, rng):
                    t = rng.choice(members)
                    framed = {
                        **q,
                        "id": f"{q['id']}@{t['id']}",
                        "_messages": json.dumps(frame(q["prompt"], t)),
                        "_family": family,
                    }
                    add(framed, "mosaic", s, f"framed:{group}", "fast")
                    # the bare model's flag on the same framed request: how much of a framed OR the framing alone causes
                    if "base" in cfg.s.baselines:
                        add(framed, "base", (), f"framed:{group}", "fast")


def jobs_key(jobs: pd.DataFrame, cfg: EvalConfig) -> str:
    """What a scored row depends on: every job, the bank's files (its manifest) and how rows are scored. Rows stored
    under one key are valid for exactly that evaluation."""
    import hashlib

    manifest = (Path(cfg.bank_dir) / "manifest.json").read_text()
    how = [cfg.recipe.backbone, cfg.recipe.loss.refusal_template, cfg.s.max_new_tokens, cfg.s.judge, cfg.s.fast_tokens]
    h = hashlib.sha256(json.dumps(how).encode() + manifest.encode())
    h.update(jobs.to_json(orient="records", default_handler=str).encode())
    return h.hexdigest()[:16]


def run_jobs(jobs: pd.DataFrame, cfg: EvalConfig, store: Path | None = None, flush_rows: int = 256) -> pd.DataFrame:
    """Score every job (rows in the order of `jobs`, with `score`, `response`, `refused` added). With `store`, scored
    rows are written there as they finish (`<jobs_key>/part-*.parquet`, every `flush_rows` rows), and a rerun after an
    interruption scores only the jobs not stored yet: a 90-minute CPU evaluation is not lost to a stopped session."""
    jobs = jobs.reset_index(drop=True).assign(_job=np.arange(len(jobs)))
    scored: list[pd.DataFrame] = []
    parts, files = None, []
    if store is not None:
        parts = Path(store) / jobs_key(jobs.drop(columns="_job"), cfg)
        parts.mkdir(parents=True, exist_ok=True)
        files = sorted(parts.glob("part-*.parquet"))
        if files:
            scored.append(pd.concat([pd.read_parquet(f) for f in files], ignore_index=True).drop_duplicates("_job"))
            print(f"[eval] resuming: {len(scored[0])} of {len(jobs)} rows already scored in {parts.name}/")
    todo = jobs[~jobs["_job"].isin(scored[0]["_job"])] if scored else jobs
    buffer: list[pd.DataFrame] = []
    n_parts = len(files)

    def flush() -> None:  # the buffered batches: stored as the next part (with a store), and kept
        nonlocal n_parts
        rows = pd.concat(buffer, ignore_index=True)
        if parts is not None:
            write_rows(rows, parts / f"part-{n_parts:05d}.parquet")
            n_parts += 1
        scored.append(rows)
        buffer.clear()

    if len(todo):
        bar = tqdm(total=len(todo), desc="[eval] rows", unit="row", mininterval=30)
        for batch in _score(todo, cfg):
            bar.update(len(batch))
            buffer.append(batch)
            if parts is not None and sum(map(len, buffer)) >= flush_rows:
                flush()
        if buffer:
            flush()
        bar.close()
    return pd.concat(scored, ignore_index=True).sort_values("_job").drop(columns="_job").reset_index(drop=True)


def write_rows(df: pd.DataFrame, path: Path) -> None:
    """Scored rows as parquet, whole or not at all. Without pandas' schema metadata: Ray hands list columns back as
    pyarrow-backed dtypes that pandas records by a name it cannot read back."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_suffix(".tmp")  # renamed once written: a part is either whole or absent, however the process stops
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(None), tmp)
    tmp.rename(path)


def _score(jobs: pd.DataFrame, cfg: EvalConfig) -> Iterator[pd.DataFrame]:
    """Scored batches as the actor pool finishes them (Ray Data streams; nothing waits for the whole dataset)."""
    res = actor_pool_resources(cfg.actors)
    # Similar lengths in one batch: less padding. Generation rows sort together too (they cost far more).
    jobs = jobs.assign(_n=jobs["prompt"].str.len() + jobs["system"].str.len()).sort_values(["mode", "_n"]).drop(columns="_n")
    ds = ray.data.from_pandas(jobs).repartition(max(1, len(jobs) // (cfg.s.batch_size * 8)))
    ds = ds.map_batches(
        EvalUDF,
        fn_constructor_kwargs={
            "backbone": cfg.recipe.backbone,
            "bank_dir": cfg.bank_dir,
            "refusal": cfg.recipe.loss.refusal_template,
            "threads": res["threads"],
            "max_new_tokens": cfg.s.max_new_tokens,
            "judge": cfg.s.judge,
            "fast_tokens": cfg.s.fast_tokens,
        },
        batch_size=cfg.s.batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_cpus=res["num_cpus"],
        num_gpus=res["num_gpus"],
    )
    yield from ds.iter_batches(batch_size=None, batch_format="pandas")
