"""Module artifacts: per category `tokens.safetensors` (only that module's tensor: (m, d) input embeddings, or a
deep module's (layers, 2, kv_heads, m, head_dim) keys and values) + `module.json`; per bank `manifest.json` tying
jointly trained modules together.

Loading refuses a file whose sha256 differs from its module.json, and a module trained on another backbone."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mosaic_core.backbone import Fingerprint
from mosaic_core.bank import Bank, new_bank
from mosaic_core.errors import ArtifactError, IncompatibleBackboneError, IntegrityError

FORMAT_VERSION = 1
TENSOR_FILE, META_FILE, MANIFEST_FILE = "tokens.safetensors", "module.json", "manifest.json"
_TENSOR_KEY, _GATE_KEY = "tokens", "gate"


@dataclass(frozen=True)
class ModuleMeta:
    """Everything module.json records about one category module."""

    category: str
    m: int
    d: int
    fingerprint: dict[str, Any]
    placement: str
    init: str
    sha256: str
    mosaic_version: str
    training_run_id: str | None = None
    trained_with: list[str] = field(default_factory=list)
    """The categories (and, once registered, versions) this module was trained jointly with."""
    extends: str | None = None
    """For incremental expansion: the manifest digest of the bank this module was added to."""
    format_version: int = FORMAT_VERSION
    depth: str = "input"
    """`input` (m rows of the input embedding) or `deep` (key/value positions at every layer; DeepTokenBank)."""
    shape: list[int] = field(default_factory=list)
    """The tensor's shape; empty in modules written before deep ones existed, which are all (m, d)."""
    positions: str = "shift"
    """BankConfig.positions the module was trained with (`shift` in modules written before `keep` existed)."""
    gate_layers: list[int] = field(default_factory=list)
    """The layers its gate reads (mosaic_core.gate), stored beside the tokens as `gate`; empty: no gate, always inserted."""
    gate_recency: float | None = None
    """How its gate weighs the request's tokens (mosaic_core.gate.request_features); None (and in modules written
    before it existed): a plain mean."""

    @property
    def tensor_shape(self) -> tuple[int, ...]:
        return tuple(self.shape) if self.shape else (self.m, self.d)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _check_fingerprint(meta_fp: dict[str, Any], expected: Fingerprint | None, where: str) -> None:
    if expected is None:
        return
    got = Fingerprint.from_dict(meta_fp)
    if got.digest != expected.digest:
        diffs = [k for k, v in asdict(expected).items() if meta_fp.get(k) != v]
        raise IncompatibleBackboneError(
            f"{where} was trained on backbone {got.model_id!r} (fingerprint {got.digest}), not on "
            f"{expected.model_id!r} (fingerprint {expected.digest}); differing fields: {diffs}. "
            "Control tokens only work on the exact backbone they were trained on."
        )


def save_module(
    out_dir: Path,
    category: str,
    tensor: torch.Tensor,
    *,
    fingerprint: Fingerprint,
    placement: str,
    init: str,
    training_run_id: str | None = None,
    trained_with: Sequence[str] = (),
    extends: str | None = None,
    depth: str = "input",
    d: int | None = None,
    positions: str = "shift",
    gate: torch.Tensor | None = None,
    gate_layers: Sequence[int] = (),
    gate_recency: float | None = None,
) -> ModuleMeta:
    """Write `out_dir/{tokens.safetensors, module.json}` for one module's tensor: (m, d), or with depth `deep`
    (layers, 2, kv_heads, m, head_dim) and the backbone's hidden size `d`; with its gate if it has one
    ((len(gate_layers) * d + 1,), or (rows, len(gate_layers) * d + 1) for a softmax gate: mosaic_core.gate.fires)."""
    from mosaic_core import __version__

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t = tensor.detach().to("cpu", torch.float32).contiguous()
    if depth == "deep" and (t.dim() != 5 or t.shape[1] != 2 or d is None):
        raise ArtifactError(
            f"a deep module is (layers, 2, kv_heads, m, head_dim) with the hidden size d given, not {tuple(t.shape)}"
        )
    if (gate is None) != (not gate_layers):
        raise ArtifactError("a gate and its layers go together")
    tensors = (
        {_TENSOR_KEY: t} if gate is None else {_TENSOR_KEY: t, _GATE_KEY: gate.detach().to("cpu", torch.float32).contiguous()}
    )
    save_file(tensors, str(out_dir / TENSOR_FILE))
    m, width = (int(t.shape[3]), int(d)) if depth == "deep" else (int(t.shape[0]), int(t.shape[1]))  # type: ignore[arg-type]
    meta = ModuleMeta(
        category=category,
        m=m,
        d=width,
        fingerprint=fingerprint.to_dict(),
        placement=placement,
        init=init,
        sha256=sha256_file(out_dir / TENSOR_FILE),
        mosaic_version=__version__,
        training_run_id=training_run_id,
        trained_with=list(trained_with),
        extends=extends,
        depth=depth,
        shape=list(t.shape),
        positions=positions,
        gate_layers=[int(x) for x in gate_layers],
        gate_recency=None if gate_recency is None else float(gate_recency),
    )
    (out_dir / META_FILE).write_text(json.dumps(asdict(meta), indent=2, sort_keys=True) + "\n")
    return meta


