"""How much does calling `ray.train.report` every step cost when steps are fast? `mosaic train --report-every`, side by side.

    .venv/bin/python benchmarks/report_cadence.py [--steps 40] [--every 1 20]

Ray Train V2 hands a worker's reports to the controller through a queue of one, emptied by the controller's
health-check poll (every 2 s by default), and `report` blocks until the previous one was taken: a report every step
caps training near one step per poll interval whenever a step is faster than that (a GPU, or the tiny model here).
This runs the real data and training stages (`pipelines.data.main`, then `pipelines.train.main`: 2 workers,
DeepSpeed ZeRO-2, CPU) on a tiny random Llama (`mosaic_core.testing`; the dataset's requests, 2 per category, 2
steps per epoch), once per `--every` value, `--steps` steps each, and prints the median wall time of an epoch (MLflow
timestamps of consecutive epochs' validation metrics: 2 steps, validation and a checkpoint; with `--every 1`, 3
reports where the queue takes one per poll) and the fit's wall time. Only the report cadence differs between rows.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import yaml

import pipelines  # noqa: F401  (the environment, before Ray is imported)
from mosaic_core.testing import save_tiny

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(model_dir: Path, epochs: int) -> dict:
    """10 positives and 10 negatives a draw, global batch 10: 2 steps per epoch."""
    return {
        "name": "report-cadence",
        "backbone": str(model_dir),
        "dataset": str(ROOT / "data" / "mosaic-bench"),
        "bank": {"categories": ["addiction", "alcohol", "betting", "horror", "sex"], "m": 2, "init": "vocab", "depth": "input"},
        "sampler": {"per_subset": 2, "max_order": 1},
        "loss": {"topk": 4},
        "teacher": {"max_new_tokens": 6},
        "train": {
            "phases": [{"epochs": epochs, "lr": 0.05}],
            "batch_size": 10,
            "num_workers": 2,
            "zero_stage": 2,
            "val_examples": 8,
        },
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, nargs="+", default=[1, 20])
    a = ap.parse_args(argv)
    from mlflow import MlflowClient

    from pipelines.data import main as data
    from pipelines.train import main as train

    rows = []
    with tempfile.TemporaryDirectory(prefix="mosaic-cadence-") as tmp:
        config = Path(tmp) / "recipe.yaml"
        config.write_text(yaml.safe_dump(tiny_recipe(save_tiny(Path(tmp) / "tiny-llama"), (a.steps + 1) // 2)))
        data_run = data(str(config), out=str(Path(tmp) / "data-run"))
        for every in a.every:
            run = shutil.copytree(data_run, Path(tmp) / f"every-{every}")  # the same tables, a fresh training
            s = train(str(run), num_workers=2, report_every=every, max_steps=a.steps)
            hist = MlflowClient(s["tracking_uri"]).get_metric_history(s["mlflow_run_id"], "epoch")
            at = sorted(m.timestamp / 1000 for m in hist)  # one per epoch, logged after its validation
            rows.append((every, s["steps"], statistics.median(b - a for a, b in zip(at, at[1:])), s["fit_wall_s"]))
    print("| report_every | steps | median s per epoch (2 steps + validation + checkpoint) | fit wall s |")
    print("|---|---|---|---|")
    for every, steps, med, wall in rows:
        print(f"| {every} | {steps} | {med:.3f} | {wall:.1f} |")
    base = rows[0]
    for every, _, med, wall in rows[1:]:
        print(f"report_every {every} vs {base[0]}: epoch {base[2] / med:.2f}x faster, whole fit {base[3] / wall:.2f}x faster")


if __name__ == "__main__":
    main()
