import dataclasses

import pytest

from mosaic_core.config import (
    BankConfig,
    Decision,
    EvalBudget,
    GateConfig,
    LossConfig,
    NegMix,
    Phase,
    Recipe,
    SamplerConfig,
    TeacherConfig,
    TrainConfig,
    from_dict,
    recipe_from_dict,
    validate,
)
from mosaic_core.errors import ConfigError


def test_bank_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        BankConfig(categories=("Alcohol", "x", "x"), m=0, init="zeros", placement="middle", max_norm_ratio=-1)  # type: ignore[arg-type]
    text = str(e.value)
    assert len(e.value.problems) == 6
    for needle in ("'Alcohol'", "duplicates", "m: 0", "init", "placement", "max_norm_ratio"):
        assert needle in text


def test_sampler_and_loss_configs_reject_bad_values():
    with pytest.raises(ConfigError, match=r"neg_mix.unknown key 'jailbreak'"):
        from_dict(SamplerConfig, {"neg_mix": {"inactive": 1.0, "jailbreak": 1.0}})
    with pytest.raises(ConfigError, match="neg_mix: .* must be a mapping"):
        SamplerConfig(neg_mix={"inactive": 1.0})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="neg_mix.weights must be >= 0 with at least one > 0"):
        from_dict(SamplerConfig, {"neg_mix": {"inactive": 0.0}})
    partial = from_dict(SamplerConfig, {"neg_mix": {"general": 2.0}}).neg_mix
    assert partial == NegMix(general=2.0) and partial.inactive == partial.lookalike == 0.0  # a source left out weighs 0
    with pytest.raises(ConfigError, match="per_subset"):
        SamplerConfig(per_subset=0)
    with pytest.raises(ConfigError, match=r"draws: 0 must be in \[1, 100\]"):
        SamplerConfig(draws=0)
    with pytest.raises(ConfigError, match=r"decision.delta: -1 must be in \[0, 50\]"):
        from_dict(LossConfig, {"decision": {"kind": "margin", "delta": -1}})
    with pytest.raises(ConfigError, match="decision.unknown key 'margin_delta'"):
        from_dict(LossConfig, {"decision": {"margin_delta": 2.0}})
    with pytest.raises(ConfigError, match="refusal_template"):
        LossConfig(refusal_template="  ")
    with pytest.raises(ConfigError, match=r"ema: 1.0 must be in \[0, 1\)"):
        TrainConfig(ema=1.0)
    with pytest.raises(ConfigError, match="val_examples: 1 must be"):
        TrainConfig(val_examples=1)
    with pytest.raises(ConfigError, match=r"request_dropout: 0.9 must be in \[0, 0.9\)"):
        TrainConfig(request_dropout=0.9)
    with pytest.raises(ConfigError, match=r"val_share: 0.9 must be in \[0, 0.8\]"):
        SamplerConfig(val_share=0.9)
    assert TrainConfig(ema=0.99).ema == 0.99


def test_cross_field_rules_are_one_function_the_recipe_runs():
    base = {"name": "x", "bank": {"categories": ["alcohol"]}}
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(
            {
                **base,
                "eval": " ",
                "train": {
                    "ema": 0.99,
                    "request_dropout": 0.2,
                    "zero_stage": 3,
                    "phases": [{"epochs": 1, "lr": 0.01, "loss": {"decision": {"tokens": 0}}}],
                },
            }
        )
    for needle in (
        "eval: name an evaluation budget",
        "train.ema needs ZeRO stage 1 or 2 (train.zero_stage is 3)",
        "train.request_dropout needs ZeRO stage 1 or 2",
        "train.phases[0].loss.tokens: 0 must be in 1..64",
    ):
        assert needle in str(e.value), needle
    ok = recipe_from_dict({**base, "loss": {"decision": {"weight": 1.0}}, "train": {"ema": 0.99}})
    assert validate(ok) == []
    # a DeepSpeed config the stage trains with is checked by the same rules
    assert validate(ok, {"zero_optimization": {"stage": 3}}) == [
        "train.ema needs ZeRO stage 1 or 2 (the DeepSpeed config asks for 3)"
    ]


def test_nested_sections_are_read_only():
    phases = [{"epochs": 1, "lr": 0.001, "loss": {"kl_lambda": 0.5}}]
    r = recipe_from_dict({"name": "x", "bank": {"categories": ["alcohol"]}, "train": {"phases": phases}})
    phase = r.train.phases[0]
    assert isinstance(phase, Phase) and phase.lr == 0.001
    with pytest.raises(TypeError):
        phase.loss["kl_lambda"] = 2.0  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.sampler.neg_mix.general = 1.0  # type: ignore[misc]
    assert r.to_dict()["train"]["phases"] == [{"epochs": 1, "lr": 0.001, "loss": {"kl_lambda": 0.5}}]
    assert r.to_dict()["sampler"]["neg_mix"] == {"inactive": 0.4, "general": 0.3, "lookalike": 0.3}
    with pytest.raises(ConfigError, match="loss: must be a read-only mapping"):
        Phase(epochs=1, lr=0.01, loss={"kl_lambda": 0.5})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="phases: .* must be a tuple of Phase"):
        TrainConfig(phases=({"epochs": 1},))  # type: ignore[arg-type]
    assert r.loss.decision == Decision() and r.to_dict()["loss"]["decision"] == {
        "kind": "bce",
        "weight": 0.0,
        "tokens": 4,
        "delta": 2.0,
    }


