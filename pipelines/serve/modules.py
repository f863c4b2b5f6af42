"""What the backbone deployment serves: an immutable snapshot of its modules (ModuleState), and how a ModuleSource
resolves into one (load_modules: a local bank directory, or registry URIs through MLflow)."""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mosaic_core.errors import UnknownCategoryError
from pipelines.serve.settings import ModuleSource


@dataclass(frozen=True)
class ModuleState:
    """An immutable snapshot of what is served: swapped by one reference assignment, so a batch that took it keeps a
    consistent bank while `reconfigure` installs the next one."""

    bank: Any  # Bank | None
    modules: tuple[dict[str, Any], ...]
    source: ModuleSource
    loaded_at: float = field(default_factory=time.time)

    @property
    def versions(self) -> dict[str, str]:
        return {m["category"]: m["version"] for m in self.modules}

    def canonical(self, active: Sequence[str]) -> tuple[str, ...]:
        if self.bank is None:
            if active:
                raise UnknownCategoryError(sorted(set(active)), [])
            return ()
        return self.bank.canonical(active)


ModuleLoader = Callable[[ModuleSource, Any], ModuleState]
"""(source, backbone fingerprint) -> ModuleState. Injectable so a test can hand the deployment a fake."""


def load_modules(source: ModuleSource, expected: Any) -> ModuleState:
    """Resolve and check the modules of `source` against the backbone fingerprint `expected` (all or nothing)."""
    from mosaic_core.artifact import load_bank, read_manifest, read_meta

    if source.bank_dir:
        bank_dir = Path(source.bank_dir)
        bank = load_bank(bank_dir, expected)
        manifest = read_manifest(bank_dir)
        modules = []
        for c in bank.categories:
            meta = read_meta(bank_dir / manifest["modules"][c]["path"])
            # A local bank has no registry version: the tensor's hash names exactly what is served.
            modules.append(
                {
                    "category": c,
                    "version": f"local-{meta.sha256[:12]}",
                    "name": c,
                    "uri": str(bank_dir / c),
                    "requested": str(bank_dir),
                    "aliases": [],
                    "sha256": meta.sha256,
                    "m": bank.m,
                    "placement": bank.placement,
                    "training_run_id": meta.training_run_id or "none",
                }
            )
        return ModuleState(bank, tuple(modules), source)
    if source.modules:
        from mosaic_core.bundle import parse_module_uri
        from pipelines._registry import resolve_bundle

        bank, infos = resolve_bundle(source.uris(expected.model_id), expected, tracking_uri=source.tracking_uri)
        modules = []
        for info in infos:
            alias = parse_module_uri(info["requested"]).alias
            modules.append({**info, "aliases": [alias] if alias else [], "m": bank.m, "placement": bank.placement})
        return ModuleState(bank, tuple(modules), source)
    return ModuleState(None, (), source)
