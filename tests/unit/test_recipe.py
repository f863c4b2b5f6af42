from pathlib import Path

import pytest

from mosaic_core.config import Recipe, from_dict, load_recipe, recipe_from_dict
from mosaic_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "pipelines" / "configs").glob("*/*.yaml"))


def test_the_recipes_ship_by_backbone():
    names = {str(p.relative_to(ROOT / "pipelines" / "configs")) for p in SHIPPED}
    assert names >= {"smollm2-135m/cpu.yaml", "smollm2-135m/quick.yaml", "llama3-8b/gpu.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_recipe_validates_and_round_trips(path):
    r = load_recipe(path)
    assert isinstance(r, Recipe) and r.bank.categories == ("addiction", "alcohol", "betting", "horror", "sex")
    assert from_dict(Recipe, r.to_dict()) == r


def test_the_shipped_bank_names_the_recipe_make_train_resolves():
    """`make train` reproduces banks/smollm2-cpu: its provenance holds the hash of cpu.yaml as the data stage resolves
    it (resolved_config.yaml) -- a schema change that rewrites the resolved recipe must update the provenance too."""
    import hashlib
    import json

    import yaml

    recipe = load_recipe(ROOT / "pipelines" / "configs" / "smollm2-135m" / "cpu.yaml")
    resolved = yaml.safe_dump(recipe.to_dict(), sort_keys=False).encode()
    prov = json.loads((ROOT / "banks" / "smollm2-cpu" / "provenance.json").read_text())
    assert prov["recipe"] == recipe.name and prov["recipe_sha256"] == hashlib.sha256(resolved).hexdigest()


def test_paper_recipe_matches_the_paper():
    r = load_recipe(ROOT / "pipelines" / "configs" / "llama3-8b" / "gpu.yaml")
    assert (r.sampler.per_subset, r.sampler.max_order, r.train.epochs, r.train.lr, r.loss.kl_lambda) == (100, 5, 8, 0.01, 1.0)


def test_overrides_and_all_errors_together(tmp_path):
    r = load_recipe(ROOT / "pipelines" / "configs" / "smollm2-135m" / "cpu.yaml", {"bank.m": 2, "train.max_steps": 3})
    assert r.bank.m == 2 and r.train.max_steps == 3
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(
            {
                "bank": {"categories": ["alcohol"], "m": 0},
                "train": {"lr": 5, "zero_stage": 4, "report_every": 0},
                "teacher": [],
                "extra": 1,
            }
        )
    text = str(e.value)
    for needle in (
        "name: required",
        "bank.m: 0",
        "train.lr",
        "train.zero_stage",
        "train.report_every: 0",
        "teacher: must be a mapping",
        "extra: unknown key",
    ):
        assert needle in text, needle


def test_request_dropout_needs_the_cached_request():
    raw = {"name": "x", "bank": {"categories": ["alcohol"], "placement": "prefix"}, "train": {"request_dropout": 0.15}}
    with pytest.raises(ConfigError, match="train.request_dropout: needs bank.placement before_assistant"):
        recipe_from_dict(raw)
    raw["bank"]["placement"] = "before_assistant"
    assert recipe_from_dict(raw).train.request_dropout == 0.15


def test_phases_schedule_loss_and_lr_by_epoch_and_are_checked():
    raw = {
        "name": "x",
        "bank": {"categories": ["alcohol"]},
        "loss": {"decision_weight": 1.0, "decision": "margin", "ce_weight": 0.0, "max_answer_tokens": 1},
        "train": {
            "epochs": 3,
            "lr": 0.01,
            "phases": [{"epochs": 2}, {"epochs": 1, "lr": 0.001, "loss": {"max_answer_tokens": 16}}],
        },
    }
    r = recipe_from_dict(raw)
    assert [(r.phase(e)[0].max_answer_tokens, r.phase(e)[1]) for e in range(3)] == [(1, 0.01), (1, 0.01), (16, 0.001)]
    assert r.phase(0)[0] == r.loss and from_dict(Recipe, r.to_dict()) == r
    bad = {
        **raw,
        "train": {
            "epochs": 4,
            "phases": [
                {"epochs": 2, "lr": 3, "loss": {"margin_delta": -1, "topk": 8}},
                {"epochs": 1, "loss": {"nope": 1}, "extra": 0},
            ],
        },
    }
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(bad)
    for needle in ("phases[0].lr: 3", "phases[0].loss: ['topk'] cannot change", "phases[1]: unknown keys ['extra']"):
        assert needle in str(e.value), needle
    bad["train"]["phases"] = [{"epochs": 2, "loss": {"margin_delta": -1}}, {"epochs": 1, "loss": {"nope": 1}}]
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(bad)
    for needle in ("their epochs add up to 3, train.epochs is 4",):
        assert needle in str(e.value), needle
    bad["train"]["epochs"] = 3
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(bad)
    for needle in ("train.phases[0].loss.margin_delta: -1", "train.phases[1].loss:"):
        assert needle in str(e.value), needle
