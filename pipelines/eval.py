"""Stage — evaluation: DSR, over-refusal and utility per order, against the base model and the in-context
baseline, with Ray Data batch inference (one actor per model copy; rows with different active sets and
system prompts batched together).

    mosaic eval --run runs/<name> [--split val|test|test2] [--xstest PATH/xstest_prompts.csv]
    mosaic eval --bank DIR --config RECIPE --split test2 [--budget cpu|quick|gpu|FILE.yaml]

How much is evaluated is the budget (EvalBudget): the recipe's `eval` names one of pipelines/configs/eval/ (or a
YAML file); `--budget` picks another and `--fast-cap`, `--fidelity-all-cap`, ... override single keys.

`--split` defaults to `val`, the split every choice is made on; `test` and `test2` are read only when asked, and
every `test2` scoring appends a line (recipe, bank digest, figures) to docs/test2-log.md.

Two measurements (the MOSAIC paper judges generated answers; on CPU thousands of generations take hours):
  fast  every subset of orders 1..R: one teacher-forced forward over the refusal's first tokens right after the
        prompt (no generation); refused iff greedy decoding would start with them (each is the argmax).
  gen   a seeded sample of subsets and requests: greedy generation (max_new_tokens) judged by mosaic_core's
        judge (template OR XSTest prefixes offline), so the fast score is checked against real outputs.
Whether answers survive the modules (greedy, 24 new tokens: MOSAIC-bench's retention rule):
  fidelity   a general answer with modules on opens with the same first `fidelity_words` words as the bare
             model's (lower-cased, punctuation stripped; a refusal is a mismatch), at order 1 (a sample of single
             modules) and with every module on;
  retention  a factual question's answer (an accepted string in it, no refusal) with no module, each module and
             every module on; MOSAIC-bench keeps only questions the bare model answers, so "none" is ~1.0.
Every rate carries a Wilson 95 % interval. Writes eval/report.json, eval/report.md, eval/rows.parquet (every
scored row) and eval/*.png, and logs them into the run's MLflow run (run.json) when there is one.

The stage's entry points and its configuration live here; building the rows to score and the Ray Data actor that
scores them in pipelines/_eval_jobs.py; the report (metrics, markdown, plots, MLflow, test2 log) in
pipelines/_eval_report.py."""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import ray
import yaml

from mosaic_core.config import EvalBudget, Recipe, from_dict, load_recipe, recipe_from_dict
from mosaic_core.dataset import EVAL_SPLITS, FIT_SPLITS, load_jsonl
from mosaic_core.errors import ArtifactError, ConfigError
from pipelines._eval_jobs import build_jobs, run_jobs, write_rows
from pipelines._eval_report import append_test2_log, log_to_mlflow, markdown, plots, summarize, summary_table

SCORED_DIR = ".scored"  # rows scored so far, kept until the report is written: a rerun resumes from them
BUDGETS = Path(__file__).resolve().parent / "configs" / "eval"


def load_budget(budget: str, overrides: dict[str, Any] | None = None) -> EvalBudget:
    """A named budget (pipelines/configs/eval/<name>.yaml) or a YAML file of EvalBudget keys, with `overrides`."""
    path = Path(budget) if budget.endswith((".yaml", ".yml")) else BUDGETS / f"{budget}.yaml"
    if not path.is_file():
        named = sorted(p.stem for p in BUDGETS.glob("*.yaml"))
        raise ConfigError([f"{budget!r}: no such budget file ({path}); named budgets: {named}"], "eval budget")
    return from_dict(EvalBudget, {**(yaml.safe_load(path.read_text()) or {}), **(overrides or {})})


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """One evaluation: which bank, on which recipe's dataset, with which budget."""

    bank_dir: str
    """Bank directory (manifest.json + modules)."""
    recipe: Recipe
    """The run's recipe (backbone, dataset, categories, refusal template)."""
    budget: EvalBudget = EvalBudget()
    """How much to evaluate (load_budget(recipe.eval) for the recipe's own)."""
    out_dir: str
    """Where eval/ goes (the run directory)."""
    split: str = "val"
    """Dataset split evaluated: `val` (where choices are made), `test` or `test2` (reporting only)."""
    xstest: str | None = None
    """XSTest CSV (evaluation only; its 250 safe prompts)."""
    actors: int = 1
    """Model copies (Ray Data actors)."""
    seed: int = 0
    """Sampling seed."""
    test2_log: str | None = str(Path(__file__).resolve().parents[1] / "docs" / "test2-log.md")
    """Where each `test2` scoring appends its line (None: not logged)."""

    def __post_init__(self) -> None:
        if self.split not in (*FIT_SPLITS[1:], *EVAL_SPLITS):
            raise ConfigError([f"split: {self.split!r} is not one of val, test, test2 (train is never evaluated)"], "eval")

    @property
    def s(self) -> EvalBudget:
        return self.budget


