"""How much does calling `ray.train.report` every step cost when steps are fast? `mosaic train --report-every`, side by side.

    .venv/bin/python benchmarks/report_cadence.py [--steps 40] [--every 1 20]

Ray Train V2 hands a worker's reports to the controller through a queue of one, emptied by the controller's
health-check poll (every 2 s by default), and `report` blocks until the previous one was taken: a report every step
caps training near one step per poll interval whenever a step is faster than that (a GPU, or the tiny model here).
This runs the real `mosaic train` (`pipelines.train.main`: 2 workers, DeepSpeed ZeRO-2, CPU) on the test suite's
tiny random Llama and tiny run directory (2 steps per epoch), once per `--every` value, `--steps` steps each, and
prints the median wall time of an epoch (MLflow timestamps of consecutive epochs' validation metrics: 2 steps,
validation and a checkpoint; with `--every 1`, 3 reports where the queue takes one per poll) and the fit's wall
time. Only the report cadence differs between rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test suite's tiny model and run-directory builders

from tests.pipelines.test_train import make_run  # noqa: E402
from tests.tiny import save_tiny  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, nargs="+", default=[1, 20])
    a = ap.parse_args(argv)
    from mlflow import MlflowClient

    from pipelines.train import main as train

    rows = []
    with tempfile.TemporaryDirectory(prefix="mosaic-cadence-") as tmp:
        model_dir = save_tiny(Path(tmp) / "tiny-llama")
        for every in a.every:
            # 8 examples, global batch 4: 2 steps per epoch; enough epochs for --steps
            run = make_run(Path(tmp) / f"e{every}", model_dir, name=f"every-{every}", epochs=(a.steps + 1) // 2)
            s = train(str(run), num_workers=2, report_every=every)
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
