"""What made a run's outputs: the commit and package versions (every run), and for a bank the hashes of the resolved
recipe and of the training data, and the epoch it was kept from -- so a shipped bank says how to reproduce it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "ray", "deepspeed", "mlflow", "mosaic-ray")


def provenance() -> dict[str, Any]:
    """The commit (None outside a git checkout), Python and the versions of the packages results depend on."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        sha = None
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return {"git_sha": sha, "python": sys.version.split()[0], "packages": versions, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def bank_provenance(run: Path, state: dict[str, Any]) -> dict[str, Any]:
    """A trained bank's provenance, from its run directory and the training state of its last checkpoint.

    `recipe_sha256` hashes `resolved_config.yaml` (the recipe with every default and --set applied);
    `data_content_hash` is the data stage's content hash (dataset bytes, sampler, teacher, backbone)."""
    manifest = run / "data" / "manifest.json"  # absent where a run's data came from elsewhere (tests)
    data = json.loads(manifest.read_text()) if manifest.exists() else {}
    made = provenance()
    return {
        "recipe": data.get("recipe"),
        "recipe_sha256": hashlib.sha256((run / "resolved_config.yaml").read_bytes()).hexdigest(),
        "data_content_hash": data.get("content_hash"),
        "git_sha": made["git_sha"],
        "packages": made["packages"],
        "python": made["python"],
        "epochs": state.get("epoch"),
        "steps": state.get("step"),
        "best_epoch": state.get("best_epoch"),
        "best_val_key": state.get("best_key"),
        "resumes": state.get("resumes", []),
    }