def read_meta(module_dir: Path) -> ModuleMeta:
    """Parse module.json: missing required keys raise ArtifactError, unknown keys warn (forward compat)."""
    path = Path(module_dir) / META_FILE
    if not path.is_file():
        raise ArtifactError(f"{module_dir} is not a module: {META_FILE} missing")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from e
    known = {f.name for f in fields(ModuleMeta)}
    required = {"category", "m", "d", "fingerprint", "placement", "init", "sha256", "mosaic_version"}
    missing = sorted(required - set(raw))
    if missing:
        raise ArtifactError(f"{path} lacks required key(s) {missing}")
    extra = sorted(set(raw) - known)
    if extra:
        warnings.warn(f"{path}: ignoring unknown key(s) {extra} (written by a newer mosaic?)", stacklevel=2)
    if raw.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ArtifactError(f"{path} has format_version {raw['format_version']}; this mosaic reads <= {FORMAT_VERSION}")
    return ModuleMeta(**{k: v for k, v in raw.items() if k in known})


def load_module(module_dir: Path, expected: Fingerprint | None = None) -> tuple[torch.Tensor, ModuleMeta]:
    """Load one module's tensor (meta.tensor_shape) after checking its sha256 and (if given) the backbone fingerprint."""
    tensors, meta = _load_tensors(module_dir, expected)
    return tensors[_TENSOR_KEY], meta


def _load_tensors(module_dir: Path, expected: Fingerprint | None = None) -> tuple[dict[str, torch.Tensor], ModuleMeta]:
    """load_module's checks; returns every tensor of the module file (the tokens, and the gate if it has one)."""
    module_dir = Path(module_dir)
    meta = read_meta(module_dir)
    tf = module_dir / TENSOR_FILE
    if not tf.is_file():
        raise ArtifactError(f"{module_dir}: {TENSOR_FILE} missing")
    actual = sha256_file(tf)
    if actual != meta.sha256:
        raise IntegrityError(
            f"{tf}: sha256 {actual[:12]}… does not match {meta.sha256[:12]}… recorded in {META_FILE}; "
            "the file was modified or corrupted — re-download or re-register the module"
        )
    _check_fingerprint(meta.fingerprint, expected, f"module {meta.category!r} ({module_dir})")
    tensors = load_file(str(tf))
    t = tensors[_TENSOR_KEY]
    if bool(meta.gate_layers) != (_GATE_KEY in tensors):
        raise ArtifactError(f"{tf}: {META_FILE} and the tensor file disagree on whether the module has a gate")
    if tuple(t.shape) != meta.tensor_shape or meta.depth not in ("input", "deep"):
        raise ArtifactError(
            f"{tf}: tensor shape {tuple(t.shape)} is not the {meta.depth} module shape {meta.tensor_shape} "
            f"recorded in {META_FILE}"
        )
    return tensors, meta


