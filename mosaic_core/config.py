"""The recipe: one YAML file (pipelines/configs/<backbone>/<recipe>.yaml) parsed into the frozen sections of
mosaic_core.sections, put together in a Recipe that runs `validate` -- every rule spanning fields or sections -- on
construction. Every problem is reported together (`ConfigError.problems`). Pipelines parse YAML with `load_recipe`;
Ray workers receive `Recipe.to_dict()` and rebuild it with `from_dict`. A recipe names its evaluation budget
(`eval`); the budget itself (EvalBudget) is read by the evaluation stage."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mosaic_core.errors import ConfigError
from mosaic_core.sections import (
    DEFAULT_REFUSAL,
    BankConfig,
    Decision,
    DecisionLoss,
    Depth,
    EvalBudget,
    GateConfig,
    InitMethod,
    LossConfig,
    NegMix,
    NegSource,
    Phase,
    Placement,
    Positions,
    SamplerConfig,
    TeacherConfig,
    TrainConfig,
    _phases,
    with_overrides,
)

__all__ = [
    "DEFAULT_REFUSAL",
    "BankConfig",
    "Decision",
    "DecisionLoss",
    "Depth",
    "EvalBudget",
    "GateConfig",
    "InitMethod",
    "LossConfig",
    "NegMix",
    "NegSource",
    "Phase",
    "Placement",
    "Positions",
    "Recipe",
    "SamplerConfig",
    "TeacherConfig",
    "TrainConfig",
    "from_dict",
    "load_recipe",
    "parse_overrides",
    "recipe_from_dict",
    "validate",
    "with_overrides",
]

T = TypeVar("T")
_NESTED: dict[tuple[type, str], type] = {(SamplerConfig, "neg_mix"): NegMix, (LossConfig, "decision"): Decision}
"""Section keys whose value is a frozen mapping of its own, built from plain data by from_dict."""


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a config dataclass from plain data (parsed YAML or `to_dict` output): lists become tuples, nested
    sections (`sampler.neg_mix`, `train.phases`) their frozen types; unknown keys and bad values are reported together."""
    if cls is Recipe:
        return recipe_from_dict(data)  # type: ignore[return-value]
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    problems = [f"unknown key {k!r} (known: {sorted(names)})" for k in sorted(set(data) - names)]
    fixed: dict[str, Any] = {}
    for k, v in data.items():
        if k not in names:
            continue
        nested = _NESTED.get((cls, k))
        if nested is not None and isinstance(v, Mapping):
            try:
                v = from_dict(nested, dict(v))
            except ConfigError as e:
                problems += [f"{k}.{p}" for p in e.problems]
                continue
        elif cls is TrainConfig and k == "phases":
            v, bad = _phases(v)
            problems += bad
        elif isinstance(v, list):
            v = tuple(v)
        fixed[k] = v
    try:
        built = cls(**fixed)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems, cls.__name__)
    return built