# ---------------------------------------------------------------------------------------------- main
def load_xstest(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("label") == "safe"]
    if not rows:
        raise ConfigError([f"xstest: no rows labelled 'safe' in {path}"], "eval")
    return [{"id": f"xstest-{r['id']}", "prompt": r["prompt"], "category": None, "kind": "xstest"} for r in rows]


def split_requests(cfg: EvalConfig) -> list[dict[str, Any]]:
    """The requests of `cfg.split` for the bank's categories (and general ones). On `val`, those the recipe's
    `sampler.val_share` lent to training are left out -- the same ones the data stage lends -- so that val scores
    only requests the bank never trained on, as its per-epoch validation does."""
    from types import SimpleNamespace

    from mosaic_core.sampling import split_off

    requests = [r for r in load_jsonl([Path(cfg.recipe.dataset)]) if r["split"] == cfg.split]
    if not requests:
        raise ConfigError([f"split: the dataset {cfg.recipe.dataset} has no {cfg.split!r} rows"], "eval")
    requests = [r for r in requests if r["kind"] == "general" or r["category"] in cfg.recipe.bank.categories]
    sampler = cfg.recipe.sampler
    if cfg.split == "val" and sampler.val_share:
        lent, _ = split_off([SimpleNamespace(id=r["id"]) for r in requests], sampler.val_share, cfg.recipe.seed)
        lent_ids = {q.id for q in lent}
        print(f"[eval] val: {len(lent_ids)} requests lent to training (sampler.val_share) are not scored")
        requests = [r for r in requests if r["id"] not in lent_ids]
    return requests


