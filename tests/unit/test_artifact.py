import json

import pytest
import torch

from mosaic_core.artifact import average_banks, bank_from_modules, load_bank, load_module, read_meta, save_bank
from mosaic_core.backbone import from_model
from mosaic_core.bank import ControlTokenBank, DeepTokenBank
from mosaic_core.config import BankConfig
from mosaic_core.errors import ArtifactError, IncompatibleBackboneError, IntegrityError
from mosaic_core.testing import tiny_model


@pytest.fixture
def saved(tmp_path, tiny_backbone):
    bank = ControlTokenBank.build(BankConfig(categories=("alcohol", "betting"), m=2, init="normal"), tiny_backbone.embeddings)
    manifest = save_bank(bank, tmp_path / "bank", fingerprint=tiny_backbone.fingerprint, init="normal", training_run_id="run-1")
    return bank, tmp_path / "bank", manifest


def test_exact_file_set_and_round_trip(saved, tiny_backbone):
    bank, d, manifest = saved
    listing = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert listing == [
        "alcohol/module.json",
        "alcohol/tokens.safetensors",
        "betting/module.json",
        "betting/tokens.safetensors",
        "manifest.json",
    ]
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


def _seed_bank(tmp_path, fp, name, module_shape, cats=("alcohol", "betting"), init="bank:runs/stage8/bank", deep=None):
    """A bank as a seed of one training stage writes it: same start (`init`), its own values."""
    bank = deep if deep is not None else ControlTokenBank(d=module_shape[-1], m=module_shape[0])
    for c in cats:
        bank.add(c, torch.randn(module_shape))
    save_bank(bank, tmp_path / name, fingerprint=fp, init=init, training_run_id=f"run-{name}")
    return bank, tmp_path / name


def test_average_of_seeds_is_their_elementwise_mean(tmp_path, tiny_backbone):
    fp, shape = tiny_backbone.fingerprint, (2, tiny_backbone.embeddings.shape[1])
    banks, dirs = zip(*(_seed_bank(tmp_path, fp, f"seed{i}", shape) for i in range(3)))
    manifest = average_banks(dirs, tmp_path / "mean")
    back = load_bank(tmp_path / "mean", fp)
    assert back.categories == ["alcohol", "betting"] and manifest["categories"] == ["alcohol", "betting"]
    for c in back.categories:
        want = (banks[0].vectors[c] + banks[1].vectors[c] + banks[2].vectors[c]).detach() / 3
        assert torch.allclose(back.vectors[c], want, atol=1e-6) and not torch.allclose(back.vectors[c], banks[0].vectors[c])
    assert read_meta(tmp_path / "mean" / "alcohol").init == "average:" + ",".join(str(d) for d in dirs)
    average_banks([dirs[0], dirs[0]], tmp_path / "same")  # a bank averaged with itself comes back bit-identical
    assert torch.equal(load_bank(tmp_path / "same").vectors["betting"], banks[0].vectors["betting"].detach())


def test_average_of_deep_seeds_keeps_the_deep_shape(tmp_path, tiny_backbone):
    fp, model = tiny_backbone.fingerprint, tiny_backbone.model
    shape = DeepTokenBank.for_model(model, 2).module_shape
    a, da = _seed_bank(tmp_path, fp, "a", shape, deep=DeepTokenBank.for_model(model, 2))
    b, db = _seed_bank(tmp_path, fp, "b", shape, deep=DeepTokenBank.for_model(model, 2))
    assert average_banks([da, db], tmp_path / "mean")["depth"] == "deep"
    back = load_bank(tmp_path / "mean", fp)
    assert isinstance(back, DeepTokenBank) and back.module_shape == shape
    assert torch.allclose(back.vectors["alcohol"], (a.vectors["alcohol"] + b.vectors["alcohol"]).detach() / 2)


def test_average_refuses_banks_that_are_not_seeds_of_one_stage(tmp_path, tiny_backbone, tiny_tok):
    fp, shape = tiny_backbone.fingerprint, (2, tiny_backbone.embeddings.shape[1])
    _, a = _seed_bank(tmp_path, fp, "a", shape)
    with pytest.raises(ArtifactError, match="at least two banks"):
        average_banks([a], tmp_path / "out")
    _, cats = _seed_bank(tmp_path, fp, "cats", shape, cats=("betting", "alcohol"))
    with pytest.raises(ArtifactError, match=r"differ in \['categories'\]"):
        average_banks([a, cats], tmp_path / "out")
    _, start = _seed_bank(tmp_path, fp, "start", shape, init="text")
    with pytest.raises(ArtifactError, match=r"differ in \['init"):
        average_banks([a, start], tmp_path / "out")
    _, wide = _seed_bank(tmp_path, fp, "wide", (3, shape[1]))
    with pytest.raises(ArtifactError, match="module_shape"):
        average_banks([a, wide], tmp_path / "out")
    other = from_model(tiny_model(len(tiny_tok), seed=1), tiny_tok, "tiny-llama")
    _, elsewhere = _seed_bank(tmp_path, other.fingerprint, "elsewhere", shape)
    with pytest.raises(IncompatibleBackboneError):
        average_banks([a, elsewhere], tmp_path / "out")
    with pytest.raises(ArtifactError, match="not empty"):
        average_banks([a, a], tmp_path / "cats")
    with pytest.raises(ArtifactError, match="not a bank"):
        average_banks([a, tmp_path / "nope"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
