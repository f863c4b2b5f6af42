"""Which registered module versions may be composed into one bank: the registry-agnostic rule.

A *bundle* is the set of module versions a server (or a test) loads together, e.g. alcohol@production +
betting@production. Modules were trained as a bank: each one's vectors were optimised while its siblings were
in the prompt, so two versions from different training runs were never seen together and may interfere. The
rule, checked for every pair of modules in the bundle:

* same backbone fingerprint digest (and the expected one, when given), same placement, m, d and depth;
* and either **trained together** (same training run id, or saved in the same bank: same manifest digest),
  or an **expansion**: one module's `extends` names the other's bank (its training run id or manifest digest),
  i.e. it was trained with the other frozen in the prompt (incremental expansion).

Pairwise on purpose: two expansions of the same base bank were each trained next to the base, never next to
each other, so they are refused together. Every problem is reported in one error.

Also here, because training, registration and serving must agree on them: the registered-model name of a
module (`mosaic.<backbone>.<category>`), the `models:/` URI syntax and the manifest digest. No MLflow import.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mosaic_core.artifact import ModuleMeta, manifest_path
from mosaic_core.backbone import Fingerprint
from mosaic_core.errors import ArtifactError, IncompatibleBackboneError

NAME_PREFIX = "mosaic."
"""Every registered module model is named `mosaic.<backbone slug>.<category>`."""

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[0-9]+))$")


def backbone_slug(model_id: str) -> str:
    """A registry-safe short name for a backbone id: `meta-llama/Llama-3.1-8B-Instruct` -> `llama-3.1-8b-instruct`.

    Registered model names may not contain `/` or `:` (MLflow), and a hub org or local parent dir says nothing
    about the weights (the fingerprint digest in each version's tags does), so only the last path part is kept."""
    last = model_id.rstrip("/").rsplit("/", 1)[-1]
    slug = re.sub(r"[^a-z0-9._-]+", "-", last.lower()).strip("-.")
    if not slug:
        raise ArtifactError(f"backbone id {model_id!r} gives an empty registry name")
    return slug


def registered_name(backbone_id: str, category: str) -> str:
    """The registered-model name of one category module on one backbone, e.g. `mosaic.smollm2-135m-instruct.alcohol`."""
    return f"{NAME_PREFIX}{backbone_slug(backbone_id)}.{category}"


def manifest_digest(bank_dir: str | Path) -> str:
    """sha256 of a bank's `manifest.json` bytes: the name of that bank which a module added to it by
    incremental expansion records as `extends` (the training stage's definition; keep them one)."""
    return hashlib.sha256(manifest_path(bank_dir).read_bytes()).hexdigest()


@dataclass(frozen=True)
class ModuleURI:
    """A parsed `models:/<name>@<alias>` or `models:/<name>/<version>` reference (exactly one of the two set)."""

    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def parse_module_uri(uri: str) -> ModuleURI:
    """Parse a module reference; anything else raises ArtifactError saying what the two accepted forms are."""
    match = _URI.match(uri.strip())
    if match is None:
        raise ArtifactError(
            f"{uri!r} is not a module URI: use models:/<name>@<alias> or models:/<name>/<version>, "
            "e.g. models:/mosaic.smollm2-135m-instruct.alcohol@production"
        )
    return ModuleURI(match["name"], alias=match["alias"], version=match["version"])


@dataclass(frozen=True)
class ModuleRef:
    """One module as the compatibility rule sees it (from its module.json plus, optionally, registry facts)."""

    label: str
    """How messages name it, e.g. `mosaic.smollm2-135m-instruct.alcohol v3`."""
    category: str
    backbone_digest: str
    placement: str
    m: int
    d: int
    training_run_id: str | None = None
    extends: str | None = None
    """The bank this module was added to (its training run id or manifest digest), for incremental expansion."""
    depth: str = "input"
    """`input` or `deep` (DeepTokenBank): the two cannot share a block."""
    bank_digest: str | None = None
    """Manifest digest of the bank the module was saved in, when known (registration records it)."""
    trained_with: tuple[str, ...] = ()
    """Categories of the bank it was trained in, in that bank's (canonical) order."""

    @classmethod
    def from_meta(cls, meta: ModuleMeta, label: str | None = None, bank_digest: str | None = None) -> ModuleRef:
        # Recompute the digest from the recorded fields rather than trusting the stored "digest" key.
        digest = Fingerprint.from_dict(meta.fingerprint).digest
        return cls(
            label=label or meta.category,
            category=meta.category,
            backbone_digest=digest,
            placement=meta.placement,
            m=meta.m,
            d=meta.d,
            training_run_id=meta.training_run_id,
            extends=meta.extends,
            bank_digest=bank_digest,
            depth=meta.depth,
            trained_with=tuple(meta.trained_with),
        )

    @property
    def banks(self) -> frozenset[str]:
        """The names of the bank this module was trained in (training run id and/or manifest digest)."""
        return frozenset(x for x in (self.training_run_id, self.bank_digest) if x)


def trained_together(a: ModuleRef, b: ModuleRef) -> bool:
    """Both modules come from the same bank (a shared, non-empty bank name)."""
    return bool(a.banks & b.banks)


def extends(a: ModuleRef, b: ModuleRef) -> bool:
    """`a` was trained as an expansion of `b`'s bank (b frozen in the prompt while a learned)."""
    return a.extends is not None and a.extends in b.banks


def _describe(r: ModuleRef) -> str:
    bank = r.training_run_id or r.bank_digest or "no training run id"
    return f"{r.label} (training run {bank}" + (f", extends {r.extends})" if r.extends else ")")


def check_bundle(refs: Sequence[ModuleRef], expected_digest: str | None = None) -> list[ModuleRef]:
    """Check that `refs` may be composed into one bank; return them in composition order.

    Composition order: base bank before its expansion, then each bank's own category order, because the
    vectors were trained at those positions. Raises IncompatibleBackboneError when a backbone fingerprint
    differs (among the modules or from `expected_digest`), else ArtifactError, listing every problem found."""
    refs = list(refs)
    if not refs:
        raise ArtifactError("no modules given: a bundle needs at least one module")
    problems: list[str] = []
    backbone_problem = False

    seen: dict[str, ModuleRef] = {}
    for r in refs:
        if r.category in seen:
            problems.append(f"{seen[r.category].label} and {r.label} are both category {r.category!r}: pick one version")
        seen.setdefault(r.category, r)

    if expected_digest is not None:
        for r in refs:
            if r.backbone_digest != expected_digest:
                backbone_problem = True
                problems.append(f"{r.label} was trained on backbone {r.backbone_digest}, not the served {expected_digest}")

    for i, a in enumerate(refs):
        for b in refs[i + 1 :]:
            if a.backbone_digest != b.backbone_digest:
                backbone_problem = True
                problems.append(
                    f"{a.label} and {b.label} were trained on different backbones ({a.backbone_digest} vs {b.backbone_digest})"
                )
                continue
            shape = [
                f"{k} {getattr(a, k)!r} vs {getattr(b, k)!r}"
                for k in ("placement", "m", "d", "depth")
                if getattr(a, k) != getattr(b, k)
            ]
            if shape:
                problems.append(f"{a.label} and {b.label} differ in {', '.join(shape)}")
                continue
            if a.category != b.category and not (trained_together(a, b) or extends(a, b) or extends(b, a)):
                problems.append(
                    f"{_describe(a)} and {_describe(b)} were not trained together and neither extends "
                    "the other's bank: pick versions from one training run (or its expansion)"
                )
    if problems:
        err = IncompatibleBackboneError if backbone_problem else ArtifactError
        lines = "\n".join(f"  - {p}" for p in problems)
        raise err(f"cannot compose these {len(refs)} module versions ({len(problems)} problem(s)):\n{lines}")

    def key(r: ModuleRef) -> tuple[int, int, str]:
        is_expansion = any(extends(r, o) for o in refs if o is not r)
        pos = r.trained_with.index(r.category) if r.category in r.trained_with else len(r.trained_with)
        return (int(is_expansion), pos, r.category)

    return sorted(refs, key=key)
