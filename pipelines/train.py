"""Stage `train`: Ray Train TorchTrainer + DeepSpeed ZeRO trains the control-token bank of a run; the backbone
stays frozen.

    mosaic train --run runs/<name> [--workers N] [--max-steps N] [--extend BANK_DIR --add CATEGORY ...]
    python -m pipelines.train --run runs/<name> ...          # the `ray job submit` entry point

Reads `<run>/resolved_config.yaml`, `<run>/data/examples/*.parquet` and `<run>/data/teacher/*.parquet`
(negatives joined to the teacher on prompt_id at the driver; one Ray dataset per sampler draw, epoch e reading
draw e mod draws); writes `<run>/run.json` (the MLflow run),
`<run>/ray_results/` (Ray Train checkpoints), `<run>/bank/` (the best bank by validation DSR - OR) and
`<run>/training.png` (loss terms per step, validation per epoch; also an MLflow artifact).

Each worker: frozen backbone + bank in one nn.Module; DeepSpeed gets only the trainable bank vectors and a
client torch.optim.Adam (the config "optimizer" would JIT-build FusedAdam for ~70 s on CPU, docs/architecture.md);
norms are clamped after every step. Every epoch (and at the end) all ranks validate their share of the val
split (teacher-forced refusal probability, positives vs negatives) and save a checkpoint: DeepSpeed's own
files (each rank writes its ZeRO optimizer partition; Ray merges them into one directory) plus, from rank 0,
the bank, the best bank so far and `state.json`. A restarted worker group resumes from the latest one.
Rank 0 alone logs every step to MLflow; every rank calls `ray.train.report` on the same steps (every
`train.report_every` steps and at each epoch's checkpoint: a report is a collective, and Ray Train takes one per poll).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

EXPERIMENT = "mosaic"
VAL_BATCH = 16
MIN_FIDELITY = 0.7  # select_key: the share of general answers (all modules on) that must keep their opening
LOOPBACK_HOOK = "pipelines._loopback.install"  # torch TCPStore (+ Serve replica gRPC) on 127.0.0.1: docs/architecture.md
CKPT_TAG = "ckpt"  # one DeepSpeed tag per checkpoint directory: Ray keeps one directory per report


# ----------------------------------------------------------------------------------------------- helpers


def _read_parquet_dir(path: Path) -> Any:
    import pandas as pd

    from mosaic_core.errors import ConfigError

    files = sorted(path.glob("*.parquet")) if path.is_dir() else []
    if not files:
        raise ConfigError([f"no parquet files in {path}: run the data stage (`mosaic data`) first"], "run directory")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def load_tables(run: Path, seed: int, val_examples: int = 64) -> tuple[Any, list[dict[str, Any]]]:
    """(train rows joined with the teacher, shuffled) and the validation rows: up to `val_examples` scored for
    refusal (prompt, active, label, order; half of each label where the split has them) and up to `val_examples`
    general requests with every sampled module on and the teacher's answer (`answer_ids`), scored for fidelity."""
    from mosaic_core.errors import ConfigError
    from mosaic_core.teacher import TEACHER_COLS

    ex = _read_parquet_dir(run / "data" / "examples")
    teacher = _read_parquet_dir(run / "data" / "teacher")[["prompt_id", *TEACHER_COLS]].drop_duplicates("prompt_id")
    bad = sorted(set(ex["label"]) - {"pos", "neg"})
    if bad:
        raise ConfigError([f"examples: unknown label(s) {bad}"], str(run))
    train = ex[ex["split"] == "train"] if "split" in ex else ex
    train = train.merge(teacher, on="prompt_id", how="left")
    is_neg = train["label"] == "neg"
    missing = sorted(set(train.loc[is_neg & train["response_ids"].isna(), "prompt_id"]))
    if missing:
        problem = f"{len(missing)} negative prompt(s) have no teacher row, e.g. {missing[:5]}: rerun the teacher"
        raise ConfigError([problem], str(run))
    for c in TEACHER_COLS:  # positives get empty lists (not NaN) so Arrow keeps one list type per column
        train[c] = [v if n else [] for v, n in zip(train[c], is_neg, strict=True)]
    train = train.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # interleave orders from the start
    if "draw" not in train:  # tables written before sampler.draws: one draw
        train["draw"] = 0
    val_df = ex[ex["split"] == "val"] if "split" in ex else ex.iloc[:0]
    parts = [g.sample(min(len(g), val_examples // 2), random_state=seed) for _, g in val_df.groupby("label")]
    val = [
        {"prompt": r.prompt, "active": list(r.active), "label": r.label, "order": len(r.active)}
        for p in parts
        for r in p.itertuples()
    ]
    if len(val_df) and "source" in val_df:
        top = val_df[(val_df["source"] == "general") & (val_df["order"] == val_df["order"].max())].drop_duplicates("prompt_id")
        top = top.merge(teacher, on="prompt_id").head(val_examples)
        val += [
            {
                "prompt": r.prompt,
                "active": list(r.active),
                "label": "fidelity",
                "order": len(r.active),
                "answer_ids": [int(t) for t in r.response_ids],
            }
            for r in top.itertuples()
        ]
    return train, val


def draw_dataset(d: int) -> str:
    """The Ray dataset name of the sampler's draw d (epoch e trains on draw e mod draws)."""
    return "train" if d == 0 else f"train_{d}"


def deepspeed_config(recipe: Any, micro_batch: int, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed config for a recipe: `base` (e.g. cluster/deepspeed/zero3.json) with its "auto" values
    filled from the recipe, else the built-in one. No "optimizer" section: the client Adam is used."""
    built = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": recipe.train.zero_stage},
        "bf16": {"enabled": recipe.train.precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
    }
    if base is None:
        return built

    def fill(node: Any, auto: Any) -> Any:
        if isinstance(node, dict):
            return {k: fill(v, auto.get(k) if isinstance(auto, dict) else None) for k, v in node.items()}
        return auto if node == "auto" else node

    cfg = fill(base, built)
    if "optimizer" in cfg:
        from mosaic_core.errors import ConfigError

        raise ConfigError(["must not define an optimizer: the stage passes torch.optim.Adam"], "DeepSpeed config")
    return cfg


def build_bank(recipe: Any, bb: Any, extend: dict[str, Any] | None) -> Any:
    """A fresh bank per recipe, or (incremental expansion) the bank at extend["bank_dir"] with its modules
    frozen and extend["add"] appended, initialised per recipe. Only unfrozen vectors train."""
    from mosaic_core import init
    from mosaic_core.artifact import load_bank

    if not extend:
        return init.build_bank(recipe.bank, bb.embeddings, bb.tokenizer, model=bb.model)
    bank = load_bank(Path(extend["bank_dir"]), bb.fingerprint)  # refuses a bank of another backbone
    try:
        return init.extend_bank(bank, extend["add"], recipe.bank, bb.embeddings, bb.tokenizer, model=bb.model)
    except ValueError as e:
        raise ValueError(f"{extend['bank_dir']}: {e}") from None


class BankTrainingModule(nn.Module):
    """Frozen backbone + bank as one module, so DeepSpeed (ZeRO-3 hooks included) sees every forward.

    forward(examples) -> batch_loss dict (loss, pos_ce, neg_ce, kl, decision, tokens);
    forward(examples, mode="refusal") -> (B, 2): the refusal's first `fast_tokens` tokens' mean log-prob and
    whether greedy decoding starts with them (1.0 / 0.0), as evaluation's fast score reads them (validation);
    forward(examples, mode="fidelity") -> (B,): 1.0 where greedy decoding would open with the first words of the
    row's `answer_ids` (the bare model's answer), as evaluation's fidelity reads generated answers."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        bank: Any,
        refusal_ids: list[int],
        loss_cfg: Any,
        cache: Any = None,
        fast_tokens: int = 3,
    ):
        super().__init__()
        self.backbone, self.bank, self.fast_tokens = model, bank, fast_tokens
        self.tokenizer, self.refusal_ids, self.loss_cfg, self.cache = tokenizer, refusal_ids, loss_cfg, cache

    def train(self, mode: bool = True) -> BankTrainingModule:
        super().train(mode)
        self.backbone.eval()  # frozen means frozen: no dropout either, whatever DeepSpeed toggles
        return self

    def forward(self, examples: list[dict[str, Any]], mode: str = "loss") -> Any:
        from mosaic_core.scoring import opening_kept, refusal_score
        from mosaic_core.training import batch_loss

        if mode == "fidelity":
            return opening_kept(
                self.backbone,
                self.tokenizer,
                self.bank,
                [e["prompt"] for e in examples],
                [list(e["active"]) for e in examples],
                self.bank.placement,
                [e["answer_ids"] for e in examples],
                cache=self.cache,
            ).double()
        if mode == "refusal":
            rs = refusal_score(
                self.backbone,
                self.tokenizer,
                self.bank,
                [e["prompt"] for e in examples],
                [list(e["active"]) for e in examples],
                self.bank.placement,
                self.refusal_ids,
                self.fast_tokens,
                cache=self.cache,
            )
            return torch.stack([rs.logprob, rs.greedy.to(rs.logprob.dtype)], -1)
        out = batch_loss(self.backbone, self.tokenizer, self.bank, examples, self.refusal_ids, self.loss_cfg, cache=self.cache)
        # Every trainable vector must get a gradient on every rank, even when no row of this micro-batch
        # activates its category: ZeRO reduces gradients per parameter as they become ready, and ranks that
        # reduce different sets of parameters desynchronise (gloo: "op.preamble.length <= op.nbytes").
        touch = sum(p.sum() for p in self.bank.parameters() if p.requires_grad)
        return {**out, "loss": out["loss"] + 0.0 * touch}


def _bank_state(bank: Any) -> dict[str, torch.Tensor]:
    return {c: bank.vectors[c].detach().to("cpu", torch.float32).clone() for c in bank.categories}


def _gathered_bank_state(bank: Any) -> dict[str, torch.Tensor]:
    """_bank_state under ZeRO-3, where each rank holds a shard of every vector (collective: all ranks call it)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(bank.parameters())):
        return _bank_state(bank)


def _rank_share(rows: list[dict[str, Any]], rank: int, world: int) -> tuple[list[dict[str, Any]], list[float]]:
    """This rank's rows, padded with weight-0 copies so every rank runs the same number of forwards (ZeRO-3's
    gathers are collective)."""
    per = math.ceil(len(rows) / world)
    mine = rows[rank::world]
    return mine + [rows[0]] * (per - len(mine)), [1.0] * len(mine) + [0.0] * (per - len(mine))


def _validate(engine: Any, val: list[dict[str, Any]], rank: int, world: int, device: torch.device) -> dict[str, float]:
    """Refusal on val positives / negatives: mean teacher-forced probability of starting the refusal, and the
    share whose greedy answer starts with it (evaluation's fast DSR / OR), pooled and per order; `val_gap` is
    the mean over orders of DSR - OR. `val_fidelity`: the share of general requests, every sampled module on,
    whose greedy answer would open with the bare model's first 8 words. select_key() picks the best epoch."""
    import torch.distributed as dist

    R = max([e["order"] for e in val] + [1])
    sums = torch.zeros(R + 1, 6, dtype=torch.float64)  # row 0 pooled, row r order r; pos: sum p, refused, n; neg: same
    fid = torch.zeros(2, dtype=torch.float64)  # kept, n
    scored = [e for e in val if e["label"] != "fidelity"]
    opening = [e for e in val if e["label"] == "fidelity"]
    with torch.no_grad():
        if scored:
            rows, weights = _rank_share(scored, rank, world)
            for i in range(0, len(rows), VAL_BATCH):
                chunk = rows[i : i + VAL_BATCH]
                out = engine(chunk, mode="refusal").double().cpu()  # (b, 2): mean log-prob, greedy refusal
                for e, w, (lp, hit) in zip(chunk, weights[i : i + VAL_BATCH], out.tolist(), strict=True):
                    j = 0 if e["label"] == "pos" else 3
                    add = torch.tensor([w * math.exp(lp), w * hit, w], dtype=torch.float64)
                    sums[0, j : j + 3] += add
                    sums[e["order"], j : j + 3] += add
        if opening:
            rows, weights = _rank_share(opening, rank, world)
            for i in range(0, len(rows), VAL_BATCH):
                kept = engine(rows[i : i + VAL_BATCH], mode="fidelity").double().cpu()
                w = torch.tensor(weights[i : i + VAL_BATCH], dtype=torch.float64)
                fid += torch.stack([(w * kept).sum(), w.sum()])
    both = torch.cat([sums.flatten(), fid]).to(device)  # nccl reduces device tensors only
    dist.all_reduce(both)
    s = both[: sums.numel()].cpu().view(R + 1, 6).tolist()
    f = both[sums.numel() :].cpu().tolist()
    nan = float("nan")
    rate = lambda k, n: k / n if n else nan  # noqa: E731
    out = {
        "val_refusal_pos": rate(s[0][0], s[0][2]),
        "val_refusal_neg": rate(s[0][3], s[0][5]),
        "val_dsr": rate(s[0][1], s[0][2]),
        "val_or": rate(s[0][4], s[0][5]),
        "val_fidelity": rate(f[0], f[1]),
    }
    gaps = []
    for r in range(1, R + 1):
        out[f"val_dsr_o{r}"], out[f"val_or_o{r}"] = rate(s[r][1], s[r][2]), rate(s[r][4], s[r][5])
        g = out[f"val_dsr_o{r}"] - out[f"val_or_o{r}"]
        if not math.isnan(g):
            gaps.append(g)
    out["val_gap"] = sum(gaps) / len(gaps) if gaps else nan
    return out


def select_key(val: dict[str, float]) -> tuple[float, ...] | None:
    """The fixed rule that keeps an epoch, as a sortable key (higher is better): among epochs whose val fidelity is
    at least MIN_FIDELITY, the highest mean over orders of DSR - OR; if none reaches it, the highest fidelity, and
    between equal fidelities (a few dozen rows take few values) the higher gap. An epoch without fidelity rows is
    judged on its gap alone; one without a usable gap has no key."""
    gap, fid = val.get("val_gap", math.nan), val.get("val_fidelity", math.nan)
    if math.isnan(gap):
        return None
    if math.isnan(fid) or fid >= MIN_FIDELITY:
        return (1, gap)
    return (0, fid, gap)


# ------------------------------------------------------------------------------------------ worker loop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: rebuild the recipe, load the frozen backbone, train the bank with DeepSpeed."""
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    from mosaic_core.backbone import fingerprint, load_backbone
    from mosaic_core.cache import DroppingCache, PrefixCache
    from mosaic_core.config import recipe_from_dict
    from mosaic_core.training import BankEMA, refusal_target

    recipe = recipe_from_dict(config["recipe"])
    step_hook = None
    if config.get("step_hook"):
        module, _, name = config["step_hook"].partition(":")
        step_hook = getattr(importlib.import_module(module), name)
    torch.set_num_threads(config["threads"])
    torch.manual_seed(recipe.train.seed)
    deepspeed.utils.logger.setLevel("WARNING")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = config["use_gpu"]
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    stage = config["ds_config"].get("zero_optimization", {}).get("stage", 0)

    bb = load_backbone(recipe.backbone, device=str(device))
    fp0 = bb.fingerprint
    bank = build_bank(recipe, bb, config["extend"]).to(device)
    refusal_ids = refusal_target(bb.tokenizer, recipe.loss.refusal_template)
    # The request's key/values do not depend on the bank (it comes after them): compute them once per prompt.
    # Not under ZeRO-3, whose gathers are collective (ranks with different cache misses would desynchronise).
    # train.request_dropout hides tokens in that cached request (the recipe and main checked placement and stage for it)
    dropout = recipe.train.request_dropout
    cache = None
    if bank.placement == "before_assistant" and stage != 3:
        # 6 GiB: every request of MOSAIC-bench's train and val splits (~6,000 of ~27 own tokens, ~1.2 MB each in
        # fp32 for SmolLM2-135M), so an epoch's fresh draw does not prefill its requests again.
        cache = (DroppingCache if dropout else PrefixCache).for_chat(bb.model, bb.tokenizer, max_bytes=6 << 30)
    module = BankTrainingModule(bb.model, bb.tokenizer, bank, refusal_ids, recipe.loss, cache, recipe.eval.fast_tokens)
    params = [p for p in bank.parameters() if p.requires_grad]
    if stage == 3:  # the bank is read outside its own forward: let the wrapper's hooks gather it
        for p in bank.parameters():
            deepspeed.zero.register_external_parameter(module, p)
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")  # reuses Ray Train's process group
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=params, optimizer=torch.optim.Adam(params, lr=recipe.train.lr), config=config["ds_config"]
    )

    state: dict[str, Any] = {"epoch": 0, "step": 0, "best_val_gap": None, "best_epoch": None, "resumes": []}
    best: dict[str, torch.Tensor] | None = None
    ema_state: dict[str, torch.Tensor] | None = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / "state.json").read_text())
            if state["categories"] != list(bank.categories):
                raise RuntimeError(
                    f"checkpoint holds categories {state['categories']}, this run trains {bank.categories}: "
                    "use a new run directory"
                )
            engine.load_checkpoint(str(Path(d) / "ds"), tag=CKPT_TAG, load_module_strict=False)
            best = torch.load(Path(d) / "best_bank.pt") if (Path(d) / "best_bank.pt").is_file() else None
            ema_state = torch.load(Path(d) / "ema.pt") if (Path(d) / "ema.pt").is_file() else None
        state["resumes"] = [*state.get("resumes", []), state["step"]]
    # train.ema: validation, the best bank and the artifact read the moving average; the optimizer moves the raw bank
    ema = BankEMA(bank, recipe.train.ema, ema_state) if recipe.train.ema else None

    mlf = None
    if rank == 0:
        from mlflow import MlflowClient

        mlf = MlflowClient(config["tracking_uri"])

    def log(metrics: dict[str, float], step: int) -> None:
        if mlf is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            mlf.log_batch(
                config["mlflow_run_id"],
                metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if not math.isnan(float(v))],
            )

    spe, epochs = config["steps_per_epoch"], recipe.train.epochs
    total = min(epochs * spe, config["max_steps"] or epochs * spe)
    step, t_start, steps_here = state["step"], time.perf_counter(), 0
    if state["resumes"]:
        log({"resumed_from_step": state["step"]}, state["step"])
    for epoch in range(state["epoch"], epochs):
        if step >= total:
            break
        engine.train()
        module.loss_cfg, lr = recipe.phase(epoch)  # train.phases: this epoch's loss and learning rate
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        shard = ray.train.get_dataset_shard(draw_dataset(epoch % config["draws"]))
        batches = shard.iter_batches(
            batch_size=config["micro_batch"],
            batch_format="pyarrow",
            drop_last=True,
            local_shuffle_buffer_size=config["shuffle_buffer"],
            local_shuffle_seed=recipe.train.seed * 100_003 + epoch * 101 + rank,
        )
        t0, done = time.perf_counter(), 0
        for i, table in enumerate(batches):
            if i >= spe or step >= total:
                break
            done += 1
            with cache.hiding(dropout) if dropout else contextlib.nullcontext():  # validation reads whole requests
                out = engine(table.to_pylist())
            engine.backward(out["loss"])
            engine.step()
            bank.clamp_norms_()
            if ema is not None:
                ema.update()
            step += 1
            steps_here += 1
            keys = ("loss", "pos_ce", "neg_ce", "kl", "decision")
            stats = torch.stack([out[k].detach().float().to(device) for k in (*keys, "tokens")])
            dist.all_reduce(stats)
            stats = stats.cpu()
            t1 = time.perf_counter()
            m = {
                **{k: stats[i].item() / world for i, k in enumerate(keys)},
                "lr": lr,
                "tokens_per_s": stats[-1].item() / (t1 - t0),
                "step_s": t1 - t0,
            }
            grad_norm = engine.get_global_grad_norm()  # before clipping: how often gradient_clipping binds
            if grad_norm is not None:
                m["grad_norm"] = float(grad_norm)
            log(m, step)
            if step % recipe.train.report_every == 0:  # the same steps on every rank
                ray.train.report({**m, "step": step, "epoch": epoch})
            if step_hook is not None:
                step_hook(step=step, rank=rank, world=world, run_dir=config["run_dir"])
            t0 = time.perf_counter()

        # end of epoch (or of the run): validate, keep the best bank, checkpoint from every rank
        with ema.swapped() if ema is not None else contextlib.nullcontext():
            val = _validate(engine, config["val"], rank, world, device) if config["val"] else {}
            last = _bank_state(bank) if stage != 3 else _gathered_bank_state(bank)
        key, best_key = select_key(val), state.get("best_key")
        if best is None or key is None or best_key is None or tuple(key) > tuple(best_key):
            # no usable validation -> the last bank is the best one
            best, state["best_epoch"] = last, epoch + 1
            state["best_key"] = None if key is None else list(key)
            state["best_val_gap"] = None if key is None else val["val_gap"]
        # an epoch cut short by max_steps is not complete: a later, longer run would redo it from its start
        state.update(epoch=epoch + 1 if done == spe else epoch, step=step, categories=list(bank.categories), val=val)
        wall = time.perf_counter() - t_start
        em = {
            **val,
            "epoch": epoch + 1,
            "step": step,
            "steps_per_s": steps_here / wall if wall else 0.0,
            "resumed_from_step": state["resumes"][-1] if state["resumes"] else -1,
        }
        log({k: v for k, v in em.items() if k.startswith("val_") or k == "epoch"}, step)
        with tempfile.TemporaryDirectory(prefix="mosaic-ckpt-") as d:
            engine.save_checkpoint(str(Path(d) / "ds"), tag=CKPT_TAG, exclude_frozen_parameters=True)
            if rank == 0:
                # The embedding bytes must not have moved. Not checkable under ZeRO-3 (a shard of them per rank)
                # or bf16 (DeepSpeed cast the module; fp0 is the fp32 fingerprint modules are matched against).
                if stage != 3 and not config["ds_config"].get("bf16", {}).get("enabled", False):
                    fp = fingerprint(bb.model, bb.tokenizer, fp0.model_id)
                    if fp.digest != fp0.digest:
                        raise RuntimeError("the backbone changed during training: only the bank may train")
                torch.save(last, Path(d) / "bank.pt")
                # every epoch's bank, beside the run: checkpoints keep only the best and the last (where this node
                # sees the driver's run directory; on a cluster without a shared one the checkpoints are all there is)
                epochs_dir = Path(config["run_dir"]) / "epoch_banks"
                if epochs_dir.parent.is_dir():
                    epochs_dir.mkdir(exist_ok=True)
                    torch.save(last, epochs_dir / f"epoch-{epoch + 1}.pt")
                torch.save(best, Path(d) / "best_bank.pt")
                if ema is not None:
                    torch.save(ema.state_dict(), Path(d) / "ema.pt")
                meta = {
                    "m": bank.m,
                    "d": bank.d,
                    "placement": bank.placement,
                    "max_norm": bank.max_norm,
                    "depth": bank.depth,
                    "shape": list(bank.module_shape),
                    "positions": bank.positions,
                    "fingerprint": fp0.to_dict(),
                    "trainable": [c for c in bank.categories if bank.vectors[c].requires_grad],
                    "total_steps": total,
                }
                (Path(d) / "state.json").write_text(json.dumps({**state, **meta}, indent=2))
            ray.train.report(em, checkpoint=Checkpoint.from_directory(d))