def save_bank(
    bank: Bank,
    out_dir: Path,
    *,
    fingerprint: Fingerprint,
    init: str,
    training_run_id: str | None = None,
    extends: str | None = None,
) -> dict[str, Any]:
    """Write every module under `out_dir/<category>/` and `out_dir/manifest.json`; returns the manifest."""
    out_dir = Path(out_dir)
    metas = {
        c: save_module(
            out_dir / c,
            c,
            bank.vectors[c],
            fingerprint=fingerprint,
            placement=bank.placement,
            init=init,
            training_run_id=training_run_id,
            trained_with=bank.categories,
            extends=extends,
            depth=bank.depth,
            d=bank.d,
            positions=bank.positions,
            gate=bank.gates.get(c),
            gate_layers=bank.gate_layers if c in bank.gates else (),
            gate_recency=bank.gate_recency if c in bank.gates else None,
        )
        for c in bank.categories
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "categories": list(bank.categories),
        "m": bank.m,
        "d": bank.d,
        "placement": bank.placement,
        "depth": bank.depth,
        "positions": bank.positions,
        "max_norm": bank.max_norm,
        "fingerprint": fingerprint.to_dict(),
        "training_run_id": training_run_id,
        "extends": extends,
        "modules": {c: {"path": c, "sha256": m.sha256} for c, m in metas.items()},
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def bank_from_modules(module_dirs: Sequence[Path], expected: Fingerprint | None = None) -> Bank:
    """Compose a bank from module directories (e.g. registry downloads), in the given order.

    All modules must share backbone fingerprint, placement, depth and shape."""
    loaded = [_load_tensors(Path(p), expected) for p in module_dirs]
    if not loaded:
        raise ArtifactError("no modules given")
    first = loaded[0][1]
    for _, meta in loaded[1:]:
        clash = [k for k in ("placement", "m", "d", "depth", "positions") if getattr(meta, k) != getattr(first, k)]
        if not clash and meta.tensor_shape != first.tensor_shape:  # deep modules of differently shaped attention
            clash.append("tensor shape")
        if Fingerprint.from_dict(meta.fingerprint).digest != Fingerprint.from_dict(first.fingerprint).digest:
            clash.append("backbone fingerprint")
        if clash:
            raise ArtifactError(f"modules {first.category!r} and {meta.category!r} differ in {clash}: cannot compose them")
    bank = new_bank(
        d=first.d,
        m=first.m,
        placement=first.placement,
        depth=first.depth,
        shape=first.tensor_shape,  # type: ignore[arg-type]
        positions=first.positions,
    )  # type: ignore[arg-type]
    for tensors, meta in loaded:
        bank.add(meta.category, tensors[_TENSOR_KEY])
        if meta.gate_layers:
            try:
                bank.set_gate(meta.category, tensors[_GATE_KEY], meta.gate_layers, meta.gate_recency)
            except ValueError as e:  # gated over other layers than the modules before it
                raise ArtifactError(f"module {meta.category!r}: {e}: cannot compose it with the others") from None
    return bank


def manifest_path(bank_dir: Path | str) -> Path:
    """`bank_dir/manifest.json`; a directory without one is not a bank (ArtifactError)."""
    path = Path(bank_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{bank_dir} is not a bank: {MANIFEST_FILE} missing")
    return path


def read_manifest(bank_dir: Path) -> dict[str, Any]:
    """Parse `bank_dir/manifest.json` (ArtifactError when it is not a bank)."""
    return json.loads(manifest_path(bank_dir).read_text())


def load_bank(bank_dir: Path, expected: Fingerprint | None = None) -> Bank:
    """Load `bank_dir/manifest.json` and its modules (checked) into a bank (ControlTokenBank or DeepTokenBank, as
    the modules are) in manifest order."""
    bank_dir = Path(bank_dir)
    manifest = read_manifest(bank_dir)
    _check_fingerprint(manifest["fingerprint"], expected, f"bank {bank_dir}")
    bank = bank_from_modules([bank_dir / manifest["modules"][c]["path"] for c in manifest["categories"]], expected)
    for c in manifest["categories"]:
        if manifest["modules"][c]["sha256"] != sha256_file(bank_dir / manifest["modules"][c]["path"] / TENSOR_FILE):
            raise IntegrityError(f"{bank_dir}/{c}: tensor does not match the manifest's sha256")
    bank.max_norm = manifest.get("max_norm")
    return bank


def average_banks(bank_dirs: Sequence[Path], out_dir: Path) -> dict[str, Any]:
    """Write the element-wise mean of banks trained from one starting bank (a "soup" of training seeds) to `out_dir`;
    returns its manifest.

    Why: seeds of one stage reach about equal selectivity but stop at different points of the refusal / over-refusal
    trade (docs/experiments/deep-recipe-chain.md); their mean lands near their average point, as one bank. The banks must hold the
    same categories in the same order, started from the same `init`, on one backbone, with one depth, placement and
    module shape: the average of banks trained from different starts is not a bank of either."""
    dirs, out_dir = [Path(d) for d in bank_dirs], Path(out_dir)
    if len(dirs) < 2:
        raise ArtifactError(f"averaging needs at least two banks, got {len(dirs)}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ArtifactError(f"{out_dir} exists and is not empty: write the average to a new directory")
    manifests = [read_manifest(d) for d in dirs]
    fingerprint = Fingerprint.from_dict(manifests[0]["fingerprint"])
    banks = [load_bank(d, fingerprint) for d in dirs]  # other backbones raise IncompatibleBackboneError
    first = banks[0]
    if any(b.gates for b in banks):
        raise ArtifactError("gated banks are not averaged: refit the gates on the averaged tokens instead")
    starts = [{c: read_meta(d / mf["modules"][c]["path"]).init for c in mf["categories"]} for d, mf in zip(dirs, manifests)]
    for d, bank, start in zip(dirs[1:], banks[1:], starts[1:]):
        clash = [
            k
            for k in ("categories", "placement", "depth", "positions", "module_shape", "max_norm")
            if getattr(bank, k) != getattr(first, k)
        ]
        if not clash and start != starts[0]:
            clash.append("init (the bank they were trained from)")
        if clash:
            raise ArtifactError(f"banks {dirs[0]} and {d} differ in {clash}: only seeds of one training stage can be averaged")
    mean = new_bank(
        d=first.d,
        m=first.m,
        placement=first.placement,
        max_norm=first.max_norm,
        depth=first.depth,
        shape=first.module_shape,
        positions=first.positions,
    )
    for c in first.categories:
        # fp64 accumulation: the mean of identical banks must come back bit-identical
        mean.add(c, torch.stack([b.vectors[c].detach().double() for b in banks]).mean(0).float())
    return save_bank(mean, out_dir, fingerprint=fingerprint, init="average:" + ",".join(str(d) for d in dirs))