def _plain(value: Any) -> Any:
    """Config values as YAML/JSON data: dataclasses and mappings to dicts, tuples to lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """One YAML recipe (pipelines/configs/*.yaml): everything a run needs, validated together."""

    name: str
    """Run name prefix."""
    backbone: str = "smollm2-135m-instruct"
    """HF id, local dir, or the embedded default."""
    dataset: str = "data/mosaic-bench"
    """The requests: MOSAIC-bench's JSONL file/dir (or parquet), local path or fsspec URI."""
    seed: int = 0
    """The run's one seed: bank initialisation, example sampling (draw d: seed + 1000 d), shuffling."""
    eval: str = "cpu"
    """The evaluation budget `mosaic run` and `mosaic eval --run` use: a name in pipelines/configs/eval/ or a
    YAML file of EvalBudget keys."""
    bank: BankConfig
    """Categories, m, init, placement."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Order-based combination sampling."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Refusal template, lambda, teacher top-k."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Counterfactual teacher generation."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    gate: GateConfig = field(default_factory=GateConfig)
    """Module gates (none by default)."""

    def __post_init__(self) -> None:
        problems = validate(self)
        if problems:
            raise ConfigError(problems, "recipe")

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what `resolved_config.yaml` holds and `from_dict(Recipe, ...)` reads)."""
        return _plain(self)  # type: ignore[no-any-return]

    def phase(self, epoch: int) -> tuple[LossConfig, float]:
        """The loss and learning rate that epoch `epoch` (0-based) trains with (`train.phases`)."""
        start = 0
        for p in self.train.phases:
            if epoch < start + p.epochs:
                return with_overrides(self.loss, p.loss), float(p.lr)
            start += p.epochs
        last = self.train.phases[-1]
        return with_overrides(self.loss, last.loss), float(last.lr)


def validate(recipe: Recipe, ds_config: Mapping[str, Any] | None = None) -> list[str]:
    """Every rule that spans fields or sections of a recipe (and, given one, the DeepSpeed config it trains with):
    what is wrong, as `section.key: why` lines; [] when nothing is. Single fields check themselves on construction."""
    bank, train, loss = recipe.bank, recipe.train, recipe.loss
    problems = []
    if bank.positions == "keep" and bank.depth != "deep":
        problems.append("bank.positions: keep is for deep banks (input tokens are positions of the sequence themselves)")
    if bank.depth == "deep" and bank.placement != "before_assistant":
        problems.append("bank.depth: deep tokens are key/value positions after the request: placement must be before_assistant")
    if train.request_dropout and bank.placement != "before_assistant":
        problems.append("train.request_dropout: needs bank.placement before_assistant (tokens are hidden in the cached request)")
    # Deep blocks, dropout, gates and EMA read the request's cached keys/values or the whole bank on every rank:
    # ZeRO-3 trains without that cache and shards the bank.
    stage = (ds_config or {}).get("zero_optimization", {}).get("stage", train.zero_stage)
    whose = "the DeepSpeed config asks for 3" if ds_config and stage != train.zero_stage else "train.zero_stage is 3"
    for key, on in (
        ("bank.depth: deep", bank.depth == "deep"),
        ("train.ema", train.ema),
        ("train.request_dropout", train.request_dropout),
        ("gate.layers", recipe.gate.layers),
    ):
        if on and stage == 3:
            problems.append(f"{key} needs ZeRO stage 1 or 2 ({whose})")
    for i, p in enumerate(train.phases):
        try:
            with_overrides(loss, p.loss)
        except ConfigError as e:
            problems.extend(f"train.phases[{i}].loss.{q}" for q in e.problems)
        except TypeError as e:  # an unknown loss key
            problems.append(f"train.phases[{i}].loss: {e}")
    if recipe.gate.recency is not None and not recipe.gate.layers:
        problems.append("gate.recency: weighs the gates' features, but gate.layers is empty (no gates)")
    if not isinstance(recipe.seed, int) or isinstance(recipe.seed, bool) or recipe.seed < 0:
        problems.append(f"seed: {recipe.seed!r} must be an integer >= 0")
    if not isinstance(recipe.eval, str) or not recipe.eval.strip():
        problems.append("eval: name an evaluation budget (pipelines/configs/eval/<name>.yaml) or a YAML file")
    return problems


_SECTIONS: dict[str, type] = {
    "bank": BankConfig,
    "sampler": SamplerConfig,
    "loss": LossConfig,
    "teacher": TeacherConfig,
    "train": TrainConfig,
    "gate": GateConfig,
}


RETIRED: dict[str, frozenset[str]] = {
    "bank": frozenset({"init_scale"}),
    "loss": frozenset({"neg_weight_by_source", "refusal_tokens"}),
}
"""Keys that have left the schema, dropped with a warning where an older run's resolved_config.yaml still holds them
(its bank can still be evaluated and served); any other unknown key is an error."""

_OLD_DECISION = {"decision": "kind", "decision_weight": "weight", "decision_tokens": "tokens", "margin_delta": "delta"}


def _old_loss(loss: dict[str, Any], notes: list[str], problems: list[str], where: str) -> dict[str, Any]:
    """A loss mapping (or a phase's overrides) of the flat decision keys and `ce_weight`, in today's shape."""
    loss = dict(loss)
    flat = {new: loss.pop(old) for old, new in _OLD_DECISION.items() if old in loss and not isinstance(loss[old], dict)}
    if flat:
        loss["decision"] = flat
        notes.append(f"{where}.decision_* -> {where}.decision")
    if "ce_weight" in loss:
        if loss.pop("ce_weight") != 1.0:
            problems.append(f"{where}.ce_weight: left the schema (the cross-entropy terms weigh 1); this run cannot load")
        notes.append(f"{where}.ce_weight")
    return loss


def migrate(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """An older run's resolved_config.yaml in today's shape: (raw, what moved or went, what cannot be carried over).
    `dataset` for `benchmark`, one seed for the three sections' seeds, the schedule in `train.phases`, the decision
    loss as one mapping, the evaluation budget by name (an inline one is replaced by the default budget)."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    notes: list[str] = []
    problems: list[str] = []
    if "benchmark" in raw:  # "benchmark" means performance scripts (benchmarks/) only
        raw.setdefault("dataset", raw.pop("benchmark"))
        notes.append("benchmark -> dataset")
    for key, gone in RETIRED.items():
        section = raw.get(key)
        if isinstance(section, dict) and gone & set(section):
            notes += [f"{key}.{k}" for k in sorted(gone & set(section))]
            raw[key] = {k: v for k, v in section.items() if k not in gone}
    seeds = {
        f"{k}.seed": raw[k].pop("seed") for k in ("bank", "sampler", "train") if isinstance(raw.get(k), dict) and "seed" in raw[k]
    }
    if seeds:
        if len(set(seeds.values())) > 1:
            problems.append(f"{', '.join(seeds)}: differ ({sorted(set(seeds.values()))}); a recipe has one seed now")
        raw.setdefault("seed", next(iter(seeds.values())))
        notes.append(f"{', '.join(seeds)} -> seed")
    sampler = raw.get("sampler")
    if isinstance(sampler, dict) and "neg_ratio" in sampler:
        if sampler.pop("neg_ratio") != 1.0:
            problems.append("sampler.neg_ratio: left the schema (one negative per positive); this run cannot load")
        notes.append("sampler.neg_ratio")
    gate = raw.get("gate")
    if isinstance(gate, dict) and "threshold" in gate:
        if gate.pop("threshold") != 0.5:
            problems.append("gate.threshold: left the schema (logistic gates fire at p >= 0.5); this run cannot load")
        notes.append("gate.threshold")
    if isinstance(raw.get("loss"), dict):
        raw["loss"] = _old_loss(raw["loss"], notes, problems, "loss")
    train = raw.get("train")
    if isinstance(train, dict) and ({"epochs", "lr", "max_steps", "report_every"} & set(train)):
        epochs, lr = train.pop("epochs", 8), train.pop("lr", 0.01)
        for k in ("max_steps", "report_every"):
            if train.pop(k, None) is not None:
                notes.append(f"train.{k} (now a `mosaic train` option)")
        phases = train.get("phases") or [{"epochs": epochs}]
        if sum(int(p.get("epochs") or 0) for p in phases) != epochs:
            problems.append(f"train.epochs: {epochs}, but the schedule is train.phases now (their epochs add up)")
        train["phases"] = [
            {**p, "lr": lr if p.get("lr") is None else p["lr"]}
            | ({"loss": _old_loss(p["loss"], notes, problems, f"train.phases[{i}].loss")} if p.get("loss") else {})
            for i, p in enumerate(phases)
        ]
        notes.append("train.epochs, train.lr -> train.phases")
    if isinstance(raw.get("eval"), dict):
        raw.pop("eval")
        notes.append("eval (an inline budget: the default budget now)")
    return raw, notes, problems


def recipe_from_dict(raw: dict[str, Any], where: str = "recipe") -> Recipe:
    """Build a Recipe from plain data (parsed YAML), reporting every problem of every section at once."""
    import warnings

    raw, moved, problems = migrate(raw)
    if moved:
        warnings.warn(f"{where}: written by an older mosaic: {'; '.join(moved)}", stacklevel=2)
    top = {f.name for f in dataclasses.fields(Recipe)}
    for k in sorted(set(raw) - top):
        problems.append(f"{k}: unknown key (known: {sorted(top)})")
    built: dict[str, Any] = {k: raw[k] for k in ("name", "backbone", "dataset", "seed", "eval") if k in raw}
    if "name" not in raw:
        problems.append("name: required")
    for key, cls in _SECTIONS.items():
        section = raw.get(key)
        section = {} if section is None else section
        if not isinstance(section, dict):
            problems.append(f"{key}: must be a mapping, got {type(section).__name__}")
            continue
        try:
            built[key] = from_dict(cls, section)
        except ConfigError as e:
            problems.extend(f"{key}.{p}" for p in e.problems)
        except TypeError as e:  # a required field missing
            problems.append(f"{key}: {e}")
    if not problems:
        try:
            return Recipe(**built)
        except ConfigError as e:
            problems += e.problems
    raise ConfigError(problems, where)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--set key.sub=value` strings -> {key.sub: YAML-parsed value}, what load_recipe's `overrides` takes."""
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError([f"--set {item!r}: expected key=value"], "overrides")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def load_recipe(path: str | Any, overrides: dict[str, Any] | None = None) -> Recipe:
    """Parse a YAML recipe; `overrides` maps dotted keys (`bank.m`) to values applied before validation."""
    import copy
    from pathlib import Path

    import yaml

    raw = yaml.safe_load(Path(path).read_text()) or {}
    raw = copy.deepcopy(raw)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return recipe_from_dict(raw, str(path))
