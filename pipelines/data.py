"""Stage 1 — Ray Data: the request dataset -> combination-sampled examples + the counterfactual teacher.

    mosaic data --config pipelines/configs/smollm2-135m/cpu.yaml [--name NAME] [--out DIR] [--set seed=1]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m pipelines.data --config ...

Writes, under the run directory (docs/architecture.md, "Where things live"):
    resolved_config.yaml, provenance.json
    data/examples/*.parquet  {example_id, prompt_id, prompt, active, order, label, kind, category, source, draw, split}
                             (split: the role, train or val; sampler.val_share lends val requests to train)
    data/teacher/*.parquet   {prompt_id, response_ids, topk_ids, topk_logprobs}  (one row per unique negative prompt)
    data/manifest.json       content hash of (dataset, recipe, backbone) + counts per order / subset / kind
A rerun whose content hash matches reuses the outputs; anything else rebuilds into a temp dir that is renamed
into place only when complete, so a half-written output never counts as done. Teacher answers are also kept
beside the run directories (`<runs>/.teacher-cache/<key>/`, key = backbone + answer length + top-k), so a later
run - another recipe stage, more sampler draws - runs the teacher only on prompts no run has answered yet.
Before either, the committed store `data/teacher/<backbone>/` (scripts/build_teacher_store.py) is read: for the
backbone it was made with, any recipe asking for no longer answers and no wider top-k takes its rows by prefix."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import yaml

from mosaic_core.backbone import load_backbone
from mosaic_core.config import Recipe, load_recipe, parse_overrides
from mosaic_core.dataset import REQUIRED, validate_rows
from mosaic_core.errors import ConfigError, DatasetError
from mosaic_core.sampling import Request, frame_examples, interleave_orders, plan, sample_draws, sample_examples, split_off
from mosaic_core.teacher import TEACHER_COLS
from pipelines._actors import actor_pool_resources
from pipelines._provenance import provenance

DATA_VERSION = 1  # bump when the tables' meaning changes: old outputs then rebuild
TEACHER_STORE = Path(__file__).resolve().parents[1] / "data" / "teacher"
FRAMINGS = Path(__file__).resolve().parents[1] / "data" / "framings" / "framings.jsonl"


# ---------------------------------------------------------------------------------------------- helpers
def read_dataset(uri: str) -> pd.DataFrame:
    """Read JSONL (file or directory) or parquet, local or any fsspec URI, with Ray Data; check columns."""
    is_parquet = uri.endswith(".parquet") or (Path(uri).is_dir() and any(Path(uri).glob("*.parquet")))
    try:
        ds = ray.data.read_parquet(uri) if is_parquet else ray.data.read_json(uri, file_extensions=["jsonl", "json"])
        df = ds.to_pandas()
    except Exception as e:  # Ray wraps parse errors in its own types; one clear message instead
        raise DatasetError(f"cannot read dataset {uri!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise DatasetError(f"dataset {uri!r} lacks column(s) {missing}; each row needs {list(REQUIRED)}")
    df["category"] = df["category"].astype(object).where(df["category"].notna(), None)
    return df


def dataset_digest(uri: str) -> str:
    """sha256 over the dataset files' bytes (sorted), so any edit rebuilds; URIs hash their string."""
    p = Path(uri)
    files = sorted(
        f for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file() and f.suffix in {".jsonl", ".json", ".parquet"}
    )
    if not files:
        return hashlib.sha256(uri.encode()).hexdigest()
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


_SAMPLER_KEYS_ADDED_LATER = ("draws", "val_share")


def content_hash(recipe: Recipe, data_digest: str, fingerprint_digest: str) -> str:
    """Everything the outputs depend on: dataset bytes, the recipe's data-relevant parts, the backbone."""
    # Sampler keys added after the first tables build the same tables at their defaults (train reads no draw column
    # as draw 0): left out there, so older recipes keep their hash and their data.
    defaults = {f.name: f.default for f in dataclasses.fields(recipe.sampler)}
    sampler = {
        k: v for k, v in dataclasses.asdict(recipe.sampler).items() if not (k in _SAMPLER_KEYS_ADDED_LATER and v == defaults[k])
    }
    # The seed was the sampler's own key and the negatives' ratio a key fixed at 1: hashed as they were then.
    sampler |= {"seed": recipe.seed, "neg_ratio": 1.0}
    parts = {
        "v": DATA_VERSION,
        "bench": data_digest,  # the key the first tables were hashed under: renaming it would rebuild every run
        "backbone": fingerprint_digest,
        "categories": recipe.bank.categories,
        "sampler": sampler,
        "refusal": recipe.loss.refusal_template,
        "topk": recipe.loss.topk,
        "teacher": dataclasses.asdict(recipe.teacher),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=list).encode()).hexdigest()[:16]