# ----------------------------------------------------------------------------------------------- driver


def _tracking(run: Path, tracking_uri: str | None) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment): env or argument, else sqlite next to the runs."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("sqlite:///"):  # artifacts next to the database, never in the working directory
            return uri, (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
        return uri, None
    root = run.parent  # runs/<name> -> runs/mlflow.db, runs/mlartifacts (docs/architecture.md, "Where things live")
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "mlartifacts").as_uri()


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("neg_mix",):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:500]
    return out


def ray_runtime_env() -> dict[str, Any]:
    """runtime_env every worker of this stage needs (tests starting their own cluster pass the same)."""
    return {"worker_process_setup_hook": LOOPBACK_HOOK, "env_vars": {"TOKENIZERS_PARALLELISM": "false"}}


def main(
    run_dir: str,
    *,
    num_workers: int | None = None,
    max_steps: int | None = None,
    tracking_uri: str | None = None,
    extend: str | None = None,
    add: tuple[str, ...] | list[str] = (),
    deepspeed_config_path: str | None = None,
    cpus_per_worker: float | None = None,
    use_gpu: bool | None = None,
    step_hook: str | None = None,
) -> dict[str, Any]:
    """Train the bank of `run_dir`; returns a summary (also printed). See the module docstring.

    `step_hook`: "module:function", imported in every worker and called after every training step (after its
    metrics are logged and, on a `report_every` step, reported) as function(step=, rank=, world=, run_dir=) --
    how tests inject faults without the loop knowing of them."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before `import ray`: loopback only
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import yaml

    from mosaic_core.config import recipe_from_dict
    from mosaic_core.errors import ConfigError

    # 1. config, paths (absolute, once), data
    run = Path(run_dir).expanduser().resolve()
    recipe = recipe_from_dict(yaml.safe_load((run / "resolved_config.yaml").read_text()), str(run / "resolved_config.yaml"))
    train_over = {k: v for k, v in {"num_workers": num_workers, "max_steps": max_steps}.items() if v is not None}
    recipe = replace(recipe, train=replace(recipe.train, **train_over))
    if Path(recipe.backbone).expanduser().is_dir():
        recipe = replace(recipe, backbone=str(Path(recipe.backbone).expanduser().resolve()))
    init_note = recipe.bank.init  # what module.json records: the recipe's own words, never a machine path
    ext = None
    categories = list(recipe.bank.categories)
    if extend or add:
        if not (extend and add):
            raise ConfigError(["--extend BANK_DIR and --add CATEGORY go together"], "mosaic train")
        old = json.loads((Path(extend).expanduser().resolve() / "manifest.json").read_text())
        clash = sorted(set(add) & set(old["categories"]))
        if clash:
            raise ConfigError([f"--add {clash}: already in the bank {old['categories']}"], "mosaic train")
        from mosaic_core.bundle import manifest_digest

        ext = {
            "bank_dir": str(Path(extend).expanduser().resolve()),
            "add": list(add),
            "extends": manifest_digest(Path(extend).expanduser().resolve()),
        }
        categories = [*old["categories"], *add]
    train_df, val = load_tables(run, recipe.train.seed, recipe.train.val_examples)
    unknown = sorted({c for a in train_df["active"] for c in a} - set(categories))
    if unknown:
        raise ConfigError([f"examples use categories {unknown} that the bank {categories} does not hold"], str(run))
    world = recipe.train.num_workers
    draws = sorted(int(d) for d in train_df["draw"].unique())
    if draws != list(range(len(draws))):
        raise ConfigError([f"examples hold draws {draws}: expected 0..n-1 (rerun the data stage)"], str(run))
    rows_per_worker = int(train_df["draw"].value_counts().min()) // world  # every draw is one epoch of the same size
    if rows_per_worker < 1:
        raise ConfigError([f"{len(train_df)} training examples cannot feed {world} workers"], str(run))
    micro = max(1, min(recipe.train.batch_size // world, rows_per_worker))
    spe = rows_per_worker // micro
    total = min(recipe.train.epochs * spe, recipe.train.max_steps or recipe.train.epochs * spe)
    base_ds = json.loads(Path(deepspeed_config_path).read_text()) if deepspeed_config_path else None
    ds_cfg = deepspeed_config(recipe, micro, base_ds)
    stage = ds_cfg.get("zero_optimization", {}).get("stage", 0)
    needs_cache = [
        k
        for k, on in (
            ("bank.depth: deep", recipe.bank.depth == "deep"),
            ("train.ema", recipe.train.ema),
            ("train.request_dropout", recipe.train.request_dropout),
        )
        if on
    ]
    if stage == 3 and needs_cache:  # the recipe checked its own zero_stage; a --deepspeed-config can still ask for 3
        raise ConfigError([f"{k}: needs ZeRO stage 1 or 2, {deepspeed_config_path} asks for 3" for k in needs_cache], str(run))

    # 2. MLflow: one run per training run (reused when this run directory is trained again / resumed)
    from mlflow import MlflowClient
    from mlflow.entities import Param

    uri, art = _tracking(run, tracking_uri)
    client = MlflowClient(uri)
    info_path = run / "run.json"
    prev = json.loads(info_path.read_text()) if info_path.is_file() else {}
    run_id = prev.get("mlflow_run_id") if prev.get("tracking_uri") == uri else None
    if run_id is None:
        exp = client.get_experiment_by_name(EXPERIMENT)
        exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT, artifact_location=art)
        tags = {"mosaic.stage": "train", "mosaic.run_dir": str(run)}
        run_id = client.create_run(exp_id, run_name=run.name, tags=tags).info.run_id
        params = {
            **_flat(recipe.to_dict()),
            "world_size": world,
            "micro_batch": micro,
            "steps_per_epoch": spe,
            "total_steps": total,
            "n_train": len(train_df),
            "n_val": len(val),
            "extends": (ext or {}).get("extends"),
        }
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])
    info_path.write_text(json.dumps({"mlflow_run_id": run_id, "tracking_uri": uri, "experiment": EXPERIMENT}, indent=2) + "\n")

    # 3. Ray: the cluster of RAY_ADDRESS (ray job submit) or a local one; loopback patch in every worker
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = False
    if not ray.is_initialized():
        kw = {} if os.environ.get("RAY_ADDRESS") else {"address": "local", "include_dashboard": False}
        ray.init(runtime_env=ray_runtime_env(), log_to_driver=True, **kw)
        started = True
    try:
        gpu = use_gpu if use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= world
        cpus = cpus_per_worker or 1.0
        import pyarrow as pa

        # Arrow, not pandas blocks: Ray would turn the list columns of a pandas block into tensor extensions.
        datasets = {}
        for d in draws:
            table = pa.Table.from_pandas(train_df[train_df["draw"] == d], preserve_index=False)
            datasets[draw_dataset(d)] = ray.data.from_arrow([table.slice(i, 256) for i in range(0, table.num_rows, 256)])
        config = {
            "recipe": recipe.to_dict(),
            "ds_config": ds_cfg,
            "micro_batch": micro,
            "steps_per_epoch": spe,
            "max_steps": recipe.train.max_steps,
            "val": val,
            "extend": ext,
            "use_gpu": gpu,
            "draws": len(draws),
            "threads": max(1, int(cpus)),
            "shuffle_buffer": max(micro, min(rows_per_worker, 10_000)),
            "tracking_uri": uri,
            "mlflow_run_id": run_id,
            "step_hook": step_hook,
            "run_dir": str(run),
        }
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=config,
            datasets=datasets,
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=world, use_gpu=gpu, resources_per_worker={"CPU": cpus, **({"GPU": 1} if gpu else {})}
            ),
            run_config=RunConfig(
                name=f"train-{run.name}",
                storage_path=str(run / "ray_results"),
                failure_config=FailureConfig(max_failures=2),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        print(
            f"[train] {run.name}: {len(train_df)} examples ({len(draws)} draw(s): epoch e reads draw e mod {len(draws)}), "
            f"{len(val)} val, {world} workers x micro-batch {micro}, "
            f"{spe} steps/epoch, {total} steps, ZeRO-{stage}, {'GPU' if gpu else 'CPU'}"
        )
        t0 = time.perf_counter()
        try:
            result = trainer.fit()
        except Exception:
            client.set_terminated(run_id, "FAILED")
            raise
        wall = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()

    # 4. the bank artifact, from the best (by val gap) bank of the latest checkpoint
    from mosaic_core.artifact import save_bank
    from mosaic_core.backbone import Fingerprint
    from mosaic_core.bank import new_bank
    from pipelines._provenance import bank_provenance

    if result.checkpoint is None:
        raise RuntimeError("training reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / "state.json").read_text())
        vectors = torch.load(Path(d) / "best_bank.pt")
    bank = new_bank(
        d=state["d"],
        m=state["m"],
        placement=state["placement"],
        max_norm=state["max_norm"],
        depth=state.get("depth", "input"),
        shape=state.get("shape", ()),
        positions=state.get("positions", "shift"),
    )
    for c in state["categories"]:
        bank.add(c, vectors[c])
    tmp = run / ".bank.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_bank(
        bank,
        tmp,
        fingerprint=Fingerprint.from_dict(state["fingerprint"]),
        init=init_note,
        training_run_id=run_id,
        extends=(ext or {}).get("extends"),
    )
    if ext:  # the frozen modules keep their files (and module.json: their own training run) byte for byte
        for c in state["categories"]:
            src = Path(ext["bank_dir"]) / c
            if c in ext["add"]:
                continue
            if (src / "tokens.safetensors").read_bytes() != (tmp / c / "tokens.safetensors").read_bytes():
                raise RuntimeError(f"frozen module {c!r} changed during incremental training")
            shutil.copy2(src / "module.json", tmp / c / "module.json")
    (tmp / "provenance.json").write_text(json.dumps(bank_provenance(run, state), indent=2) + "\n")
    shutil.rmtree(run / "bank", ignore_errors=True)
    tmp.rename(run / "bank")
    client.log_artifacts(run_id, str(run / "bank"), artifact_path="bank")
    curve = plot_training(client, run_id, run / "training.png")
    client.log_artifact(run_id, str(curve))
    client.set_terminated(run_id, "FINISHED")

    K = len(state["trainable"])
    summary = {
        "run_dir": str(run),
        "bank_dir": str(run / "bank"),
        "mlflow_run_id": run_id,
        "tracking_uri": uri,
        "categories": state["categories"],
        "trainable_categories": state["trainable"],
        "trainable_parameters": K * bank.vectors[state["categories"][0]].numel(),
        "steps": state["step"],
        "epochs": state["epoch"],
        "resumes": state["resumes"],
        "best_epoch": state["best_epoch"],
        "val": state["val"],
        "best_val_gap": state["best_val_gap"],
        "fit_wall_s": wall,
        "checkpoint": result.checkpoint.path,
        "steps_per_s": (result.metrics or {}).get("steps_per_s"),
    }
    if bank.depth == "deep":
        shape = "·".join(map(str, bank.module_shape))
        print(f"trainable parameters: K·layers·2·kv_heads·m·head_dim = {K}·{shape} = {summary['trainable_parameters']}")
    else:
        print(f"trainable parameters: K·m·d = {K}·{state['m']}·{state['d']} = {summary['trainable_parameters']}")
    v = state["val"] or {}
    sps = summary["steps_per_s"]
    print(
        f"[train] {state['step']} steps in {wall:.1f} s ({sps or 0:.2f} steps/s in the last attempt, validation and "
        f"checkpoints included); val refusal pos {v.get('val_refusal_pos', float('nan')):.3f} "
        f"neg {v.get('val_refusal_neg', float('nan')):.3f}, DSR {v.get('val_dsr', float('nan')):.2f} "
        f"OR {v.get('val_or', float('nan')):.2f} (last epoch); "
        f"bank from epoch {state['best_epoch']} -> {run / 'bank'}"
    )
    return summary


def plot_training(client: Any, run_id: str, out: Path) -> Path:
    """Loss terms per step (smoothed) and validation per epoch, from the run's MLflow metrics -> `out` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def history(key: str) -> tuple[list[int], list[float]]:
        ms = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        return [m.step for m in ms], [m.value for m in ms]

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("pos_ce", "neg_ce", "kl", "decision"):
        steps, vals = history(key)
        if vals and any(vals):
            w = max(1, min(25, len(vals) // 10))  # moving average: single steps of 4-8 rows are noisy
            a1.plot(steps[w - 1 :], np.convolve(vals, np.ones(w) / w, mode="valid"), label=f"{key} ({w}-step mean)")
    a1.set_xlabel("step"), a1.set_title("training loss terms"), a1.legend()
    epochs = history("epoch")[0]  # logged at the step where each epoch's validation ran
    for key, label in (
        ("val_dsr", "DSR (greedy refuses, positives)"),
        ("val_or", "OR (greedy refuses, negatives)"),
        ("val_refusal_pos", "mean p, positives"),
        ("val_refusal_neg", "mean p, negatives"),
    ):
        steps, vals = history(key)
        if vals:
            a2.plot(range(1, len(vals) + 1), vals, marker="o", ls="-" if key in ("val_dsr", "val_or") else ":", label=label)
    a2.set_xlabel(f"epoch ({len(epochs)} validated)"), a2.set_ylim(0, 1), a2.legend(fontsize=8)
    a2.set_title("validation: p = refusal's first tokens (teacher-forced)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="mosaic train", description="train the control-token bank of a run (Ray Train + DeepSpeed)")
    p.add_argument("--run", required=True, help="run directory (holds resolved_config.yaml and data/)")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: recipe train.num_workers)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (smoke runs)")
    p.add_argument("--extend", default=None, metavar="BANK_DIR", help="incremental expansion: start from this bank, frozen")
    p.add_argument("--add", action="append", default=[], metavar="CATEGORY", help="category to add (repeatable)")
    p.add_argument("--deepspeed-config", default=None, help="DeepSpeed JSON (e.g. cluster/deepspeed/zero3.json); 'auto' = recipe")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="logical CPUs per worker (default 1)")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else mlflow.db beside the run directory)",
    )
    a = p.parse_args(argv)
    return main(
        a.run,
        num_workers=a.workers,
        max_steps=a.max_steps,
        tracking_uri=a.tracking_uri,
        extend=a.extend,
        add=[c for s in a.add for c in s.split(",") if c],
        deepspeed_config_path=a.deepspeed_config,
        cpus_per_worker=a.cpus_per_worker,
    )


if __name__ == "__main__":
    cli(sys.argv[1:])
