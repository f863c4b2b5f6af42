"""Stage `modules`: the MLflow registry of module versions; `register` makes every category module of a trained bank
a version of an MLflow registered model.

    mosaic modules register --run runs/<name>     # one new version per module in runs/<name>/bank/
    mosaic modules list                           # every mosaic.* model: versions, aliases, headline tags
    mosaic modules promote alcohol 2 --alias production [--backbone smollm2-135m-instruct]
    mosaic modules show alcohol --alias production   (or: show models:/mosaic.<backbone>.alcohol/2)

Registered model name: `mosaic.<backbone>.<category>`. A version's files are exactly the module artifact
(`tokens.safetensors` + `module.json`), logged under `modules/<category>` of the training run's MLflow run, and
registered with `MlflowClient.create_model_version` (docs/architecture.md, platform notes: `mlflow.register_model` fails on a plain
artifact dir). Versions carry their provenance and metrics as tags; aliases (never stages) mark what serves.
`resolve_bundle` (the read side, in pipelines/_registry.py, re-exported here): `models:/…@alias` URIs -> a checked
ControlTokenBank.

Tracking URI: `--tracking-uri`, else `MLFLOW_TRACKING_URI`, else the sqlite store `runs/mlflow.db` with
artifacts in `runs/mlartifacts/` (both made absolute, so workers and replicas can be handed the same URI).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mosaic_core.artifact import MANIFEST_FILE, META_FILE, TENSOR_FILE, load_module
from mosaic_core.backbone import EMBEDDED, Fingerprint
from mosaic_core.bundle import NAME_PREFIX, manifest_digest, parse_module_uri, registered_name
from mosaic_core.errors import ArtifactError
from pipelines._module_listing import describe_version, list_rows, print_table

# The read side (look-ups, downloads, resolve_bundle) lives in pipelines/_registry.py, shared with the Serve app;
# it is re-exported here so `from pipelines.modules import resolve_bundle` keeps working.
from pipelines._registry import (  # noqa: F401
    DEFAULT_STORE,
    connect,
    download_version,
    get_version,
    module_names,
    resolve_bundle,
    resolve_tracking_uri,
)
from pipelines._registry import not_found as _not_found
from pipelines._registry import require_model as _require_model
from pipelines._registry import sqlite_path as _sqlite_path

EXPERIMENT = "mosaic"
ARTIFACTS_DIR = "mlartifacts"
"""Artifacts of a sqlite store live next to it: runs/mlflow.db -> runs/mlartifacts/."""
MODULES_PATH = "modules"
"""Artifact path (inside the source MLflow run) under which each module's files are logged."""
RUN_FILE = "run.json"
REGISTERED_FILE = "registered.json"
RECIPE_FILE = "resolved_config.yaml"
EVAL_REPORT = "eval/report.json"
"""Eval metrics shown by `list` (tags `eval.dsr`, `eval.or`)."""


@dataclass(frozen=True, kw_only=True)
class RegisterConfig:
    """What `register` needs: the run directory and, optionally, where the registry is."""

    run_dir: Path
    """A run directory holding `bank/manifest.json` (as written by the training stage or `mosaic bank init`)."""
    tracking_uri: str | None = None
    """MLflow tracking/registry URI; None: `MLFLOW_TRACKING_URI`, else the store recorded in the run's
    `run.json`, else the sqlite store `runs/mlflow.db`."""


# --------------------------------------------------------------------------------------------- tracking store


def artifact_location(tracking_uri: str) -> str | None:
    """Where the `mosaic` experiment keeps artifacts: next to a sqlite store; the server's/store's default otherwise."""
    db = _sqlite_path(tracking_uri)
    return (db.parent / ARTIFACTS_DIR).resolve().as_uri() if db is not None else None