def main(cfg: EvalConfig) -> dict[str, Any]:
    """Measure the bank; write eval/report.{json,md} + plots; return the report."""
    from mosaic_core.scoring import load_mmlu, mmlu_prompt

    t0 = time.perf_counter()
    out = Path(cfg.out_dir).resolve() / "eval"
    requests = split_requests(cfg)
    questions = load_mmlu(Path(cfg.s.mmlu)) if cfg.s.mmlu else []
    if cfg.s.mmlu_limit and len(questions) > cfg.s.mmlu_limit:
        questions = sorted(random.Random(cfg.seed).sample(questions, cfg.s.mmlu_limit), key=lambda q: q.id)
    mmlu = [{"id": q.id, "prompt": mmlu_prompt(q), "answer": q.answer} for q in questions]
    xs = load_xstest(cfg.xstest) if cfg.xstest else []
    if cfg.s.xstest_cap and len(xs) > cfg.s.xstest_cap:
        xs = random.Random(cfg.seed).sample(xs, cfg.s.xstest_cap)
    framings = []
    if cfg.s.framings and cfg.s.framed_cap != 0:
        from mosaic_core.dataset import load_framings

        split = "val" if cfg.split == "val" else "test2"  # test2's templates are the ones training never saw
        framings = [f for f in load_framings(Path(cfg.s.framings)) if f["split"] == split]
    jobs = build_jobs(cfg, requests, mmlu, xs, framings)
    print(f"[eval] {len(jobs)} rows: " + ", ".join(f"{k} {v}" for k, v in jobs["mode"].value_counts().items()))
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False, log_to_driver=False)
    res = run_jobs(jobs, cfg, store=out / SCORED_DIR)
    rep = summarize(res, cfg)
    rep["seconds"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    files = plots(rep, out)
    (out / "report.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(rep, cfg))
    # every scored row (score = per-token refusal probability, refused = greedy/judge flag): another rule or cut
    # of the same run is a pandas query away, not another evaluation
    write_rows(res, out / "rows.parquet")
    files += [out / "report.json", out / "report.md", out / "rows.parquet"]
    shutil.rmtree(out / SCORED_DIR, ignore_errors=True)  # rows.parquet holds them now
    rid = log_to_mlflow(Path(cfg.out_dir).resolve(), rep, files)
    if cfg.split == "test2" and cfg.test2_log:
        append_test2_log(Path(cfg.test2_log), rep, cfg)
    print(summary_table(rep))
    print(f"[eval] {rep['seconds']}s; wrote {out}/report.md" + (f"; logged to MLflow run {rid}" if rid else ""))
    return rep


def cli(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="mosaic eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="run directory (uses its bank/ and resolved_config.yaml)")
    ap.add_argument("--bank", help="bank directory (with --config, or to evaluate another bank on a run's recipe)")
    ap.add_argument("--config", help="recipe YAML (default: the run's resolved_config.yaml)")
    ap.add_argument("--out", help="output directory for eval/ (default: the run dir, or the bank's parent)")
    ap.add_argument("--xstest", help="XSTest's xstest_prompts.csv (its 250 safe prompts; not shipped here)")
    ap.add_argument(
        "--split",
        default="val",
        choices=("val", "test", "test2"),
        help="val (default: where choices are made); test and test2 for reporting only (test2 is logged)",
    )
    ap.add_argument("--test2-log", default=EvalConfig.test2_log, help="file each test2 scoring appends to")
    ap.add_argument("--actors", type=int, default=1)
    g = ap.add_argument_group("budget (default: the one the recipe's `eval` names)")
    g.add_argument("--budget", default=None, help="a budget of pipelines/configs/eval/ (cpu, quick, gpu) or a YAML file")
    for name, typ in (
        ("max-order", int),
        ("fast-cap", int),
        ("gen-subsets", int),
        ("gen-requests", int),
        ("max-new-tokens", int),
        ("mmlu", str),
        ("mmlu-limit", int),
        ("xstest-cap", int),
        ("xstest-gen", int),
        ("judge", str),
        ("batch-size", int),
        ("fast-tokens", int),
        ("fidelity-subsets", int),
        ("fidelity-requests", int),
        ("fidelity-all-cap", int),
        ("retention-cap", int),
        ("framings", str),
        ("framed-cap", int),
    ):
        g.add_argument(f"--{name}", type=typ, default=None)
    g.add_argument("--baselines", default=None, help="comma-separated: base,in_context")
    a = ap.parse_args(argv)
    if not (a.run or (a.bank and a.config)):
        raise ConfigError(["give --run RUN_DIR, or --bank DIR with --config RECIPE"], "mosaic eval")
    run = Path(a.run) if a.run else None
    bank = Path(a.bank) if a.bank else run / "bank"  # type: ignore[operator]
    if not (bank / "manifest.json").is_file():
        raise ArtifactError(f"{bank} holds no bank (manifest.json missing): train first, or pass --bank")
    if a.config:
        recipe = load_recipe(a.config)
    else:
        recipe = recipe_from_dict(yaml.safe_load((run / "resolved_config.yaml").read_text()))  # type: ignore[operator]
    over = {k: v for k, v in vars(a).items() if v is not None and k in {f.name for f in fields(EvalBudget)}}
    if a.baselines is not None:
        over["baselines"] = tuple(b for b in a.baselines.split(",") if b)
    cfg = EvalConfig(
        bank_dir=str(bank.resolve()),
        recipe=recipe,
        budget=load_budget(a.budget or recipe.eval, over),
        out_dir=str(Path(a.out or run or bank.parent)),
        split=a.split,
        xstest=a.xstest,
        actors=a.actors,
        test2_log=a.test2_log,
    )
    main(cfg)


if __name__ == "__main__":
    cli()
