"""What `mosaic modules list` and `mosaic modules show` print: one row per registered version, and one version's
tags, source and files with an integrity check. Reads the registry only (pipelines/_registry.py)."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from mosaic_core.artifact import META_FILE, TENSOR_FILE, read_meta, sha256_file
from pipelines._registry import download_version, module_names, require_model, versions

HEADLINE = ("dsr", "or")
"""The eval tags (`eval.<key>`) a listed row shows."""


def list_rows(client: MlflowClient) -> list[dict[str, str]]:
    """One row per version of every `mosaic.*` model, with its aliases and headline tags."""
    rows = []
    for name in module_names(client):
        # search_model_versions returns aliases=[] (docs/architecture.md, platform notes): take them from the registered model.
        by_version: dict[str, list[str]] = {}
        for a, v in require_model(client, name).items():
            by_version.setdefault(str(v), []).append(a)
        for v in versions(client, name):
            t = v.tags
            rows.append(
                {
                    "name": name,
                    "version": str(v.version),
                    "aliases": ",".join(sorted(by_version.get(str(v.version), []))) or "-",
                    "placement": t.get("placement", "-"),
                    "m": t.get("m", "-"),
                    **{k: t.get(f"eval.{k}", "-") for k in HEADLINE},
                    "run": t.get("run_name", "-"),
                }
            )
    return rows


def format_table(rows: Sequence[dict[str, str]]) -> str:
    """Plain, aligned text (grep- and pipe-friendly)."""
    if not rows:
        return ""
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def print_table(rows: Sequence[dict[str, str]]) -> None:
    """rich for a human at a wide enough terminal; plain text otherwise (pipes, scripts, tests, narrow windows),
    because a squeezed rich table truncates the model names people copy into promote and serve configs."""
    plain = format_table(rows)
    try:
        if not sys.stdout.isatty():
            raise ImportError
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(plain)
        return
    console = Console()
    # SIMPLE_HEAD adds 2 columns of padding per column over the plain layout.
    if console.width < max(len(line) for line in plain.splitlines()) + 2 * len(rows[0]) + 2:
        print(plain)
        return
    table = Table(box=box.SIMPLE_HEAD)
    for c in rows[0]:
        table.add_column(c.upper(), no_wrap=True)
    for r in rows:
        table.add_row(*r.values())
    console.print(table)


def when(ms: int | None) -> str:
    return "-" if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="seconds")


def describe_version(client: MlflowClient, mv: ModelVersion, tracking_uri: str) -> str:
    """Tags, source, files and an integrity check of one version's files."""
    aliases = sorted(a for a, v in require_model(client, mv.name).items() if str(v) == str(mv.version))
    lines = [
        f"{mv.name}  version {mv.version}  aliases: {', '.join(aliases) or '-'}",
        f"uri:      models:/{mv.name}/{mv.version}",
        f"source:   {mv.source}",
        f"run_id:   {mv.run_id}",
        f"status:   {mv.status}",
        f"created:  {when(mv.creation_timestamp)}",
        "tags:",
    ]
    lines += [f"  {k:<22} {v}" for k, v in sorted(mv.tags.items())]
    lines.append("files:")
    with tempfile.TemporaryDirectory(prefix="mosaic-show-") as tmp:
        local = download_version(client, mv, Path(tmp), tracking_uri)
        recorded = read_meta(local).sha256 if (local / META_FILE).is_file() else None
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            line = f"  {f.relative_to(local)!s:<22} {f.stat().st_size:>8} B  sha256 {sha256_file(f)}"
            if f.name == TENSOR_FILE:
                line += (
                    "  OK (matches module.json)" if sha256_file(f) == recorded else f"  MISMATCH: module.json records {recorded}"
                )
            lines.append(line)
    return "\n".join(lines)
