import dataclasses
import json
import os
import warnings

import pytest
import torch

from mosaic_core.artifact import bank_from_modules, load_bank, load_module, read_meta, save_bank
from mosaic_core.backbone import from_model
from mosaic_core.bank import ControlTokenBank
from mosaic_core.config import BankConfig
from mosaic_core.errors import ArtifactError, IncompatibleBackboneError, IntegrityError
from tests.tiny import tiny_model


@pytest.fixture
def saved(tmp_path, tiny_backbone):
    bank = ControlTokenBank.build(BankConfig(categories=("alcohol", "betting"), m=2, init="normal"), tiny_backbone.embeddings)
    manifest = save_bank(bank, tmp_path / "bank", fingerprint=tiny_backbone.fingerprint, init="normal", training_run_id="run-1")
    return bank, tmp_path / "bank", manifest


def test_exact_file_set_and_round_trip(saved, tiny_backbone):
    bank, d, manifest = saved
    listing = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert listing == ["alcohol/module.json", "alcohol/tokens.safetensors", "betting/module.json",
                       "betting/tokens.safetensors", "manifest.json"]  # fmt: skip
    back = load_bank(d, tiny_backbone.fingerprint)
    assert back.categories == bank.categories and back.placement == bank.placement and back.max_norm == bank.max_norm
    for c in bank.categories:
        assert torch.equal(back.vectors[c], bank.vectors[c].detach())
    meta = read_meta(d / "alcohol")
    assert meta.trained_with == ["alcohol", "betting"] and meta.training_run_id == "run-1"
    assert meta.fingerprint["digest"] == tiny_backbone.fingerprint.digest and manifest["m"] == 2


def test_tampered_tensor_is_refused(saved, tiny_backbone):
    _, d, _ = saved
    f = d / "betting" / "tokens.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="sha256"):
        load_module(d / "betting", tiny_backbone.fingerprint)
    with pytest.raises(IntegrityError):
        load_bank(d)


def test_other_backbone_is_refused(saved, tiny_tok):
    _, d, _ = saved
    other = from_model(tiny_model(len(tiny_tok), seed=1), tiny_tok, "tiny-llama")  # same shapes, other weights
    with pytest.raises(IncompatibleBackboneError, match="embedding_sha256"):
        load_module(d / "alcohol", other.fingerprint)
    with pytest.raises(IncompatibleBackboneError):
        load_bank(d, other.fingerprint)


def test_unknown_key_warns_missing_key_raises(saved):
    _, d, _ = saved
    mj = d / "alcohol" / "module.json"
    meta = json.loads(mj.read_text())
    mj.write_text(json.dumps({**meta, "from_the_future": 1}))
    with pytest.warns(UserWarning, match="from_the_future"):
        read_meta(d / "alcohol")
    del meta["sha256"]
    mj.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="sha256"):
        read_meta(d / "alcohol")
    with pytest.raises(ArtifactError, match="not a bank"):
        load_bank(d / "alcohol")


def test_compose_separately_loaded_modules_checks_compatibility(saved, tmp_path, tiny_backbone):
    _, d, _ = saved
    bank = bank_from_modules([d / "betting", d / "alcohol"], tiny_backbone.fingerprint)
    assert bank.categories == ["betting", "alcohol"]
    other = ControlTokenBank.build(BankConfig(categories=("horror",), m=3, init="normal"), tiny_backbone.embeddings)
    save_bank(other, tmp_path / "b3", fingerprint=tiny_backbone.fingerprint, init="normal")
    with pytest.raises(ArtifactError, match=r"\['m'\]"):
        bank_from_modules([d / "alcohol", tmp_path / "b3" / "horror"])