def test_round_trip_through_asdict_and_unknown_keys_rejected():
    cfg = BankConfig(categories=("alcohol", "betting"), m=2, placement="prefix")
    assert from_dict(BankConfig, dataclasses.asdict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown key 'mm'"):
        from_dict(BankConfig, {**dataclasses.asdict(cfg), "mm": 3})


def test_configs_are_frozen():
    from mosaic_core.config import recipe_from_dict

    cfg = LossConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kl_lambda = 2.0  # type: ignore[misc]
    raw = {
        "name": "x",
        "bank": {"categories": ["alcohol"]},
        "train": {"phases": [{"epochs": 1, "lr": 0.1, "loss": {"decision": {"weight": 0.5}}}]},
    }
    phase = recipe_from_dict(raw).train.phases[0]
    with pytest.raises(TypeError):  # read-only all the way down
        phase.loss["decision"]["weight"] = 2.0  # type: ignore[index]
    with pytest.raises(TypeError):
        phase.loss["kl_lambda"] = 2.0  # type: ignore[index]


@pytest.mark.parametrize(
    "cls",
    [BankConfig, NegMix, SamplerConfig, Decision, LossConfig, TeacherConfig, GateConfig, Phase, TrainConfig, EvalBudget, Recipe],
)
def test_every_field_is_documented(cls):
    from tests.scripts import load_script

    documented = load_script("recipe_keys").docstrings(cls)  # what docs/recipe-keys.md is generated from
    assert {f.name for f in dataclasses.fields(cls)} <= set(documented)


def test_gate_section_validates_and_needs_the_prefix_cache():
    from mosaic_core.config import GateConfig, recipe_from_dict

    with pytest.raises(ConfigError) as e:
        GateConfig(layers=(3, 3), weight_decay=-1, kind="mlp")
    assert len(e.value.problems) == 3
    assert GateConfig(recency=16.0).recency == 16.0  # a cross-field rule: validate() says it for the recipe (below)
    with pytest.raises(ConfigError, match="recency: 0.0 must be in"):
        GateConfig(layers=(10,), recency=0.0)
    with pytest.raises(ConfigError, match="kind: 'mlp' must be"):
        GateConfig(kind="mlp")
    old = {"name": "x", "bank": {"categories": ["alcohol"]}, "gate": {"layers": [10], "threshold": 0.5}}
    with pytest.warns(UserWarning, match="gate.threshold"):  # the probability logistic gates fire at, once a key
        assert recipe_from_dict(old).gate.kind == "logistic"
    with pytest.raises(ConfigError, match="gate.threshold: left the schema"):
        recipe_from_dict({**old, "gate": {"layers": [10], "threshold": 0.7}})
    assert GateConfig(layers=(10,), recency=16).recency == 16
    raw = {"name": "x", "bank": {"categories": ["alcohol"]}, "gate": {"layers": [10, 20]}, "train": {"zero_stage": 3}}
    with pytest.raises(ConfigError, match="gate.layers needs ZeRO stage 1 or 2"):
        recipe_from_dict(raw)
    raw["train"]["zero_stage"] = 2
    assert recipe_from_dict(raw).gate.layers == (10, 20)
    assert recipe_from_dict({"name": "x", "bank": {"categories": ["alcohol"]}}).gate.layers == ()
    with pytest.raises(ConfigError, match="gate.recency: .* gate.layers is empty"):
        recipe_from_dict({"name": "x", "bank": {"categories": ["alcohol"]}, "gate": {"recency": 16}})


def test_an_older_runs_retired_keys_are_dropped_with_a_warning_and_unknown_ones_still_fail():
    from mosaic_core.config import recipe_from_dict

    raw = {"name": "x", "bank": {"categories": ["alcohol"], "init_scale": 0.1}, "eval": {"fast_rule": "greedy"}}
    with pytest.warns(UserWarning, match=r"written by an older mosaic: bank.init_scale; eval \(an inline budget"):
        assert recipe_from_dict(raw).bank.categories == ("alcohol",)
    assert raw["bank"]["init_scale"] == 0.1  # the caller's data is not rewritten
    with pytest.raises(ConfigError, match="unknown key 'init_scal'"):
        recipe_from_dict({"name": "x", "bank": {"categories": ["alcohol"], "init_scal": 0.1}})
