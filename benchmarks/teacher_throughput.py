"""Teacher throughput of the Ray Data stage with 1 vs 2 actors, side by side in one run, plus the saving from
computing the teacher once per unique negative prompt (teacher passes vs negative examples).

    .venv/bin/python benchmarks/teacher_throughput.py [--prompts 32] [--max-new-tokens 32] [--recipe pipelines/configs/smollm2-135m/cpu.yaml]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import pandas as pd

from mosaic_core.config import load_recipe
from mosaic_core.dataset import load_jsonl
from mosaic_core.sampling import Request, sample_examples
from pipelines.data import run_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="pipelines/configs/smollm2-135m/cpu.yaml")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    a = ap.parse_args()
    recipe = load_recipe(a.recipe)
    rows = [r for r in load_jsonl([Path(recipe.dataset)]) if r["split"] == "train"]

    # dedup saving for the full recipe: negatives vs unique negative prompts
    reqs = [
        Request(r["id"], r["prompt"], r["category"], r["kind"])
        for r in rows
        if r["kind"] == "general" or r["category"] in recipe.bank.categories
    ]
    ex = sample_examples(reqs, recipe.bank.categories, recipe.sampler, recipe.seed)
    neg = [e for e in ex if e.label == "neg"]
    uniq = {e.prompt_id for e in neg}
    print(
        f"recipe {recipe.name}: {len(ex)} examples, {len(neg)} negatives, {len(uniq)} unique negative prompts "
        f"-> teacher passes saved: {1 - len(uniq) / len(neg):.1%}"
    )

    prompts = (
        pd.DataFrame([{"prompt_id": e.prompt_id, "prompt": e.prompt} for e in neg]).drop_duplicates("prompt_id").head(a.prompts)
    )
    import ray  # after `pipelines`, which keeps Ray on 127.0.0.1

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = {}
    for actors in (1, 2):
        r = dataclasses.replace(
            recipe, teacher=dataclasses.replace(recipe.teacher, actors=actors, max_new_tokens=a.max_new_tokens)
        )
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            run_teacher(prompts, r, Path(d) / "t", 2.0)
            dt = time.perf_counter() - t0
            out = pd.read_parquet(Path(d) / "t")
        toks = int(out["response_ids"].map(len).sum())
        results[actors] = (dt, toks)
        print(
            f"{actors} actor(s): {len(out)} prompts in {dt:.1f}s = {len(out) / dt:.2f} prompts/s, {toks / dt:.1f} generated tokens/s"
        )
    print(f"2 actors vs 1: {results[1][0] / results[2][0]:.2f}x throughput (incl. actor start-up)")
    ray.shutdown()


if __name__ == "__main__":
    main()
