"""The main job: data -> train -> evaluate -> register, then the results table.

    mosaic run --config pipelines/configs/smollm2-135m/cpu.yaml [--name NAME] [--set seed=1] [--xstest CSV]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- mosaic run --config ...

Each stage runs as its own process (`mosaic <stage> ...`), exactly as a user or a `ray job submit`
would run it alone: stages share nothing but the run directory, and inside a Ray job every stage connects to
the job's cluster through RAY_ADDRESS. `--bank DIR`: data and training run as usual, then the eval and
register stages take an existing bank (e.g. the one the full CPU recipe trained) instead, with this recipe's
evaluation settings, in its own run directory `runs/<bank>-<digest>` (`bank_run_dir`); the results table says so."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mosaic_core.bundle import manifest_digest
from mosaic_core.config import load_recipe, parse_overrides
from mosaic_core.errors import MosaicError
from mosaic_core.metrics import Rate


class StageFailed(MosaicError):
    """A stage exited non-zero; its own output above says why."""


def stage(name: str, args: list[str], timings: dict[str, float]) -> None:
    print(f"\n=== [{len(timings) + 1}] {name}: {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    # via the CLI dispatcher, so a user error prints its one-line message instead of a traceback
    rc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args]).returncode
    timings[name] = time.perf_counter() - t0
    if rc != 0:
        raise StageFailed(
            f"stage {name!r} failed (exit {rc}) after {timings[name]:.0f}s; fix the error above and rerun "
            "(finished stages are reused)"
        )
    print(f"=== {name} done in {timings[name]:.0f}s", flush=True)


def bank_run_dir(bank: Path, runs: Path, recipe_file: Path) -> Path:
    """The run directory in which a bank made elsewhere is evaluated and registered: `runs/<bank name>-<first 8 hex
    of its manifest digest>`, holding a copy of the bank and the evaluating recipe (`recipe_file`).

    Named by digest so that a changed bank (after `make train`) gets a directory and MLflow run of its own, and
    the same bank again reuses its own: registering never mixes two banks' files under one run."""
    bank = bank.resolve()
    run = runs / f"{bank.name}-{manifest_digest(bank)[:8]}"
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "bank" / "manifest.json").is_file():
        tmp = run / "bank.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(bank, tmp, ignore=shutil.ignore_patterns("registered.json"))
        tmp.rename(run / "bank")
    shutil.copyfile(recipe_file, run / recipe_file.name)
    return run


def results(run_dir: Path, timings: dict[str, float], bank_note: str | None) -> str:
    rep = json.loads((run_dir / "eval" / "report.json").read_text())
    lines = ["", "=" * 100, f"MOSAIC run {run_dir.name}" + (f"  —  {bank_note}" if bank_note else ""), "=" * 100]
    lines.append(f"{'method':<11} {'order':>5}  {'DSR % [95% CI]':>18}  {'OR % [95% CI]':>18}  {'look-alike OR %':>18}")
    for cond, per in rep["per_order"]["fast"].items():
        for r, row in per.items():
            fmt = [Rate(int(row[g]["k"]), int(row[g]["n"])).fmt() for g in ("dsr", "or", "lookalike")]
            lines.append(f"{cond:<11} {r:>5}  {fmt[0]:>18}  {fmt[1]:>18}  {fmt[2]:>18}")
    if rep.get("mmlu"):
        lines.append("MMLU: " + ", ".join(f"{k} {v:.3f}" for k, v in rep["mmlu"].items()))
    xs = {k: v for k, v in rep.get("xstest", {}).items() if k.endswith(":fast")}
    if xs:
        lines.append("XSTest safe prompts refused: " + ", ".join(f"{k[:-5]} {100 * v['rate']:.1f}%" for k, v in xs.items()))
    lines.append(f"plots + report: {run_dir / 'eval'}  (report.md, dsr_or_per_order.png, category_subset_heatmap.png)")
    info = run_dir / "run.json"
    if info.is_file():
        meta = json.loads(info.read_text())
        lines.append(f"MLflow run {meta.get('mlflow_run_id')} at {meta.get('tracking_uri')}")
    reg = run_dir / "bank" / "registered.json"
    if reg.is_file():
        lines.append("registered: " + ", ".join(f"{v['name']} v{v['version']}" for v in json.loads(reg.read_text()).values()))
    lines.append("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return "\n".join(lines)


def main(
    config: str,
    *,
    name: str | None,
    out: str | None,
    overrides: list[str],
    xstest: str | None,
    bank: str | None,
    workers: int | None,
    register: bool = True,
) -> Path:
    recipe = load_recipe(config, parse_overrides(overrides))
    run_dir = Path(out or Path("runs") / (name or recipe.name)).resolve()
    sets = [a for o in overrides for a in ("--set", o)]
    timings: dict[str, float] = {}
    stage("data", ["data", "--config", config, "--out", str(run_dir), *sets], timings)
    stage("train", ["train", "--run", str(run_dir), *(["--workers", str(workers)] if workers else [])], timings)
    note = None
    if bank:
        trained = run_dir
        run_dir = bank_run_dir(Path(bank), trained.parent, trained / "resolved_config.yaml")
        note = f"the bank from {bank}, evaluated and registered in {run_dir} ({trained.name}'s own bank: {trained / 'bank'})"
        print(f"\n*** {note}", flush=True)
    stage("eval", ["eval", "--run", str(run_dir), *(["--xstest", xstest] if xstest else [])], timings)
    if register:
        stage("register", ["modules", "register", "--run", str(run_dir)], timings)
    (run_dir / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(results(run_dir, timings, note))
    return run_dir


def cli(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="mosaic run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--name")
    ap.add_argument("--out")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override, e.g. seed=1 or bank.m=2")
    ap.add_argument("--xstest", help="XSTest's xstest_prompts.csv (evaluation only; not shipped here: docs/training.md)")
    ap.add_argument("--bank", help="evaluate + register this bank instead of the one trained here")
    ap.add_argument("--workers", type=int)
    ap.add_argument("--no-register", action="store_true")
    a = ap.parse_args(argv)
    main(
        a.config,
        name=a.name,
        out=a.out,
        overrides=a.overrides,
        xstest=a.xstest,
        bank=a.bank,
        workers=a.workers,
        register=not a.no_register,
    )


if __name__ == "__main__":
    cli()
