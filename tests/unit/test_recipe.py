from pathlib import Path

import pytest

from mosaic_core.config import Recipe, from_dict, load_recipe, recipe_from_dict
from mosaic_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p for p in (ROOT / "pipelines" / "configs").glob("*/*.yaml") if p.parent.name != "eval")
BUDGETS = sorted((ROOT / "pipelines" / "configs" / "eval").glob("*.yaml"))


def test_the_recipes_ship_by_backbone():
    names = {str(p.relative_to(ROOT / "pipelines" / "configs")) for p in SHIPPED}
    assert names >= {"smollm2-135m/cpu.yaml", "smollm2-135m/quick.yaml", "llama3-8b/gpu.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_recipe_validates_and_round_trips(path):
    r = load_recipe(path)
    assert isinstance(r, Recipe) and r.bank.categories == ("addiction", "alcohol", "betting", "horror", "sex")
    assert from_dict(Recipe, r.to_dict()) == r


@pytest.mark.parametrize("path", BUDGETS, ids=lambda p: p.stem)
def test_every_named_evaluation_budget_loads_and_every_recipe_names_one(path):
    from pipelines.eval import load_budget

    assert load_budget(path.stem) == load_budget(str(path))
    assert {load_recipe(p).eval for p in SHIPPED} <= {p.stem for p in BUDGETS}
    with pytest.raises(ConfigError, match="'cpux': no such budget file .* named budgets: \\['cpu'"):
        load_budget("cpux")
    with pytest.raises(ConfigError, match="unknown key 'fast_capp'"):
        load_budget(path.stem, {"fast_capp": 3})


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
    assert (r.sampler.per_subset, r.sampler.max_order, r.train.epochs, r.train.phases[0].lr, r.loss.kl_lambda) == (
        100,
        5,
        8,
        0.01,
        1.0,
    )


def test_overrides_and_all_errors_together(tmp_path):
    r = load_recipe(ROOT / "pipelines" / "configs" / "smollm2-135m" / "cpu.yaml", {"bank.m": 2, "seed": 3})
    assert r.bank.m == 2 and r.seed == 3
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(
            {
                "bank": {"categories": ["alcohol"], "m": 0},
                "train": {"phases": [{"epochs": 1, "lr": 5}], "zero_stage": 4},
                "teacher": [],
                "extra": 1,
            }
        )
    text = str(e.value)
    for needle in (
        "name: required",
        "bank.m: 0",
        "train.phases[0].lr: 5",
        "train.zero_stage",
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
        "loss": {"decision": {"kind": "margin", "weight": 1.0}, "max_answer_tokens": 1},
        "train": {
            "phases": [
                {"epochs": 2, "lr": 0.01},
                {"epochs": 1, "lr": 0.001, "loss": {"max_answer_tokens": 16, "decision": {"weight": 0.5}}},
            ]
        },
    }
    r = recipe_from_dict(raw)
    assert r.train.epochs == 3
    assert [(r.phase(e)[0].max_answer_tokens, r.phase(e)[1]) for e in range(3)] == [(1, 0.01), (1, 0.01), (16, 0.001)]
    last = r.phase(2)[0].decision
    assert (last.kind, last.weight, last.tokens) == ("margin", 0.5, 4)  # a phase's decision keys merge into the loss's
    assert r.phase(0)[0] == r.loss and from_dict(Recipe, r.to_dict()) == r
    bad = {
        **raw,
        "train": {
            "phases": [
                {"epochs": 2, "lr": 3, "loss": {"decision": {"delta": -1}, "topk": 8}},
                {"epochs": 1, "loss": {"nope": 1}, "extra": 0},
            ],
        },
    }
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(bad)
    for needle in (
        "phases[0].lr: 3",
        "phases[0].loss: ['topk'] cannot change",
        "phases[1]: unknown keys ['extra']",
        "phases[1]: lr is required",
    ):
        assert needle in str(e.value), needle
    bad["train"]["phases"] = [
        {"epochs": 2, "lr": 0.01, "loss": {"decision": {"delta": -1}}},
        {"epochs": 1, "lr": 0.01, "loss": {"nope": 1}},
    ]
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(bad)
    for needle in ("train.phases[0].loss.delta: -1", "train.phases[1].loss:"):
        assert needle in str(e.value), needle
    with pytest.raises(ConfigError, match="phases: at least one phase"):
        recipe_from_dict({**raw, "train": {"phases": []}})


def test_an_older_runs_resolved_config_loads_as_the_recipe_it_was():
    """Runs resolved before the seeds became one, the schedule moved into `train.phases`, the decision loss became one
    mapping and the evaluation budget left the recipe still load (their banks can still be evaluated and served):
    the CPU recipe as it was resolved then is today's CPU recipe, and it hashes to the same data."""
    from pipelines.data import content_hash

    today = load_recipe(ROOT / "pipelines" / "configs" / "smollm2-135m" / "cpu.yaml")
    old = today.to_dict()
    old.pop("seed"), old.pop("eval")
    old["bank"]["seed"] = old["sampler"]["seed"] = old["train"]["seed"] = 0
    old["sampler"]["neg_ratio"] = 1.0
    decision = old["loss"].pop("decision")
    old["loss"].update(
        decision=decision["kind"],
        decision_weight=decision["weight"],
        decision_tokens=decision["tokens"],
        margin_delta=decision["delta"],
        ce_weight=1.0,
    )
    old["train"].update(epochs=4, lr=0.01, max_steps=None, report_every=20)
    old["eval"] = {"max_order": 5, "fast_cap": 12, "fast_rule": "greedy"}
    with pytest.warns(UserWarning, match="written by an older mosaic: .*bank.seed, sampler.seed, train.seed -> seed"):
        migrated = recipe_from_dict(old)
    assert migrated == today and content_hash(migrated, "d", "f") == content_hash(today, "d", "f")
    old["train"]["seed"], old["loss"]["ce_weight"], old["train"]["epochs"] = 1, 0.0, 9
    with pytest.raises(ConfigError) as e, pytest.warns(UserWarning):
        recipe_from_dict(old)
    for needle in ("sampler.seed, train.seed: differ", "loss.ce_weight: left the schema", "train.epochs: 9, but the schedule"):
        assert needle in str(e.value), needle
