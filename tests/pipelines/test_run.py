"""`mosaic run` end to end in one process tree on the tiny model: data -> train -> eval -> register, with `--bank`
evaluating and registering another bank in a run directory of its own (the path `make demo` takes)."""

import json

import pytest

from mosaic_core.artifact import read_meta, save_bank
from mosaic_core.backbone import load_backbone
from mosaic_core.bank import ControlTokenBank
from mosaic_core.config import BankConfig
from pipelines.run import bank_run_dir, main
from tests.pipelines.conftest import write_tiny_dataset, write_tiny_mmlu, write_tiny_recipe

pytestmark = pytest.mark.slow


def test_mosaic_run_with_a_given_bank(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    dataset = write_tiny_dataset(tmp_path / "dataset", per=(3, 2, 2))
    mmlu = write_tiny_mmlu(tmp_path / "mmlu.jsonl", n=1)
    recipe = write_tiny_recipe(
        tmp_path / "tiny.yaml",
        tiny_model_dir,
        dataset,
        name="tiny-run",
        bank={"categories": ["alcohol", "betting"]},
        sampler={"per_subset": 2},
        teacher={"max_new_tokens": 3},
        train={"num_workers": 1},
        eval={"max_order": 2, "fast_cap": 2, "gen_requests": 1, "max_new_tokens": 2, "mmlu": str(mmlu), "xstest_gen": 0},
    )
    bb = load_backbone(str(tiny_model_dir))
    given = ControlTokenBank.build(BankConfig(categories=("alcohol", "betting"), m=2, init="normal"), bb.embeddings, seed=7)
    save_bank(given, tmp_path / "given", fingerprint=bb.fingerprint, init="normal", training_run_id="the-full-recipe")
    args = dict(name=None, out=str(tmp_path / "run"), overrides=[], xstest=None, bank=str(tmp_path / "given"), workers=1)
    run = main(str(recipe), **args)
    out = capsys.readouterr().out
    assert "evaluated and registered in" in out and "registered: " in out and "stage times:" in out
    assert run.parent == tmp_path and run.name.startswith("given-") and run.name != "run"
    assert read_meta(run / "bank" / "alcohol").training_run_id == "the-full-recipe"  # the given bank, not the quick one
    assert (tmp_path / "run" / "bank" / "manifest.json").is_file()  # the run's own bank stays where it trained
    assert (run / "eval" / "report.json").is_file() and (run / "resolved_config.yaml").is_file()
    assert set(json.loads((run / "timings.json").read_text())) == {"data", "train", "eval", "register"}
    first = json.loads((run / "bank" / "registered.json").read_text())

    # Again with the same bank (a second `make demo`): the same directory and MLflow run, new versions.
    assert main(str(recipe), **args) == run
    again = json.loads((run / "bank" / "registered.json").read_text())
    assert {c: int(r["version"]) for c, r in again.items()} == {c: int(r["version"]) + 1 for c, r in first.items()}
    assert {r["run_id"] for r in again.values()} == {r["run_id"] for r in first.values()}

    # A changed bank (after `make train`) gets a directory of its own instead of clashing with the registered one.
    changed = ControlTokenBank.build(BankConfig(categories=("alcohol", "betting"), m=2, init="normal"), bb.embeddings, seed=8)
    save_bank(changed, tmp_path / "given", fingerprint=bb.fingerprint, init="normal", training_run_id="retrained")
    other = bank_run_dir(tmp_path / "given", tmp_path, tmp_path / "run" / "resolved_config.yaml")
    assert other != run and read_meta(other / "bank" / "alcohol").training_run_id == "retrained"
