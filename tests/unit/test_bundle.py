import dataclasses
import hashlib

import pytest

from mosaic_core.artifact import read_meta, save_bank
from mosaic_core.bank import ControlTokenBank
from mosaic_core.bundle import (
    ModuleRef,
    ModuleURI,
    backbone_slug,
    check_bundle,
    manifest_digest,
    parse_module_uri,
    registered_name,
)
from mosaic_core.config import BankConfig
from mosaic_core.errors import ArtifactError, IncompatibleBackboneError

BASE = ("alcohol", "betting")


def ref(
    category,
    run="run-A",
    *,
    label=None,
    backbone="fp1",
    placement="before_assistant",
    m=2,
    d=32,
    extends=None,
    bank_digest=None,
    trained_with=BASE,
):
    return ModuleRef(
        label=label or f"{category}@{run}",
        category=category,
        backbone_digest=backbone,
        placement=placement,
        m=m,
        d=d,
        training_run_id=run,
        extends=extends,
        bank_digest=bank_digest,
        trained_with=trained_with,
    )


def test_same_training_run_is_accepted_in_training_order():
    out = check_bundle([ref("betting"), ref("alcohol")])
    assert [r.category for r in out] == ["alcohol", "betting"]  # the bank's order, not the request's


def test_different_training_runs_are_refused_naming_both_versions():
    with pytest.raises(ArtifactError, match="not trained together") as e:
        check_bundle([ref("alcohol", "run-A", label="mosaic.x.alcohol v1"), ref("betting", "run-B", label="mosaic.x.betting v4")])
    assert "mosaic.x.alcohol v1" in str(e.value) and "mosaic.x.betting v4" in str(e.value)
    assert not isinstance(e.value, IncompatibleBackboneError)


def test_expansion_is_accepted_either_way_round_and_goes_last():
    horror = ref("horror", "run-C", extends="run-A", trained_with=(*BASE, "horror"))
    for refs in ([horror, ref("alcohol"), ref("betting")], [ref("betting"), horror, ref("alcohol")]):
        assert [r.category for r in check_bundle(refs)] == ["alcohol", "betting", "horror"]


def test_extends_may_name_the_manifest_digest():
    base = ref("alcohol", run=None, bank_digest="abcd")
    assert [r.category for r in check_bundle([ref("horror", "run-C", extends="abcd"), base])] == ["alcohol", "horror"]


def test_two_expansions_of_one_base_are_refused_together():
    h = ref("horror", "run-C", extends="run-A")
    s = ref("sex", "run-D", extends="run-A")
    check_bundle([ref("alcohol"), h])
    with pytest.raises(ArtifactError, match="neither extends"):
        check_bundle([ref("alcohol"), h, s])


def test_modules_without_any_bank_name_are_not_assumed_joint():
    with pytest.raises(ArtifactError):
        check_bundle([ref("alcohol", run=None), ref("betting", run=None)])
    check_bundle([ref("alcohol", run=None, bank_digest="d1"), ref("betting", run=None, bank_digest="d1")])


def test_backbone_mismatch_is_an_incompatible_backbone_error():
    with pytest.raises(IncompatibleBackboneError, match="different backbones"):
        check_bundle([ref("alcohol"), ref("betting", backbone="fp2")])
    with pytest.raises(IncompatibleBackboneError, match="served fp9"):
        check_bundle([ref("alcohol")], expected_digest="fp9")


def test_shape_and_placement_mismatches_are_all_reported_together():
    with pytest.raises(ArtifactError) as e:
        check_bundle([ref("alcohol"), ref("betting", m=5, placement="prefix"), ref("horror", d=64)])
    msg = str(e.value)
    assert (
        "3 problem(s)" in msg and "placement 'before_assistant' vs 'prefix'" in msg and "m 2 vs 5" in msg and "d 32 vs 64" in msg
    )


def test_duplicate_category_and_empty_bundle_refused():
    with pytest.raises(ArtifactError, match="both category 'alcohol'"):
        check_bundle([ref("alcohol", label="a v1"), ref("alcohol", label="a v2")])
    with pytest.raises(ArtifactError, match="at least one"):
        check_bundle([])


def test_from_meta_uses_recomputed_fingerprint_digest(tmp_path, tiny_backbone):
    bank = ControlTokenBank.build(BankConfig(categories=BASE, m=2, init="normal"), tiny_backbone.embeddings)
    save_bank(bank, tmp_path, fingerprint=tiny_backbone.fingerprint, init="normal", training_run_id="run-A", extends="base0")
    r = ModuleRef.from_meta(read_meta(tmp_path / "betting"), "betting v1", bank_digest="dd")
    assert (r.backbone_digest, r.category, r.m, r.d) == (
        tiny_backbone.fingerprint.digest,
        "betting",
        2,
        tiny_backbone.embeddings.shape[1],
    )
    assert r.banks == {"run-A", "dd"} and r.extends == "base0" and r.trained_with == BASE


def test_names_uris_and_manifest_digest():
    assert backbone_slug("meta-llama/Llama-3.1-8B-Instruct") == "llama-3.1-8b-instruct"
    assert registered_name("smollm2-135m-instruct", "alcohol") == "mosaic.smollm2-135m-instruct.alcohol"
    with pytest.raises(ArtifactError):
        backbone_slug("///")
    assert parse_module_uri("models:/mosaic.b.alcohol@production") == ModuleURI("mosaic.b.alcohol", alias="production")
    assert parse_module_uri("models:/mosaic.b.alcohol/12") == ModuleURI("mosaic.b.alcohol", version="12")
    assert str(ModuleURI("n", version="3")) == "models:/n/3"
    for bad in ("mosaic.b.alcohol", "models:/mosaic.b.alcohol", "models:/a/b/c", "runs:/x/y", "models:/n/latest"):
        with pytest.raises(ArtifactError, match="not a module URI"):
            parse_module_uri(bad)


def test_manifest_digest_names_the_saved_bank(tmp_path, tiny_backbone):
    bank = ControlTokenBank.build(BankConfig(categories=BASE, m=2, init="normal"), tiny_backbone.embeddings)
    save_bank(bank, tmp_path / "a", fingerprint=tiny_backbone.fingerprint, init="normal", training_run_id="run-A")
    save_bank(bank, tmp_path / "b", fingerprint=tiny_backbone.fingerprint, init="normal", training_run_id="run-B")
    digest = manifest_digest(tmp_path / "a")
    assert digest == hashlib.sha256((tmp_path / "a" / "manifest.json").read_bytes()).hexdigest()
    assert digest != manifest_digest(tmp_path / "b")
    with pytest.raises(ArtifactError, match="not a bank"):
        manifest_digest(tmp_path)


def test_refs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref("alcohol").m = 3  # type: ignore[misc]


def test_bundle_imports_no_registry_or_serving_framework():
    import subprocess
    import sys

    code = "import sys, mosaic_core.bundle; print(sorted({'ray', 'mlflow', 'fastapi', 'deepspeed'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