def _experiment_id(client: MlflowClient, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return client.create_experiment(EXPERIMENT, artifact_location=artifact_location(tracking_uri))
    if exp.lifecycle_stage == "deleted":
        raise ArtifactError(
            f"MLflow experiment {EXPERIMENT!r} is deleted in {tracking_uri}; restore it "
            f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or use another store"
        )
    return exp.experiment_id


# --------------------------------------------------------------------------------------------- register


def _read_bank(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The run's bank dir and manifest; a user-facing error when the run has none."""
    bank_dir = run_dir / "bank"
    if not (bank_dir / MANIFEST_FILE).is_file():
        what = "does not exist" if not run_dir.is_dir() else f"has no bank/{MANIFEST_FILE}"
        raise ArtifactError(
            f"run directory {run_dir} {what}: train first (or `mosaic bank init --out "
            f"{run_dir}/bank`) and point --run at the run directory, e.g. runs/<name>"
        )
    try:
        manifest = json.loads((bank_dir / MANIFEST_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{bank_dir / MANIFEST_FILE} is not valid JSON: {e}") from e
    if not manifest.get("categories"):
        raise ArtifactError(f"{bank_dir / MANIFEST_FILE} lists no categories")
    return bank_dir, manifest


def _run_info(run_dir: Path) -> dict[str, Any]:
    """`run_dir/run.json` ({"mlflow_run_id", "tracking_uri", ...} from the training stage), {} when absent."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}): fix or delete it") from e
    if not isinstance(info, dict):
        raise ArtifactError(f'{path} should hold a JSON object like {{"mlflow_run_id": ...}}')
    return info


def _recipe_hash(run_dir: Path) -> str:
    """The bank's own provenance's recipe hash (a bank evaluated in another run keeps its own), else the run's recipe."""
    prov = run_dir / "bank" / "provenance.json"
    sha = json.loads(prov.read_text()).get("recipe_sha256") if prov.is_file() else None
    cfg = run_dir / RECIPE_FILE
    return sha or (hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.is_file() else "none")


def _eval_tags(run_dir: Path, category: str) -> dict[str, str]:
    """`eval.<metric>` tags from `eval/report.json["per_module"][category]`; {} when there is no such entry.

    Read defensively: the evaluation stage owns that file's schema, so only scalar numbers are taken."""
    path = run_dir / EVAL_REPORT
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        print(f"warning: {path} is not valid JSON ({e}); registering without eval metrics", file=sys.stderr)
        return {}
    per_module = report.get("per_module") if isinstance(report, dict) else None
    entry = per_module.get(category) if isinstance(per_module, dict) else None
    if not isinstance(entry, dict):
        return {}
    return {f"eval.{k}": format(v, ".4g") for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _source_run(client: MlflowClient, run_dir: Path, bank_dir: Path, tracking_uri: str) -> tuple[str, bool]:
    """The MLflow run the module files are logged to, and whether this call created it.

    The training stage writes `run.json` with its run id, so versions link to the run holding the loss curves
    and eval metrics. Without one (a bank made elsewhere) a run named after the run dir is created once and
    recorded in run.json, so registering again reuses it."""
    run_file = run_dir / RUN_FILE
    info = _run_info(run_dir)
    run_id = info.get("mlflow_run_id")
    if run_id:
        try:
            client.get_run(run_id)
        except MlflowException as e:
            raise ArtifactError(
                f"{run_file} names MLflow run {run_id} (tracking URI {info.get('tracking_uri', 'not recorded')}), "
                f"which {tracking_uri} does not have: pass --tracking-uri with the store the run was logged to"
            ) from e
        return run_id, False
    run = client.create_run(_experiment_id(client, tracking_uri), run_name=run_dir.name, tags={"mosaic.stage": "register"})
    run_id = run.info.run_id
    client.log_artifacts(run_id, str(bank_dir), "bank")
    if (run_dir / RECIPE_FILE).is_file():
        client.log_artifact(run_id, str(run_dir / RECIPE_FILE))
    info.update(mlflow_run_id=run_id, tracking_uri=tracking_uri)
    run_file.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return run_id, True


def _log_module(client: MlflowClient, run_id: str, module_dir: Path, category: str) -> str:
    """Log `module_dir/{tokens.safetensors, module.json}` under `modules/<category>`; return its artifact URI.

    Registering the same run twice must not rewrite what earlier versions point to: identical files are not
    logged again, and different files under the same path are refused."""
    path = f"{MODULES_PATH}/{category}"
    logged = {Path(f.path).name for f in client.list_artifacts(run_id, path)}
    if logged:
        with tempfile.TemporaryDirectory(prefix="mosaic-register-") as tmp:
            got = client.download_artifacts(run_id, f"{path}/{META_FILE}", tmp)
            same = json.loads(Path(got).read_text()) == json.loads((module_dir / META_FILE).read_text())
        if not same or TENSOR_FILE not in logged:
            raise ArtifactError(
                f"MLflow run {run_id} already holds a different {path} (registered earlier); registered files are "
                f"immutable: write the new bank to a new run directory and register that"
            )
    else:
        for name in (TENSOR_FILE, META_FILE):
            client.log_artifact(run_id, str(module_dir / name), path)
    return f"{client.get_run(run_id).info.artifact_uri}/{path}"


def _ensure_registered_model(client: MlflowClient, name: str, category: str, model_id: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if not _not_found(e):
            raise
        client.create_registered_model(
            name,
            tags={"mosaic.category": category, "mosaic.backbone": model_id},
            description=f"MOSAIC safety module '{category}' (learned control tokens) for backbone {model_id}",
        )


def run_tracking_uri(run_dir: Path, flag: str | None = None) -> str:
    """The registry a run's modules go to: `flag`, else `$MLFLOW_TRACKING_URI`, else the store the training
    stage recorded in `run.json` (so the versions link to the run that holds the training metrics), else the
    default `runs/mlflow.db`."""
    if flag or os.environ.get("MLFLOW_TRACKING_URI"):
        return resolve_tracking_uri(flag)
    return resolve_tracking_uri(_run_info(Path(run_dir)).get("tracking_uri"))


def register_run(run_dir: Path, tracking_uri: str | None = None) -> dict[str, dict[str, str]]:
    """Register every module of `run_dir/bank` as a new version; write `bank/registered.json`; return it.

    Returns {category: {"name", "version", "uri", "source", "run_id"}}."""
    run_dir = Path(run_dir).resolve()
    bank_dir, manifest = _read_bank(run_dir)
    # Refuse a corrupted bank before anything reaches the registry (load_module checks sha256 and shape).
    metas = {c: load_module(bank_dir / manifest["modules"][c]["path"])[1] for c in manifest["categories"]}
    model_id = manifest["fingerprint"]["model_id"]
    uri = run_tracking_uri(run_dir, tracking_uri)
    client = connect(uri, create=True)
    run_id, created = _source_run(client, run_dir, bank_dir, uri)

    common = {
        "backbone": model_id,
        "backbone_fingerprint": Fingerprint.from_dict(manifest["fingerprint"]).digest,
        "recipe_sha256": _recipe_hash(run_dir),
        "bank_digest": manifest_digest(bank_dir),
        "run_name": run_dir.name,
    }
    registered: dict[str, dict[str, str]] = {}
    for c, meta in metas.items():
        module_dir = bank_dir / manifest["modules"][c]["path"]
        source = _log_module(client, run_id, module_dir, c)
        name = registered_name(model_id, c)
        _ensure_registered_model(client, name, c, model_id)
        tags = {
            **common,
            "category": c,
            "m": str(meta.m),
            "d": str(meta.d),
            "placement": meta.placement,
            "depth": meta.depth,
            "module_sha256": meta.sha256,
            "training_run_id": meta.training_run_id or "none",
            "extends": meta.extends or "none",
            "mosaic_version": meta.mosaic_version,
            **_eval_tags(run_dir, c),
        }
        mv = client.create_model_version(
            name,
            source=source,
            run_id=run_id,
            tags=tags,
            description=f"{c} module (m={meta.m}, {meta.depth} tokens, placement {meta.placement}) from run {run_dir.name}",
        )
        registered[c] = {
            "name": name,
            "version": str(mv.version),
            "uri": f"models:/{name}/{mv.version}",
            "source": source,
            "run_id": run_id,
        }

    # Versions only exist once created, so the jointly-trained siblings are tagged afterwards.
    for c, r in registered.items():
        siblings = [f"{o['name']}:{o['version']}" for oc, o in registered.items() if oc != c]
        client.set_model_version_tag(r["name"], r["version"], "trained_with", ",".join(siblings) or "none")
    if created:
        client.set_terminated(run_id)
    (bank_dir / REGISTERED_FILE).write_text(json.dumps(registered, indent=2, sort_keys=True) + "\n")
    return registered


def main(cfg: RegisterConfig) -> dict[str, dict[str, str]]:
    """Register a run's modules and say what was registered and how to promote it."""
    uri = run_tracking_uri(cfg.run_dir, cfg.tracking_uri)
    registered = register_run(cfg.run_dir, uri)
    print(f"registry: {uri}")
    for r in registered.values():
        print(f"registered {r['name']} version {r['version']}  (source run {r['run_id']})")
    first = next(iter(registered.values()))
    backbone = first["name"][len(NAME_PREFIX) :].rsplit(".", 1)[0]
    print(
        f"wrote {Path(cfg.run_dir) / 'bank' / REGISTERED_FILE}; serve a version with: mosaic modules promote "
        f"{next(iter(registered))} {first['version']} --alias production --backbone {backbone}"
    )
    return registered


# --------------------------------------------------------------------------------------------- look-ups


def _model_name(module: str, backbone: str) -> str:
    """A full `mosaic.*` name stays as is; a bare category becomes `mosaic.<backbone>.<category>`."""
    return module if module.startswith(NAME_PREFIX) else registered_name(backbone, module)


def promote(client: MlflowClient, name: str, version: str, alias: str) -> str | None:
    """Point `alias` at `version` (moving it if it was elsewhere); return the version it pointed to before."""
    before = _require_model(client, name).get(alias)
    get_version(client, name, version=version)
    try:
        client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as e:  # e.g. reserved names such as "latest" or "v3"
        raise ArtifactError(f"cannot set alias {alias!r} on {name}: {e.message}") from None
    return None if before is None else str(before)


# --------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking + registry URI (default: $MLFLOW_TRACKING_URI, else sqlite runs/mlflow.db)",
    )
    backbone = argparse.ArgumentParser(add_help=False)
    backbone.add_argument("--backbone", default=EMBEDDED, help=f"backbone id the module names use (default {EMBEDDED})")

    p = argparse.ArgumentParser(prog="mosaic modules", description="MLflow model registry of MOSAIC safety modules")
    sub = p.add_subparsers(dest="action", required=True)
    r = sub.add_parser("register", parents=[common], help="register every module of a run's bank as a new version")
    r.add_argument("--run", required=True, help="run directory holding bank/manifest.json, e.g. runs/<name>")
    sub.add_parser("list", parents=[common], help="every mosaic.* model: versions, aliases, headline tags")
    pr = sub.add_parser("promote", parents=[common, backbone], help="point an alias at a version (moves it)")
    pr.add_argument("category", help="category (with --backbone) or full name mosaic.<backbone>.<category>")
    pr.add_argument("version")
    pr.add_argument("--alias", default="production")
    s = sub.add_parser("show", parents=[common, backbone], help="one version: tags, source, files, sha256")
    s.add_argument("module", help="category, full name, or models:/<name>@<alias> | models:/<name>/<version>")
    which = s.add_mutually_exclusive_group()
    which.add_argument("--alias", default=None)
    which.add_argument("--version", default=None)
    return p


def cli(argv: list[str]) -> None:
    """`mosaic modules ...`: MosaicErrors propagate (pipelines/cli.py prints them as one line, exit 2)."""
    args = build_parser().parse_args(argv)
    if args.action == "register":
        main(RegisterConfig(run_dir=Path(args.run), tracking_uri=args.tracking_uri))
        return
    uri = resolve_tracking_uri(args.tracking_uri)
    client = connect(uri)
    if args.action == "list":
        rows = list_rows(client)
        print(f"registry: {uri}")
        if rows:
            print_table(rows)
        else:
            print("no mosaic.* registered models yet: `mosaic modules register --run runs/<name>`")
    elif args.action == "promote":
        name = _model_name(args.category, args.backbone)
        before = promote(client, name, args.version, args.alias)
        moved = f" (moved from version {before})" if before and before != str(args.version) else ""
        print(f"{name}: alias {args.alias!r} -> version {args.version}{moved}")
    elif args.action == "show":
        if args.module.startswith("models:/"):
            if args.alias or args.version:
                raise ArtifactError("give either a models:/ URI or --alias/--version, not both")
            ref = parse_module_uri(args.module)
            name, alias, version = ref.name, ref.alias, ref.version
        else:
            name, alias, version = _model_name(args.module, args.backbone), args.alias, args.version
        print(describe_version(client, get_version(client, name, version=version, alias=alias), uri))


if __name__ == "__main__":  # `python -m pipelines.modules ...` (e.g. as a `ray job submit` entry point)
    from mosaic_core.errors import MosaicError

    try:
        cli(sys.argv[1:])
    except MosaicError as err:
        print(f"mosaic modules: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
