"""What each Ray Train worker of the train stage (pipelines/train.py) runs: `train_loop_per_worker`, the bank
wrapped for DeepSpeed (`BankTrainingModule`), validation, the rule that keeps an epoch (`select_key`), and the
checkpoints a restarted worker group resumes from.

Each worker: frozen backbone + bank in one nn.Module; DeepSpeed gets only the trainable bank vectors and a
client torch.optim.Adam (the config "optimizer" would JIT-build FusedAdam for ~70 s on CPU, docs/architecture.md);
norms are clamped after every step. Every epoch (and at the end) all ranks validate their share of the val
split (teacher-forced refusal probability, positives vs negatives) and save a checkpoint: DeepSpeed's own
files (each rank writes its ZeRO optimizer partition; Ray merges them into one directory) plus, from rank 0,
the bank, the best bank so far and `state.json`. A restarted worker group resumes from the latest one.
Rank 0 alone logs every step to MLflow; every rank calls `ray.train.report` on the same steps (every
`report_every` steps (mosaic train --report-every) and at each epoch's checkpoint: a report is a collective, and Ray Train takes one per poll).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines._train_tables import draw_dataset

VAL_BATCH = 16
MIN_FIDELITY = 0.7  # select_key: the share of general answers (all modules on) that must keep their opening
CKPT_TAG = "ckpt"  # one DeepSpeed tag per checkpoint directory: Ray keeps one directory per report


def build_bank(recipe: Any, bb: Any, extend: dict[str, Any] | None) -> Any:
    """A fresh bank per recipe, or (incremental expansion) the bank at extend["bank_dir"] with its modules
    frozen and extend["add"] appended, initialised per recipe. Only unfrozen vectors train."""
    from mosaic_core import init
    from mosaic_core.artifact import load_bank

    if not extend:
        return init.build_bank(recipe.bank, bb.embeddings, bb.tokenizer, model=bb.model, seed=recipe.seed)
    bank = load_bank(Path(extend["bank_dir"]), bb.fingerprint)  # refuses a bank of another backbone
    try:
        return init.extend_bank(bank, extend["add"], recipe.bank, bb.embeddings, bb.tokenizer, model=bb.model, seed=recipe.seed)
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
    torch.manual_seed(recipe.seed)
    deepspeed.utils.logger.setLevel("WARNING")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = config["use_gpu"]
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    stage = config["ds_config"].get("zero_optimization", {}).get("stage", 0)

    bb = load_backbone(recipe.backbone, device=str(device))
    fp0 = bb.fingerprint
    bank = build_bank(recipe, bb, config["extend"]).to(device)
    if config.get("gates"):
        from pipelines._gates import set_run_gates

        set_run_gates(bank, Path(config["gates"]), recipe.gate.layers, recipe.gate.recency)
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
    module = BankTrainingModule(bb.model, bb.tokenizer, bank, refusal_ids, recipe.loss, cache)
    params = [p for p in bank.parameters() if p.requires_grad]
    if stage == 3:  # the bank is read outside its own forward: let the wrapper's hooks gather it
        for p in bank.parameters():
            deepspeed.zero.register_external_parameter(module, p)
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")  # reuses Ray Train's process group
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=params,
        optimizer=torch.optim.Adam(params, lr=recipe.train.phases[0].lr),
        config=config["ds_config"],
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
            local_shuffle_seed=recipe.seed * 100_003 + epoch * 101 + rank,
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
            if step % config["report_every"] == 0:  # the same steps on every rank
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
