"""Fill the committed teacher store (data/teacher/<backbone>/) for the embedded backbone, in resumable chunks.

Every train and val request of MOSAIC-bench can be a negative (another category's target, a look-alike, a general
request), so the store answers all of them once, at the recipe's answer length and top-k; `mosaic data` then reads
it before running anything. Each chunk goes through the data stage's own Ray Data teacher pass and is written as one
parquet part when complete: stop it at any time (kill its PID), run it again, and it carries on with the prompts
not stored yet. The test splits are never answered: nothing trains or selects on them.

    nohup python scripts/build_teacher_store.py --config pipelines/configs/smollm2-135m/cpu.yaml --chunk 256 > teacher.log 2>&1 &
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from mosaic_core.backbone import load_backbone
from mosaic_core.config import load_recipe
from mosaic_core.dataset import FIT_SPLITS, load_jsonl
from mosaic_core.teacher import TEACHER_COLS
from pipelines.data import TEACHER_STORE, TeacherCache, TeacherStore, run_teacher

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "pipelines" / "configs" / "smollm2-135m" / "cpu.yaml"))
    ap.add_argument("--chunk", type=int, default=256, help="prompts per part (one part is the unit of resumption)")
    ap.add_argument("--limit", type=int, default=None, help="stop after this many prompts (a bounded session)")
    ap.add_argument("--cpus", type=int, default=None)
    a = ap.parse_args()
    recipe = load_recipe(a.config)
    bb = load_backbone(recipe.backbone)
    store = TeacherStore(TEACHER_STORE, bb.fingerprint.digest)
    del bb
    rows = [r for r in load_jsonl([ROOT / recipe.dataset]) if r["split"] in FIT_SPLITS]
    prompts = pd.DataFrame({"prompt": sorted({r["prompt"] for r in rows})})
    prompts["prompt_sha"] = [TeacherCache._key(t) for t in prompts["prompt"]]
    prompts["prompt_id"] = prompts["prompt_sha"].str[:16]
    todo = prompts[~prompts["prompt_sha"].isin(set(store.known()["prompt_sha"]))].reset_index(drop=True)
    if a.limit is not None:
        todo = todo.iloc[: a.limit]
    print(
        f"[teacher-store] {len(prompts)} train/val prompts; {len(prompts) - len(todo)} stored; {len(todo)} to answer -> {store.dir}"
    )
    if todo.empty:
        return
    import ray  # after `pipelines`, which keeps Ray on 127.0.0.1

    ray.init(address="local", num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    t0, done = time.perf_counter(), 0
    for s in tqdm(range(0, len(todo), a.chunk), desc="teacher chunks", unit="chunk"):
        chunk = todo.iloc[s : s + a.chunk][["prompt_id", "prompt"]]
        with tempfile.TemporaryDirectory(prefix="teacher-") as tmp:
            run_teacher(chunk, recipe, Path(tmp) / "out", cpus)
            out = pd.read_parquet(Path(tmp) / "out")[["prompt_id", *TEACHER_COLS]]
        part = store.add(
            out, chunk, backbone=recipe.backbone, max_new_tokens=recipe.teacher.max_new_tokens, topk=recipe.loss.topk
        )
        done += len(chunk)
        el = time.perf_counter() - t0
        print(f"[teacher-store] {part.name}: {done}/{len(todo)} prompts, {done / el:.2f} prompts/s", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
