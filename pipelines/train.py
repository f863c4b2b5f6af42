"""Stage `train`: Ray Train TorchTrainer + DeepSpeed ZeRO trains the control-token bank of a run; the backbone
stays frozen.

    mosaic train --run runs/<name> [--workers N] [--max-steps N] [--extend BANK_DIR --add CATEGORY ...]
    python -m pipelines.train --run runs/<name> ...          # the `ray job submit` entry point

Reads `<run>/resolved_config.yaml`, `<run>/data/examples/*.parquet` and `<run>/data/teacher/*.parquet`
(negatives joined to the teacher on prompt_id at the driver; one Ray dataset per sampler draw, epoch e reading
draw e mod draws); writes `<run>/run.json` (the MLflow run),
`<run>/ray_results/` (Ray Train checkpoints), `<run>/bank/` (the best bank by validation DSR - OR) and
`<run>/training.png` (loss terms per step, validation per epoch; also an MLflow artifact).

The stage's driver is this file; the run's tables are read by pipelines/_train_tables.py, and each Ray Train worker
runs pipelines/_train_worker.py (the loop, validation, the selection rule, checkpoints and resume).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pipelines._train_tables import draw_dataset, load_tables
from pipelines._train_worker import train_loop_per_worker

EXPERIMENT = "mosaic"
LOOPBACK_HOOK = "pipelines._loopback.install"  # torch TCPStore (+ Serve replica gRPC) on 127.0.0.1: docs/architecture.md


# ----------------------------------------------------------------------------------------------- driver


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
    report_every: int = 20,
    tracking_uri: str | None = None,
    extend: str | None = None,
    add: tuple[str, ...] | list[str] = (),
    deepspeed_config_path: str | None = None,
    cpus_per_worker: float | None = None,
    use_gpu: bool | None = None,
    step_hook: str | None = None,
) -> dict[str, Any]:
    """Train the bank of `run_dir`; returns a summary (also printed). See the module docstring.

    `max_steps`: stop after this many optimizer steps (smoke runs; None: every epoch). `report_every`: steps between
    per-step `ray.train.report` calls (every epoch's checkpoint is reported regardless): Ray Train takes one report
    per worker per health-check poll (2 s) and `report` waits for the previous one to be taken, so reporting every
    step caps fast steps (GPU) near one per 2 s; MLflow still gets every step from rank 0.

    `step_hook`: "module:function", imported in every worker and called after every training step (after its
    metrics are logged and, on a `report_every` step, reported) as function(step=, rank=, world=, run_dir=) --
    how tests inject faults without the loop knowing of them."""
    import yaml

    from mosaic_core.config import recipe_from_dict, validate
    from mosaic_core.errors import ConfigError

    # 1. config, paths (absolute, once), data
    run = Path(run_dir).expanduser().resolve()
    recipe = recipe_from_dict(yaml.safe_load((run / "resolved_config.yaml").read_text()), str(run / "resolved_config.yaml"))
    if num_workers is not None:
        recipe = replace(recipe, train=replace(recipe.train, num_workers=num_workers))
    if (max_steps is not None and max_steps < 1) or report_every < 1:
        raise ConfigError([f"--max-steps {max_steps} and --report-every {report_every} must be >= 1"], "mosaic train")
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
    train_df, val = load_tables(run, recipe.seed, recipe.train.val_examples)
    unknown = sorted({c for a in train_df["active"] for c in a} - set(categories))
    if unknown:
        raise ConfigError([f"examples use categories {unknown} that the bank {categories} does not hold"], str(run))
    world = recipe.train.num_workers
    gates = None  # gate.layers: fitted before the tokens train, so validation scores the modules as they will serve
    if recipe.gate.layers:
        from pipelines._gates import fit_run_gates

        gates = fit_run_gates(run, recipe, train_df, list(ext["add"]) if ext else categories)
        # A gated module is inserted only where its gate fires, mostly alone on a request of its own category: its
        # tokens learn to refuse there. Negatives fitted the gates; they keep their answers by not being gated in.
        pos = train_df[train_df["label"] == "pos"]
        train_df = pos.assign(active=[[c] for c in pos["category"]], order=1).reset_index(drop=True)
        print(f"[train] gated modules: the tokens train on the {len(train_df)} positive rows, each with its own module")
    draws = sorted(int(d) for d in train_df["draw"].unique())
    if draws != list(range(len(draws))):
        raise ConfigError([f"examples hold draws {draws}: expected 0..n-1 (rerun the data stage)"], str(run))
    rows_per_worker = int(train_df["draw"].value_counts().min()) // world  # every draw is one epoch of the same size
    if rows_per_worker < 1:
        raise ConfigError([f"{len(train_df)} training examples cannot feed {world} workers"], str(run))
    micro = max(1, min(recipe.train.batch_size // world, rows_per_worker))
    spe = rows_per_worker // micro
    total = min(recipe.train.epochs * spe, max_steps or recipe.train.epochs * spe)
    base_ds = json.loads(Path(deepspeed_config_path).read_text()) if deepspeed_config_path else None
    ds_cfg = deepspeed_config(recipe, micro, base_ds)
    stage = ds_cfg.get("zero_optimization", {}).get("stage", 0)
    problems = validate(recipe, ds_cfg)  # the recipe checked its own zero_stage; a --deepspeed-config can still ask for 3
    if problems:
        raise ConfigError(problems, str(deepspeed_config_path or run))

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
            "max_steps": max_steps,
            "report_every": report_every,
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
            "gates": str(gates) if gates else None,
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
    if gates:
        from pipelines._gates import set_run_gates

        set_run_gates(bank, gates, recipe.gate.layers, recipe.gate.recency)
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
    p.add_argument("--report-every", type=int, default=20, help="steps between per-step Ray Train reports (default 20)")
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
        report_every=a.report_every,
        tracking_uri=a.tracking_uri,
        extend=a.extend,
        add=[c for s in a.add for c in s.split(",") if c],
        deepspeed_config_path=a.deepspeed_config,
        cpus_per_worker=a.cpus_per_worker,
    )


if __name__ == "__main__":
    cli(sys.argv[1:])
