"""The read side of the MLflow module registry: find, pin, download and compose registered module versions.

Shared by the modules stage (`mosaic modules list|promote|show`) and the Serve app (which resolves its
modules from aliases at start and on every `reconfigure`); stages never import each other, so it lives beside them.
The write side (creating runs and versions) stays in `pipelines/modules.py`.

MLflow is imported inside the functions: `mosaic --help` and the stages that never touch the registry do not pay
its import.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mosaic_core.artifact import bank_from_modules, read_meta
from mosaic_core.backbone import Fingerprint
from mosaic_core.bank import Bank
from mosaic_core.bundle import NAME_PREFIX, ModuleRef, check_bundle, parse_module_uri
from mosaic_core.errors import ArtifactError, UnknownCategoryError

if TYPE_CHECKING:  # typing only: importing mlflow costs seconds
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.exceptions import MlflowException

DEFAULT_STORE = "runs/mlflow.db"
"""The sqlite store used when neither a flag nor MLFLOW_TRACKING_URI names one (relative to the cwd)."""


def resolve_tracking_uri(flag: str | None = None) -> str:
    """`flag`, else `$MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/runs/mlflow.db`; sqlite paths made absolute."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE}"
    db = sqlite_path(uri)
    # A relative sqlite path means "relative to whoever opens it": resolve once, here, at the driver.
    return f"sqlite:///{db.resolve()}" if db is not None else uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, None for any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def connect(tracking_uri: str, *, create: bool = False) -> MlflowClient:
    """A client for one tracking + registry URI (no global `mlflow.set_tracking_uri`).

    Read-only callers refuse a sqlite store that does not exist yet, rather than silently creating an empty
    registry in whatever directory they were started from."""
    from mlflow import MlflowClient

    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        if not create:
            raise ArtifactError(
                f"no MLflow registry at {tracking_uri}: register modules first (`mosaic modules register --run "
                "runs/<name>`), run from the directory that holds runs/, or pass --tracking-uri / MLFLOW_TRACKING_URI"
            )
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def not_found(e: MlflowException) -> bool:
    """Whether an MLflow error means "no such model / version / alias" (as opposed to a store failure)."""
    return e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def module_names(client: MlflowClient) -> list[str]:
    """Every registered model named `mosaic.*`, sorted."""
    names: list[str] = []
    token = None
    while True:
        page = client.search_registered_models(filter_string=f"name LIKE '{NAME_PREFIX}%'", page_token=token)
        names += [m.name for m in page if m.name.startswith(NAME_PREFIX)]
        token = page.token
        if not token:
            return sorted(names)


def require_model(client: MlflowClient, name: str) -> dict[str, int]:
    """The model's aliases ({alias: version}); UnknownCategoryError listing what is registered if it is absent."""
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_registered_model(name).aliases)
    except MlflowException as e:
        if not not_found(e):
            raise
        raise UnknownCategoryError([name], module_names(client)) from None


def versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of one registered model, oldest first."""
    return sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def get_version(client: MlflowClient, name: str, *, version: str | None = None, alias: str | None = None) -> ModelVersion:
    """One version by number or alias (the latest when neither); ArtifactError naming what exists otherwise."""
    from mlflow.exceptions import MlflowException

    aliases = require_model(client, name)
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        if version:
            if not str(version).isdigit():
                raise ArtifactError(f"version {version!r} of {name} is not a number")
            return client.get_model_version(name, str(version))
    except MlflowException as e:
        if not not_found(e):
            raise
        have = ", ".join(str(v.version) for v in versions(client, name)) or "none"
        known = ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise ArtifactError(f"{name} has no {what}; versions: {have}; aliases: {known}") from None
    found = versions(client, name)
    if not found:
        raise ArtifactError(f"{name} has no versions yet")
    return found[-1]


def download_version(client: MlflowClient, mv: ModelVersion, dst: Path, tracking_uri: str) -> Path:
    """Download one version's files into `dst` and return the local directory.

    The version is already pinned (resolved from its alias), so a moving alias cannot swap files mid-load. Its
    download URI is asked of *our* client: `download_artifacts("models:/…", registry_uri=…)` in MLflow 3.17
    ignores `registry_uri` and looks the name up in the global default registry (./mlflow.db)."""
    import mlflow.artifacts

    source = client.get_model_version_download_uri(mv.name, mv.version)
    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri))


def resolve_bundle(
    uris: Sequence[str], expected: Fingerprint | None = None, *, tracking_uri: str | None = None
) -> tuple[Bank, list[dict[str, str]]]:
    """Download module versions by `models:/<name>@<alias>` or `models:/<name>/<version>` and compose them.

    Checks, before anything is served: each file's sha256 (IntegrityError), the backbone fingerprint against
    `expected` and among the modules (IncompatibleBackboneError), placement/m/d, and that the versions were
    trained together or one extends the other's bank (ArtifactError naming the versions; mosaic_core.bundle).
    Returns the bank, in training order, and one dict per module: category, name, version, uri, requested,
    sha256, training_run_id, run_id."""
    uri = resolve_tracking_uri(tracking_uri)
    client = connect(uri)
    refs, dirs, infos = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="mosaic-bundle-") as tmp:
        for i, requested in enumerate(uris):
            ref = parse_module_uri(requested)
            mv = get_version(client, ref.name, version=ref.version, alias=ref.alias)
            pinned = f"models:/{mv.name}/{mv.version}"
            local = download_version(client, mv, Path(tmp) / str(i), uri)
            meta = read_meta(local)
            if not mv.name.endswith(f".{meta.category}"):
                raise ArtifactError(f"{pinned} holds module {meta.category!r}, not the category its name says")
            label = f"{mv.name} v{mv.version}"
            refs.append(ModuleRef.from_meta(meta, label, bank_digest=mv.tags.get("bank_digest")))
            dirs[label] = local
            infos[label] = {
                "category": meta.category,
                "name": mv.name,
                "version": str(mv.version),
                "uri": pinned,
                "requested": requested,
                "sha256": meta.sha256,
                "training_run_id": meta.training_run_id or "none",
                "run_id": mv.run_id or "none",
            }
        ordered = check_bundle(refs, expected.digest if expected is not None else None)
        bank = bank_from_modules([dirs[r.label] for r in ordered], expected)
    return bank, [infos[r.label] for r in ordered]
