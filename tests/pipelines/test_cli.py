"""`mosaic bank ...`: the bank utilities as a user runs them (tiny artifacts, no backbone load)."""

import pytest
import torch

from mosaic_core.artifact import load_bank, save_bank
from mosaic_core.bank import ControlTokenBank
from pipelines.cli import main as mosaic


def _bank(tmp_path, tiny_backbone, name, init="bank:runs/stage8/bank"):
    bank = ControlTokenBank(d=tiny_backbone.embeddings.shape[1], m=2)
    bank.add("alcohol", torch.randn(bank.module_shape))
    save_bank(bank, tmp_path / name, fingerprint=tiny_backbone.fingerprint, init=init)
    return bank, str(tmp_path / name)


def test_bank_average_writes_the_mean_and_maps_mistakes_to_one_message(tmp_path, tiny_backbone, capsys):
    (a, da), (b, db) = _bank(tmp_path, tiny_backbone, "s0"), _bank(tmp_path, tiny_backbone, "s1")
    mosaic(["bank", "average", da, db, "--out", str(tmp_path / "mean")])
    assert "wrote the mean of 2 banks (['alcohol'], depth input)" in capsys.readouterr().out
    got = load_bank(tmp_path / "mean", tiny_backbone.fingerprint).vectors["alcohol"]
    assert torch.allclose(got, (a.vectors["alcohol"] + b.vectors["alcohol"]).detach() / 2)

    _, other = _bank(tmp_path, tiny_backbone, "cold", init="text")
    with pytest.raises(SystemExit) as e:
        mosaic(["bank", "average", da, other, "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mosaic bank: error: banks") and "init (the bank they were trained from)" in err