def to_requests(df: pd.DataFrame) -> list[Request]:
    return [Request(r.id, r.prompt, r.category, r.kind) for r in df.itertuples(index=False)]


def examples_frame(examples: list, split: str) -> pd.DataFrame:
    rows = [{**dataclasses.asdict(e), "active": list(e.active), "split": split} for e in examples]
    return pd.DataFrame(rows)


class TeacherUDF:
    """Ray Data actor: loads the frozen backbone once, answers prompts with no control tokens."""

    def __init__(self, backbone: str, threads: int, max_new_tokens: int, topk: int):
        import torch

        torch.set_num_threads(threads)
        self.bb = load_backbone(backbone)
        self.max_new_tokens, self.topk = max_new_tokens, topk

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from mosaic_core.teacher import teacher_outputs
        from mosaic_core.training import request_of

        prompts = [request_of(r) for r in batch.to_dict("records")]  # a framed request: its chat
        rows = teacher_outputs(self.bb.model, self.bb.tokenizer, prompts, max_new_tokens=self.max_new_tokens, topk=self.topk)
        return pd.DataFrame(
            {
                "prompt_id": batch["prompt_id"].tolist(),
                "response_ids": [r["response_ids"] for r in rows],
                "topk_ids": [r["topk_ids"] for r in rows],
                "topk_logprobs": [r["topk_logprobs"] for r in rows],
            }
        )


