"""Training throughput of the bank, side by side in one run on the same examples: Ray Train + DeepSpeed with 1 and 2
workers and ZeRO-1/2 against a plain single-process PyTorch loop and HF PEFT prompt tuning, plus what an online
teacher (a second forward each step) would cost over the precomputed one.

    nice -n 19 .venv/bin/python benchmarks/train_throughput.py [--run runs/smollm2-cpu] [--steps 6] [--batch 16]
        [--threads 2] [--configs torch,torch-prefix-cache,torch-online-teacher,peft-prompt-tuning,ray-z1-w1,ray-z2-w1,ray-z1-w2,ray-z2-w2]
        [--json results.json]

Data: the first (1 warm-up + steps) x batch rows of `pipelines._train_tables.load_tables(run, seed)` (train split joined with
the stored teacher); every configuration trains on exactly these rows, `batch` per optimizer step, frozen fp32 backbone.

    torch                 one process, `threads` torch threads: batch_loss + backward + Adam + clamp_norms_ (the MOSAIC
                          step of the Ray worker, without Ray or DeepSpeed).
    torch-prefix-cache    as torch, with mosaic_core.cache.PrefixCache already holding every row's request (the
                          steady state from the second epoch on; the Ray stage uses it, and the rows below are
                          all first-epoch: cache misses).
    torch-online-teacher  as torch, but each step first recomputes the negatives' teacher top-k with a no-grad forward of
                          the bare backbone over prompt + stored answer; same token count, so the gap is that forward.
    peft-prompt-tuning    HF PEFT PromptTuningConfig: one soft prompt of m x K virtual tokens on every row (no per-category
                          composition), plain CE on the same targets (refusal for positives, teacher answer for negatives).
    ray-zS-wW             pipelines.train.main (Ray Train + DeepSpeed ZeRO-S, W workers x threads/W torch threads, global
                          batch `batch`) on a temporary run holding only these rows; per-step `tokens_per_s` / `step_s`
                          from MLflow. Ray Data shuffles the rows (same set, another order) and splits each global batch.

Tokens: real positions of the student forward(s) per step as batch_loss counts them (template, control tokens, target,
decision probes); PEFT: the attention-mask sum of its input, virtual tokens excluded. Because every configuration
takes the same rows per step, "x torch" compares s/step (examples/s), not the differing token counts. The first step
of each configuration is an untimed warm-up; Ray start-up (workers, backbone load, DeepSpeed init) and the final
checkpoint are outside the steps and show only in "wall s". Peak RSS: sampled every 0.2 s, of this process (in-process
configurations) or of the largest Ray Train worker process.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from mosaic_core.backbone import load_backbone
from mosaic_core.bank import ControlTokenBank
from mosaic_core.batch import encode_batch
from mosaic_core.cache import PrefixCache
from mosaic_core.config import Recipe, recipe_from_dict
from mosaic_core.losses import answer_logits
from mosaic_core.teacher import TEACHER_COLS
from mosaic_core.training import batch_loss, refusal_target
from pipelines._train_tables import load_tables

CONFIGS = (
    "torch",
    "torch-prefix-cache",
    "torch-online-teacher",
    "peft-prompt-tuning",
    "ray-z1-w1",
    "ray-z2-w1",
    "ray-z1-w2",
    "ray-z2-w2",
)
Example = dict[str, Any]


@dataclass
class Result:
    config: str
    workers: int
    tokens_per_s_worker: float
    tokens_per_s_total: float
    s_per_step: float
    wall_s: float  # the whole configuration: model load / Ray start-up + warm-up + steps (+ checkpoint for Ray)
    peak_rss_mib: float | None
    steps: int


@contextmanager
def peak_rss(ray_workers: bool) -> Iterator[list[float]]:
    """Yields a one-item list that holds the peak RSS (MiB) seen while the block ran, sampled every 0.2 s."""
    import psutil

    me, peak, stop = psutil.Process(), [0.0], threading.Event()

    def rss() -> float:
        if not ray_workers:
            return me.memory_info().rss
        sizes = [0]
        for p in me.children(recursive=True):  # the local cluster's raylet, and the workers under it
            try:
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    sizes.append(p.memory_info().rss)
            except psutil.Error:
                pass
        return max(sizes)

    def sample() -> None:
        while not stop.wait(0.2):
            peak[0] = max(peak[0], rss() / 2**20)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield peak
    finally:
        stop.set()
        t.join()


def timed(
    config: str, step: Callable[[list[Example]], int], batches: list[list[Example]], t_start: float, rss: list[float]
) -> Result:
    """Run `step` on every batch (the first untimed) and summarise; `step` returns the tokens it processed."""
    step(batches[0])
    tokens, secs = 0, 0.0
    for b in batches[1:]:
        t0 = time.perf_counter()
        tokens += step(b)
        secs += time.perf_counter() - t0
    n = len(batches) - 1
    return Result(config, 1, tokens / secs, tokens / secs, secs / n, time.perf_counter() - t_start, rss[0] or None, n)


@torch.no_grad()
def online_teacher(model: Any, tokenizer: Any, batch: list[Example], recipe: Recipe) -> list[Example]:
    """The batch with each negative's topk_ids/topk_logprobs recomputed by the bare backbone (no control tokens),
    teacher-forced on its stored answer (cut as batch_loss cuts it) -- what the data stage otherwise stores."""
    neg = [i for i, e in enumerate(batch) if e["label"] == "neg"]
    if not neg:
        return batch
    cut = recipe.loss.max_answer_tokens or None
    answers = [list(batch[i]["response_ids"])[:cut] for i in neg]
    enc = encode_batch(
        tokenizer,
        model.get_input_embeddings(),
        None,
        [batch[i]["prompt"] for i in neg],
        [[] for _ in neg],
        recipe.bank.placement,
        answers,
    )
    logits, _, _ = answer_logits(model, enc)  # (n, T, V) at the positions predicting each answer token
    top_lp, top_ids = torch.log_softmax(logits.float(), -1).topk(recipe.loss.topk, -1)
    out = list(batch)
    for j, i in enumerate(neg):
        T = len(answers[j])
        out[i] = {
            **batch[i],
            "response_ids": answers[j],
            "topk_ids": top_ids[j, :T].tolist(),
            "topk_logprobs": top_lp[j, :T].tolist(),
        }
    return out


def run_torch(config: str, recipe: Recipe, batches: list[list[Example]]) -> Result:
    t_start = time.perf_counter()
    with peak_rss(False) as rss:
        torch.manual_seed(recipe.seed)
        bb = load_backbone(recipe.backbone)  # frozen: requires_grad False, eval mode
        bank = ControlTokenBank.build(recipe.bank, bb.embeddings, bb.tokenizer)
        opt = torch.optim.Adam([p for p in bank.parameters() if p.requires_grad], lr=recipe.train.phases[0].lr)
        refusal = refusal_target(bb.tokenizer, recipe.loss.refusal_template)
        cache = None
        if config == "torch-prefix-cache":
            cache = PrefixCache(bb.model)
            with torch.no_grad():  # fill it outside the timed steps: later epochs find every request there
                for b in batches:
                    encode_batch(
                        bb.tokenizer,
                        bb.model.get_input_embeddings(),
                        bank,
                        [e["prompt"] for e in b],
                        [list(e["active"]) for e in b],
                        recipe.bank.placement,
                        cache=cache,
                    )

        def step(batch: list[Example]) -> int:
            if config == "torch-online-teacher":
                batch = online_teacher(bb.model, bb.tokenizer, batch, recipe)
            out = batch_loss(bb.model, bb.tokenizer, bank, batch, refusal, recipe.loss, cache=cache)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            bank.clamp_norms_()
            return int(out["tokens"])

        return timed(config, step, batches, t_start, rss)


def peft_inputs(tokenizer: Any, batch: list[Example], refusal: list[int], cut: int) -> tuple[torch.Tensor, ...]:
    """Left-padded input_ids, attention_mask, labels (-100 outside the target) for templated prompt + target."""
    rows, labels = [], []
    for e in batch:
        msgs = [{"role": "user", "content": e["prompt"]}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        prompt = list(tokenizer(text, add_special_tokens=False).input_ids)  # the template writes its own specials
        target = list(refusal) if e["label"] == "pos" else list(e["response_ids"])[: cut or None]
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    lab = torch.full((len(rows), L), -100, dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, L - len(r) :], mask[i, L - len(r) :], lab[i, L - len(r) :] = torch.tensor(r), 1, torch.tensor(lb)
    return ids, mask, lab


def run_peft(recipe: Recipe, batches: list[list[Example]]) -> Result:
    from peft import PromptTuningConfig, get_peft_model

    t_start = time.perf_counter()
    with peak_rss(False) as rss:
        torch.manual_seed(recipe.seed)
        bb = load_backbone(recipe.backbone)
        n_virtual = recipe.bank.m * len(recipe.bank.categories)  # as many vectors as the whole bank holds
        model = get_peft_model(bb.model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual))
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=recipe.train.phases[0].lr)
        refusal = refusal_target(bb.tokenizer, recipe.loss.refusal_template)

        def step(batch: list[Example]) -> int:
            ids, mask, labels = peft_inputs(bb.tokenizer, batch, refusal, recipe.loss.max_answer_tokens)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return int(mask.sum())  # real tokens only: PEFT prepends the virtual ones inside forward

        return timed("peft-prompt-tuning", step, batches, t_start, rss)


def run_ray(config: str, run: Path, raw: dict[str, Any], rows: Any, batch: int, steps: int, threads: int, tmp: Path) -> Result:
    """pipelines.train.main on a copy of the run whose examples are exactly `rows` (1 epoch = warm-up + steps)."""
    from mlflow import MlflowClient

    from pipelines.train import main

    stage, world = int(config[5]), int(config[8])  # ray-z<S>-w<W>
    if batch % world:
        raise ValueError(f"--batch {batch} must be divisible by {world} workers")
    d = tmp / config
    (d / "data" / "examples").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pandas(rows.drop(columns=list(TEACHER_COLS)), preserve_index=False),
        d / "data" / "examples" / "part-0.parquet",
    )
    (d / "data" / "teacher").symlink_to((run / "data" / "teacher").resolve())
    one_epoch = [{"epochs": 1, "lr": raw["train"]["phases"][0]["lr"]}]
    train = {**raw["train"], "zero_stage": stage, "num_workers": world, "batch_size": batch, "phases": one_epoch}
    (d / "resolved_config.yaml").write_text(yaml.safe_dump({**raw, "train": train}, sort_keys=False))
    t_start = time.perf_counter()
    with peak_rss(True) as rss:
        s = main(str(d), max_steps=1 + steps, tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", cpus_per_worker=threads / world)
    wall = time.perf_counter() - t_start
    client = MlflowClient(s["tracking_uri"])

    def history(key: str) -> list[float]:  # drop step 1, the warm-up
        return [m.value for m in sorted(client.get_metric_history(s["mlflow_run_id"], key), key=lambda m: m.step)][1:]

    tps, sec = history("tokens_per_s"), history("step_s")  # tokens_per_s: all workers' tokens / step time
    total = sum(t * x for t, x in zip(tps, sec, strict=True)) / sum(sec)
    return Result(config, world, total / world, total, sum(sec) / len(sec), wall, rss[0] or None, len(sec))


def table(results: list[Result]) -> str:
    base = next((r for r in results if r.config == "torch"), None)
    lines = [
        "| configuration | workers | tokens/s per worker | tokens/s total | s/step | x torch | wall s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = f"{base.s_per_step / r.s_per_step:.2f}" if base else "-"
        rss = f"{r.peak_rss_mib:.0f}" if r.peak_rss_mib else "-"
        lines.append(
            f"| {r.config} | {r.workers} | {r.tokens_per_s_worker:.1f} | {r.tokens_per_s_total:.1f} | "
            f"{r.s_per_step:.3f} | {ratio} | {r.wall_s:.1f} | {rss} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/smollm2-cpu", help="run directory whose data stage is done")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per configuration (after 1 warm-up step)")
    ap.add_argument("--batch", type=int, default=16, help="examples per optimizer step (global batch for Ray)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in total (Ray: threads/W per worker, W workers)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", default=None, help="also write the results and conditions here")
    a = ap.parse_args()
    if a.steps < 1 or a.batch < 1:
        ap.error("--steps and --batch must be at least 1")
    configs = [c for c in a.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")

    run = Path(a.run).expanduser().resolve()
    raw = yaml.safe_load((run / "resolved_config.yaml").read_text())
    recipe = recipe_from_dict(raw, str(run / "resolved_config.yaml"))
    if Path(recipe.backbone).expanduser().is_dir():  # a path relative to the working directory, as train.main reads it
        recipe = replace(recipe, backbone=str(Path(recipe.backbone).expanduser().resolve()))
        raw = {**raw, "backbone": recipe.backbone}
    train_df, _ = load_tables(run, recipe.seed)
    n = (1 + a.steps) * a.batch
    if len(train_df) < n:
        ap.error(f"{run} has {len(train_df)} training rows; (1 + {a.steps}) x {a.batch} = {n} needed")
    rows = train_df.iloc[:n]
    # plain python lists: pandas' to_dict leaves numpy object arrays, which batch_loss does not take
    examples = pa.Table.from_pandas(rows, preserve_index=False).to_pylist()
    batches = [examples[i : i + a.batch] for i in range(0, n, a.batch)]

    torch.set_num_threads(a.threads)
    load0, results, ray_init_s = os.getloadavg(), [], None
    print(
        f"[bench] {run.name}: {a.steps} timed steps + 1 warm-up, batch {a.batch}, {a.threads} torch threads, "
        f"{os.cpu_count()} CPUs, load {load0[0]:.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        for c in configs:
            if c.startswith("ray-"):
                import ray

                from pipelines.train import ray_runtime_env

                if not ray.is_initialized():  # one local cluster for every Ray configuration, after the in-process ones
                    t0 = time.perf_counter()
                    ray.init(
                        address="local",
                        num_cpus=a.threads,
                        num_gpus=0,
                        include_dashboard=False,
                        log_to_driver=False,
                        runtime_env=ray_runtime_env(),
                    )
                    ray_init_s = time.perf_counter() - t0
                r = run_ray(c, run, raw, rows, a.batch, a.steps, a.threads, Path(tmp))
            elif c == "peft-prompt-tuning":
                r = run_peft(recipe, batches)
            else:
                r = run_torch(c, recipe, batches)
            results.append(r)
            print(f"[bench] {c}: {r.tokens_per_s_total:.1f} tokens/s, {r.s_per_step:.3f} s/step, wall {r.wall_s:.1f} s")
            gc.collect()  # the previous configuration's model is unreachable once its function returned
        if ray_init_s is not None:
            import ray

            ray.shutdown()
    load1 = os.getloadavg()

    print()
    print(table(results))
    cond = {
        "run": str(run),
        "steps": a.steps,
        "warmup_steps": 1,
        "batch": a.batch,
        "cpus": os.cpu_count(),
        "torch_threads": a.threads,
        "loadavg_before": load0,
        "loadavg_after": load1,
        "ray_init_s": ray_init_s,
    }
    print(
        f"\n{os.cpu_count()} CPUs, {a.threads} torch threads in total, load average (1/5/15 min) before "
        f"{'/'.join(f'{x:.2f}' for x in load0)}, after {'/'.join(f'{x:.2f}' for x in load1)}"
        + (f"; Ray cluster start {ray_init_s:.1f} s" if ray_init_s is not None else "")
        + ". x torch = torch s/step / s/step (same rows per step everywhere)."
    )
    if a.json:
        Path(a.json).write_text(json.dumps({"conditions": cond, "results": [asdict(r) for r in results]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
