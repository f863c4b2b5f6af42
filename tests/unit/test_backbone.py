import pytest
import torch

from mosaic_core.backbone import from_model, load_backbone, resolve
from mosaic_core.errors import BackboneError
from mosaic_core.testing import tiny_model


def test_load_local_dir_is_frozen_with_stable_fingerprint(tiny_model_dir):
    a = load_backbone(str(tiny_model_dir))
    b = load_backbone(str(tiny_model_dir))
    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())
    assert a.fingerprint == b.fingerprint and a.fingerprint.hidden_size == 32


def test_fingerprint_changes_with_weights_or_template(tiny_tok):
    a = from_model(tiny_model(len(tiny_tok), seed=0), tiny_tok, "t")
    b = from_model(tiny_model(len(tiny_tok), seed=1), tiny_tok, "t")
    assert a.fingerprint.digest != b.fingerprint.digest
    m = tiny_model(len(tiny_tok), seed=0)
    with torch.no_grad():
        m.get_input_embeddings().weight[0, 0] += 1e-3
    assert from_model(m, tiny_tok, "t").fingerprint.digest != a.fingerprint.digest


def test_bad_specs_raise_backbone_error(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        resolve("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="config.json"):
        resolve(str(tmp_path / "empty"))