def run_teacher(prompts: pd.DataFrame, recipe: Recipe, out_dir: Path, cpus: float) -> None:
    """map_batches over an actor pool; on CPU the actors take fractional CPUs so the read tasks still get a
    slot (docs/architecture.md: an actor holding every CPU deadlocks the pipeline silently)."""
    actors = recipe.teacher.actors
    res = actor_pool_resources(actors, cpus)
    # Sorting by length puts similar prompts in one batch: less padding in the teacher's forward.
    prompts = prompts.assign(_n=prompts["prompt"].str.len()).sort_values("_n").drop(columns="_n")
    ds = ray.data.from_pandas(prompts).repartition(max(1, len(prompts) // recipe.teacher.batch_size))
    ds = ds.map_batches(
        TeacherUDF,
        fn_constructor_kwargs={
            "backbone": recipe.backbone,
            "threads": res["threads"],
            "max_new_tokens": recipe.teacher.max_new_tokens,
            "topk": recipe.loss.topk,
        },
        batch_size=recipe.teacher.batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=res["num_cpus"],
        num_gpus=res["num_gpus"],
    )
    ds.write_parquet(str(out_dir))


class TeacherCache:
    """Teacher rows by prompt text, for one (backbone, teacher answer length, top-k): parquet parts in `root`, each
    written whole under a temporary name and renamed, so a reader never sees half a part."""

    def __init__(self, runs_dir: Path, recipe: Recipe, fingerprint_digest: str):
        key = {
            "v": DATA_VERSION,
            "backbone": fingerprint_digest,
            "max_new_tokens": recipe.teacher.max_new_tokens,
            "topk": recipe.loss.topk,
        }
        self.root = runs_dir / ".teacher-cache" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    @staticmethod
    def _key(prompt: str) -> str:
        return hashlib.sha256(prompt.encode()).hexdigest()

    @staticmethod
    def keys(prompts: pd.DataFrame) -> list[str]:
        """Each row's key: the hash of what the teacher answers (the framed chat's JSON when `messages` is set)."""
        framed = prompts["messages"] if "messages" in prompts else [""] * len(prompts)
        return [TeacherCache._key(m or p) for p, m in zip(prompts["prompt"], framed)]

    def lookup(self, prompts: pd.DataFrame) -> pd.DataFrame:
        """Cached rows for `prompts` (prompt_id, prompt): {prompt_id, *TEACHER_COLS}, one per prompt found."""
        parts = sorted(self.root.glob("*.parquet")) if self.root.is_dir() else []
        if not parts or prompts.empty:
            return pd.DataFrame(columns=["prompt_id", *TEACHER_COLS])
        known = pd.concat([pd.read_parquet(f) for f in parts], ignore_index=True).drop_duplicates("prompt_sha")
        want = prompts.assign(prompt_sha=self.keys(prompts))
        return want.merge(known, on="prompt_sha")[["prompt_id", *TEACHER_COLS]]

    def add(self, rows: pd.DataFrame, prompts: pd.DataFrame) -> None:
        """Keep `rows` ({prompt_id, *TEACHER_COLS}) under their prompts' text (`prompts`: prompt_id, prompt)."""
        if rows.empty:
            return
        key = dict(zip(prompts["prompt_id"], self.keys(prompts)))
        part = rows.assign(prompt_sha=[key[i] for i in rows["prompt_id"]])[["prompt_sha", *TEACHER_COLS]]
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".part-", suffix=".tmp", dir=self.root)
        os.close(fd)
        part.to_parquet(tmp, index=False)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is read by whoever runs next
        os.replace(tmp, self.root / f"part-{time.strftime('%Y%m%d%H%M%S')}-{Path(tmp).stem[6:]}.parquet")


class TeacherStore:
    """Committed teacher answers for one backbone: `<root>/<backbone digest>/store.json` (data version, backbone,
    answer length T, top-k) + parquet parts of {prompt_sha, *TEACHER_COLS}, rows by sha256 of the prompt text.

    A recipe asking for T' <= T answer tokens and k' <= k gets each row's first T' positions and first k' columns:
    greedy decoding is causal, so the first T' tokens of a T-token answer are the T'-token answer, and the
    teacher-forced distribution at those positions is the same (top-k columns are sorted by log-prob)."""

    def __init__(self, root: Path, fingerprint_digest: str):
        self.dir = root / fingerprint_digest[:16]
        self.meta_path = self.dir / "store.json"

    def meta(self) -> dict[str, Any] | None:
        return json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else None

    def serves(self, recipe: Recipe) -> bool:
        m = self.meta()
        return (
            bool(m)
            and m["data_version"] == DATA_VERSION
            and m["max_new_tokens"] >= recipe.teacher.max_new_tokens
            and m["topk"] >= recipe.loss.topk
        )  # type: ignore[index]

    def known(self) -> pd.DataFrame:
        parts = sorted(self.dir.glob("part-*.parquet"))
        if not parts:
            return pd.DataFrame(columns=["prompt_sha", *TEACHER_COLS])
        return pd.concat([pd.read_parquet(f) for f in parts], ignore_index=True).drop_duplicates("prompt_sha")

    def lookup(self, prompts: pd.DataFrame, recipe: Recipe) -> pd.DataFrame:
        """Stored rows for `prompts` (prompt_id, prompt), cut to the recipe's T and k: {prompt_id, *TEACHER_COLS}."""
        if prompts.empty or not self.serves(recipe):
            return pd.DataFrame(columns=["prompt_id", *TEACHER_COLS])
        want = prompts.assign(prompt_sha=TeacherCache.keys(prompts))
        rows = want.merge(self.known(), on="prompt_sha")[["prompt_id", *TEACHER_COLS]]
        T, k = recipe.teacher.max_new_tokens, recipe.loss.topk
        return rows.assign(
            response_ids=[np.asarray(r)[:T].tolist() for r in rows["response_ids"]],
            topk_ids=[[np.asarray(p)[:k].tolist() for p in r[:T]] for r in rows["topk_ids"]],
            topk_logprobs=[[np.asarray(p)[:k].tolist() for p in r[:T]] for r in rows["topk_logprobs"]],
        )

    def add(self, rows: pd.DataFrame, prompts: pd.DataFrame, *, backbone: str, max_new_tokens: int, topk: int) -> Path:
        """Write one part ({prompt_id, *TEACHER_COLS} under their prompts' text) whole, then the store's meta."""
        key = dict(zip(prompts["prompt_id"], TeacherCache.keys(prompts)))
        part = pd.DataFrame(
            {
                "prompt_sha": [key[i] for i in rows["prompt_id"]],
                "response_ids": [[int(t) for t in r] for r in rows["response_ids"]],
                "topk_ids": [[[int(t) for t in p] for p in r] for r in rows["topk_ids"]],
                # float32 halves the store; the loss reads them as float32 anyway
                "topk_logprobs": [[np.asarray(p, dtype=np.float32) for p in r] for r in rows["topk_logprobs"]],
            }
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.meta() or {"data_version": DATA_VERSION, "backbone": backbone, "max_new_tokens": max_new_tokens, "topk": topk}
        if (meta["max_new_tokens"], meta["topk"]) != (max_new_tokens, topk):
            raise ConfigError(
                [f"teacher store {self.dir} holds T={meta['max_new_tokens']}, k={meta['topk']}: not {max_new_tokens}, {topk}"],
                "teacher store",
            )
        n = len(list(self.dir.glob("part-*.parquet")))
        dest = self.dir / f"part-{n:04d}.parquet"
        tmp = dest.with_suffix(".tmp")
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False).replace_schema_metadata(None), tmp, compression="zstd")
        os.replace(tmp, dest)
        meta["prompts"] = int(len(self.known()))
        self.meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        return dest


def counts(ex: pd.DataFrame, teacher_rows: int) -> dict[str, Any]:
    out: dict[str, Any] = {"examples": int(len(ex)), "teacher_passes": int(teacher_rows), "draws": int(ex["draw"].nunique())}
    for split, g in ex.groupby("split"):
        out[split] = {
            "per_order": {str(k): int(v) for k, v in Counter(g["order"]).items()},
            "per_label": {str(k): int(v) for k, v in Counter(g["label"]).items()},
            "per_kind": {str(k): int(v) for k, v in Counter(g["kind"]).items()},
            "per_source": {str(k): int(v) for k, v in Counter(g["source"]).items()},
            "per_subset": {"+".join(a): int(n) for a, n in Counter(tuple(a) for a in g["active"]).items()},
        }
    neg = ex[ex["label"] == "neg"]
    out["negative_examples"] = int(len(neg))
    out["dedup_saving"] = round(1 - teacher_rows / max(len(neg), 1), 4)
    return out


# ---------------------------------------------------------------------------------------------- main
def main(
    config: str,
    *,
    name: str | None = None,
    out: str | None = None,
    overrides: dict[str, Any] | None = None,
    cpus: int | None = None,
    force: bool = False,
) -> Path:
    """Build (or reuse) the examples and teacher tables for a recipe; returns the run directory."""
    recipe = load_recipe(config, overrides)
    run_dir = Path(out or Path("runs") / (name or recipe.name)).resolve()  # absolute once, before Ray sees it
    dataset_uri = recipe.dataset if "://" in recipe.dataset else str(Path(recipe.dataset).resolve())
    print(f"[data] recipe {recipe.name!r} -> {run_dir}")

    bb = load_backbone(recipe.backbone)  # fails early, with the fix, if the backbone cannot load
    digest_backbone = bb.fingerprint.digest
    digest = content_hash(recipe, dataset_digest(dataset_uri), digest_backbone)
    manifest_path = run_dir / "data" / "manifest.json"
    # The recipe as resolved now, even when the data is reused: later stages read their settings from it.
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "resolved_config.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    (run_dir / "provenance.json").write_text(json.dumps(provenance(), indent=2) + "\n")
    if not force and manifest_path.is_file() and json.loads(manifest_path.read_text()).get("content_hash") == digest:
        print(f"[data] inputs unchanged (content hash {digest}): reusing {run_dir / 'data'}")
        return run_dir
    del bb

    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS", "local"),
            num_cpus=None if os.environ.get("RAY_ADDRESS") else cpus,
            include_dashboard=False,
            log_to_driver=False,
        )
    total_cpus = float(ray.cluster_resources().get("CPU", 1))

    df = read_dataset(dataset_uri)
    rows = df.to_dict("records")
    validate_rows(rows, None)
    known = set(df["category"].dropna())
    unknown = [c for c in recipe.bank.categories if c not in known]
    if unknown:
        raise ConfigError([f"bank.categories: {unknown} not in the dataset (it has {sorted(known)})"], config)
    df = df[df["category"].isin(recipe.bank.categories) | (df["kind"] == "general")]
    # sampler.val_share: part of val joins the training pool; validation draws from the rest only
    lent, val_req = split_off(to_requests(df[df["split"] == "val"]), recipe.sampler.val_share, recipe.seed)
    train_req = to_requests(df[df["split"] == "train"]) + lent
    for split, reqs in (("train", train_req), ("val", val_req)):
        empty = [c for c in recipe.bank.categories if not any(q.category == c and q.kind == "target" for q in reqs)]
        if not reqs or empty:
            raise DatasetError(
                f"split {split!r} has no target requests for {empty or 'any category'}"
                + (f" after sampler.val_share {recipe.sampler.val_share}" if split == "val" and lent else "")
            )

    cats = recipe.bank.categories
    print(f"[data] positives per subset by order: {plan(cats, recipe.sampler)}")
    if lent:
        print(f"[data] sampler.val_share: training also draws from {len(lent)} val requests, validation from {len(val_req)}")
    train_ex = interleave_orders(sample_draws(train_req, cats, recipe.sampler, recipe.seed), recipe.seed)
    if recipe.sampler.framed_share:  # only the train split's templates: val's and test2's stay unseen
        from mosaic_core.dataset import load_framings

        templates = [f for f in load_framings(FRAMINGS) if f["split"] == "train"]
        train_ex = frame_examples(train_ex, templates, recipe.sampler.framed_share, recipe.seed)
        print(
            f"[data] sampler.framed_share: {sum(bool(e.messages) for e in train_ex)} of {len(train_ex)} training examples framed"
        )
    val_cfg = dataclasses.replace(recipe.sampler, per_subset=max(1, recipe.sampler.per_subset // 4), draws=1)
    val_ex = sample_examples(val_req, cats, val_cfg, recipe.seed + 1)
    ex = pd.concat([examples_frame(train_ex, "train"), examples_frame(val_ex, "val")], ignore_index=True)
    neg = ex[ex["label"] == "neg"].drop_duplicates("prompt_id")[["prompt_id", "prompt", "messages"]].reset_index(drop=True)

    print(
        f"[data] {len(ex)} examples; teacher: {len(neg)} unique negative prompts for {int((ex['label'] == 'neg').sum())} negatives"
    )

    cache = TeacherCache(run_dir.parent, recipe, digest_backbone)
    tmp = Path(tempfile.mkdtemp(prefix=".data-", dir=run_dir))
    try:
        (tmp / "examples").mkdir()
        ex.to_parquet(tmp / "examples" / "part-0.parquet", index=False)
        none = neg.iloc[:0]  # --force: answer every prompt again
        stored = TeacherStore(TEACHER_STORE, digest_backbone).lookup(neg if not force else none, recipe)
        rest = neg[~neg["prompt_id"].isin(stored["prompt_id"])]
        cached = cache.lookup(rest if not force else none)
        reused = pd.concat([stored, cached], ignore_index=True) if len(cached) else stored
        todo = rest[~rest["prompt_id"].isin(cached["prompt_id"])]
        print(
            f"[data] teacher: {len(stored)} answers from the committed store, {len(cached)} from "
            f"{cache.root.parent.name}/{cache.root.name}, {len(todo)} to run"
        )
        t0 = time.perf_counter()
        if len(todo):
            run_teacher(todo, recipe, tmp / "teacher", total_cpus)
            cache.add(pd.read_parquet(tmp / "teacher")[["prompt_id", *TEACHER_COLS]], todo)
        if len(reused):
            (tmp / "teacher").mkdir(exist_ok=True)
            reused.to_parquet(tmp / "teacher" / "reused.parquet", index=False)
        teacher_s = time.perf_counter() - t0
        n_teacher = len(pd.read_parquet(tmp / "teacher", columns=["prompt_id"]))
        if n_teacher != len(neg):
            raise RuntimeError(f"teacher wrote {n_teacher} rows for {len(neg)} prompts")
        manifest = {
            "content_hash": digest,
            "dataset": dataset_uri,
            "recipe": recipe.name,
            "backbone": recipe.backbone,
            "teacher_seconds": round(teacher_s, 1),
            "teacher_reused": len(reused),
            "counts": counts(ex, n_teacher),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        final = run_dir / "data"
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"[data] teacher {teacher_s:.1f}s ({len(todo) / max(teacher_s, 1e-9):.2f} prompts/s); wrote {run_dir / 'data'}")
    return run_dir


def cli(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="mosaic data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="recipe YAML, e.g. pipelines/configs/smollm2-135m/cpu.yaml")
    ap.add_argument("--name", default=None, help="run name (default: the recipe's name)")
    ap.add_argument("--out", default=None, help="run directory (default: runs/<name>)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override, e.g. sampler.per_subset=10")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs for the local Ray cluster (default: all)")
    ap.add_argument(
        "--force",
        action="store_true",
        help="rebuild even if the content hash matches, and run the teacher on every prompt (no cached answers)",
    )
    a = ap.parse_args(argv)
    main(a.config, name=a.name, out=a.out, overrides=parse_overrides(a.overrides), cpus=a.cpus, force=a.force)


if __name__ == "__main__":
    cli()
