"""The recipe's sections (`bank`, `sampler`, `loss`, `teacher`, `gate`, `train`) and the evaluation budget: frozen,
typed, each checking its own fields on construction and reporting every problem together (`ConfigError.problems`).
Rules that span fields or sections, and the Recipe that puts the sections together, are in mosaic_core.config."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal, get_args

from mosaic_core.errors import ConfigError

Placement = Literal["prefix", "before_assistant"]
InitMethod = Literal["text", "vocab", "normal"]
Depth = Literal["input", "deep"]
Positions = Literal["shift", "keep"]
NegSource = Literal["inactive", "general", "lookalike"]
DecisionLoss = Literal["bce", "margin"]

DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass(frozen=True, kw_only=True)
class BankConfig:
    """Shape and placement of the control-token bank."""

    categories: tuple[str, ...]
    """Registry (canonical) order of the modules: lower-case names, unique."""
    m: int = 5
    """Control vectors per category (the paper: m < 10; MOSAIC-2 and MOSAIC-5)."""
    init: InitMethod = "text"
    """`text`: embeddings of the category's description tokens; `vocab`: random vocabulary rows;
    `normal`: N(0, std of the embedding matrix)."""
    placement: Placement = "before_assistant"
    """`prefix`: at the very start of the templated sequence (after BOS); `before_assistant`: after the last
    user turn, right before the assistant header, so the vectors attend to the request."""
    max_norm_ratio: float | None = 1.25
    """Cap each vector's L2 norm at this multiple of the mean embedding-row norm (None: no cap)."""
    depth: Depth = "input"
    """`input`: a module's m tokens are rows of the input embedding (the paper); `deep`: they are m positions of
    the KV cache written at every layer (a key before RoPE and a value per key/value head: prefix tuning), so the
    answer reads a module through each layer's attention. `deep` needs `before_assistant` placement and is
    initialised from the `input` bank `init` builds (its tokens' keys and values). See DeepTokenBank."""
    positions: Positions = "shift"
    """Position ids of a deep block and of what follows it. `shift`: the block takes the positions after the
    request and the assistant header and answer move back by its length, as input tokens would. `keep`: the block's
    keys share the positions of the request's last tokens, so everything after the block keeps the positions it has
    without modules and a block that attends to nothing leaves the bare model's answer unchanged. Deep banks only."""

    def __post_init__(self) -> None:
        problems = []
        if not self.categories:
            problems.append("categories: at least one category is required")
        for c in self.categories:
            if not isinstance(c, str) or not _NAME.match(c):
                problems.append(f"categories: {c!r} must match {_NAME.pattern}")
        if len(set(self.categories)) != len(self.categories):
            problems.append(f"categories: duplicates in {list(self.categories)}")
        if not 1 <= self.m <= 64:
            problems.append(f"m: {self.m} must be in 1..64")
        if self.init not in get_args(InitMethod):
            problems.append(f"init: {self.init!r} must be one of {get_args(InitMethod)}")
        if self.placement not in get_args(Placement):
            problems.append(f"placement: {self.placement!r} must be one of {get_args(Placement)}")
        if self.max_norm_ratio is not None and not self.max_norm_ratio > 0:
            problems.append(f"max_norm_ratio: {self.max_norm_ratio} must be > 0 or null")
        if self.depth not in get_args(Depth):
            problems.append(f"depth: {self.depth!r} must be one of {get_args(Depth)}")
        if self.positions not in get_args(Positions):
            problems.append(f"positions: {self.positions!r} must be one of {get_args(Positions)}")
        if problems:
            raise ConfigError(problems, "BankConfig")


@dataclass(frozen=True, kw_only=True)
class NegMix:
    """Relative weight of each negative source (`sampler.neg_mix`), renormalised over the sources a subset has; a
    source left out of the mapping weighs 0."""

    inactive: float = 0.0
    """Other categories' targets: their modules are off, so they must be answered."""
    general: float = 0.0
    """General requests."""
    lookalike: float = 0.0
    """Harmless look-alikes of the subset's own categories ("virgin mojito for a kids' party")."""

    def __post_init__(self) -> None:
        weights = (self.inactive, self.general, self.lookalike)
        if any(not isinstance(w, (int, float)) or w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise ConfigError([f"weights must be >= 0 with at least one > 0, got {weights}"], "NegMix")


@dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    """Order-based task sampling (docs/architecture.md): a budget per order, split evenly over that order's subsets."""

    per_subset: int = 100
    """Positives per subset at order 1; every order gets the same total N1 = per_subset * K, split evenly over its
    subsets (N1 // C(K, r) each; all K on gets N1)."""
    max_order: int = 3
    """Largest active-set size sampled (the paper trains orders 1-4)."""
    neg_mix: NegMix = NegMix(inactive=0.4, general=0.3, lookalike=0.3)
    """Relative weight of each negative source, `{inactive, general, lookalike}` (see NegMix)."""
    draws: int = 1
    """Independent draws of the training examples (draw d: the recipe's seed + 1000 d); epoch e trains on draw e mod draws, so
    later epochs see other requests of the train split at the same epoch size (deep tokens overfit one fixed draw:
    docs/experiments/deep-prompt-probe.md). The teacher answers every draw's negatives once."""
    framed_share: float = 0.0
    """Share of the training requests (positives and negatives alike, chosen by a hash of the request) whose text
    is wrapped in one of the train split's framing templates (role-play, fiction, research, ...: data/framings/), so
    the modules learn that the request decides, not the framing. The teacher answers framed negatives as any other."""
    val_share: float = 0.0
    """Share of the val split's requests the training examples may draw from too (chosen by a hash of each request's
    id: the same ones every run); the per-epoch validation sample is drawn from the rest only, so keep-best never
    scores a request training saw. More requests to learn from where the test shortfall is generalisation
    (docs/experiments/deep-prompt-probe.md, "Train split against test split"). 0: train on the train split alone."""

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.val_share <= 0.8:
            problems.append(f"val_share: {self.val_share} must be in [0, 0.8] (the rest of val picks the best epoch)")
        if not 0.0 <= self.framed_share <= 0.8:
            problems.append(f"framed_share: {self.framed_share} must be in [0, 0.8] (most requests stay plain)")
        if not 1 <= self.draws <= 100:
            problems.append(f"draws: {self.draws} must be in [1, 100]")
        if self.per_subset < 1:
            problems.append(f"per_subset: {self.per_subset} must be >= 1")
        if self.max_order < 1:
            problems.append(f"max_order: {self.max_order} must be >= 1")
        if not isinstance(self.neg_mix, NegMix):
            problems.append(f"neg_mix: {self.neg_mix!r} must be a mapping of {list(get_args(NegSource))} to weights")
        if problems:
            raise ConfigError(problems, "SamplerConfig")


@dataclass(frozen=True, kw_only=True)
class Decision:
    """The refusal-decision term of the loss (`loss.decision`; beyond the paper, whose loss is `weight: 0`): it puts
    the weight on where the refusal is decided -- its first tokens, which evaluation's greedy flag reads -- instead
    of spreading it over every token of the refusal."""

    kind: DecisionLoss = "bce"
    """`bce`: binary CE on p = exp(mean log-prob of the refusal's first `tokens` tokens); positives push p up,
    negatives (one extra short probe row each) push it down. `margin`: softplus margins on the flag itself --
    positives: each of the first `tokens` refusal tokens beats the best other token by `delta`; negatives: the
    weakest loses by it, except where the teacher's own answer starts with the refusal (there the base model
    refuses, and that is the target). What made deep tokens selective (docs/experiments/deep-prompt-probe.md)."""
    weight: float = 0.0
    """Its weight beside the cross-entropy terms; 0: off (the paper's loss)."""
    tokens: int = 4
    """Refusal tokens it covers (evaluation's greedy flag reads 3)."""
    delta: float = 2.0
    """Logit margin of `kind: margin`."""

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in get_args(DecisionLoss):
            problems.append(f"kind: {self.kind!r} must be one of {get_args(DecisionLoss)}")
        if not 0 <= self.weight <= 100:
            problems.append(f"weight: {self.weight} must be in [0, 100]")
        if not 1 <= self.tokens <= 64:
            problems.append(f"tokens: {self.tokens} must be in 1..64")
        if not 0 <= self.delta <= 50:
            problems.append(f"delta: {self.delta} must be in [0, 50]")
        if problems:
            raise ConfigError(problems, "Decision")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """The loss (docs/architecture.md): positives -> CE on the refusal; negatives -> CE on the teacher answer +
    lambda * KL; both + the refusal decision term."""

    refusal_template: str = DEFAULT_REFUSAL
    """The one refusal text: training target for positives and what the template judge matches."""
    kl_lambda: float = 1.0
    """Weight of the forward KL(teacher || student) on negatives (the paper: 1.0; 0.8-1.2 best)."""
    topk: int = 16
    """Teacher log-probs kept per response position; the rest of the mass is one tail bucket."""
    decision: Decision = Decision()
    """`{kind, weight, tokens, delta}`: see Decision."""
    pos_weight: float = 1.0
    """Weight of positives' loss (CE + decision) against negatives': > 1 trades OR for DSR."""
    max_answer_tokens: int = 0
    """Train negatives on the teacher answer's first N tokens only (0 = all of them): CPU recipes trade the
    tail of the answer for steps, since the refusal is decided in the first tokens."""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.decision, Decision):
            problems.append(f"decision: {self.decision!r} must be a mapping {{kind, weight, tokens, delta}}")
        if not 0 < self.pos_weight <= 100:
            problems.append(f"pos_weight: {self.pos_weight} must be in (0, 100]")
        if self.max_answer_tokens < 0:
            problems.append(f"max_answer_tokens: {self.max_answer_tokens} must be >= 0 (0 = no cut)")
        if not self.refusal_template.strip():
            problems.append("refusal_template: must not be empty")
        if not 0 <= self.kl_lambda <= 100:
            problems.append(f"kl_lambda: {self.kl_lambda} must be in [0, 100]")
        if not 1 <= self.topk <= 1024:
            problems.append(f"topk: {self.topk} must be in 1..1024")
        if problems:
            raise ConfigError(problems, "LossConfig")


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    """The counterfactual teacher: the frozen model's own greedy answer to each negative prompt, no tokens."""

    max_new_tokens: int = 48
    """Answer length cap; the KL covers every answer position."""
    batch_size: int = 16
    """Prompts per forward in the teacher actor."""
    actors: int = 1
    """Ray Data actors (one model copy each; on GPU one per GPU)."""

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.max_new_tokens <= 1024:
            problems.append(f"max_new_tokens: {self.max_new_tokens} must be in 1..1024")
        if not 1 <= self.batch_size <= 1024:
            problems.append(f"batch_size: {self.batch_size} must be in 1..1024")
        if self.actors < 1:
            problems.append(f"actors: {self.actors} must be >= 1")
        if problems:
            raise ConfigError(problems, "TeacherConfig")


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    """Module gates (mosaic_core.gate): where `layers` is set, training first fits the categories' gates on the train
    requests' features, and a module is then inserted only for requests its gate fires on."""

    kind: str = "logistic"
    """`logistic`: one gate per category against the rest, firing at p >= 0.5; `softmax`: one fit over the
    categories and "no category", a category's gate firing where it is the most likely."""
    layers: tuple[int, ...] = ()
    """Hidden states (0: embeddings, i: after layer i) whose mean over the request's tokens the gates read; () no gates."""
    weight_decay: float = 0.01
    """L2 on the gate's weights over standardised features."""
    recency: float | None = None
    """Weigh a request's tokens by exp(-k / recency), k the distance from its end, instead of a plain mean (None): a
    framing's words, which mostly come first, then count less than the request's own question."""
    framed_copies: int = 0
    """Besides the run's train requests, fit on this many copies of each plain one wrapped in a train-split framing
    template (role-play, fiction, research, ...): a framing's words then count for no category."""

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in ("logistic", "softmax"):
            problems.append(f"kind: {self.kind!r} must be 'logistic' or 'softmax'")
        if any(not isinstance(x, int) or x < 0 for x in self.layers) or len(set(self.layers)) != len(self.layers):
            problems.append(f"layers: {self.layers} must be distinct layer indices >= 0")
        if not 0 <= self.weight_decay <= 100:
            problems.append(f"weight_decay: {self.weight_decay} must be in [0, 100]")
        if self.recency is not None and not 0 < self.recency <= 4096:
            problems.append(f"recency: {self.recency} must be in (0, 4096] tokens, or null for a plain mean")
        if not 0 <= self.framed_copies <= 8:
            problems.append(f"framed_copies: {self.framed_copies} must be in 0..8")
        if problems:
            raise ConfigError(problems, "GateConfig")


@dataclass(frozen=True, kw_only=True)
class Phase:
    """One phase of `train.phases`: consecutive epochs with their own learning rate and loss overrides."""

    epochs: int
    """Epochs the phase lasts."""
    lr: float
    """Its Adam learning rate (the paper: 0.01)."""
    loss: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    """`loss` keys this phase sets to other values (read-only; `decision` a mapping of the Decision keys it
    changes); checked against the loss section by `validate`."""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.epochs, int) or self.epochs < 1:
            problems.append(f"epochs: {self.epochs!r} must be an integer >= 1")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            problems.append(f"lr: {self.lr!r} must be in (0, 1)")
        if not isinstance(self.loss, MappingProxyType):
            problems.append("loss: must be a read-only mapping of loss keys (types.MappingProxyType; from_dict converts YAML)")
        elif fixed := sorted({"refusal_template", "topk"} & set(self.loss)):
            # the refusal's ids and the teacher's top-k are fixed for the whole run (data stage, validation)
            problems.append(f"loss: {fixed} cannot change between phases")
        if problems:
            raise ConfigError(problems, "Phase")


def with_overrides(loss: LossConfig, overrides: Mapping[str, Any]) -> LossConfig:
    """`loss` with a phase's overrides applied (`decision` merged key by key); ConfigError/TypeError as the
    constructors raise them."""
    over = dict(overrides)
    if isinstance(over.get("decision"), Mapping):
        over["decision"] = replace(loss.decision, **over["decision"])
    return replace(loss, **over)


def _phases(raw: Any) -> tuple[tuple[Phase, ...], list[str]]:
    """`train.phases` from plain data, and what is wrong with it (each problem prefixed `phases[i]`)."""
    if isinstance(raw, tuple) and all(isinstance(p, Phase) for p in raw):
        return raw, []
    if not isinstance(raw, (list, tuple)) or not all(isinstance(p, Mapping) for p in raw):
        return (), [f"phases: {raw!r} must be a list of mappings {{epochs, lr, loss}}"]
    if not raw:
        return (), ["phases: at least one phase {epochs, lr} is required"]
    phases, problems = [], []
    for i, p in enumerate(raw):
        unknown = sorted(set(p) - {"epochs", "lr", "loss"})
        if unknown:
            problems.append(f"phases[{i}]: unknown keys {unknown} (known: epochs, lr, loss)")
        loss = p.get("loss") or {}
        if "lr" not in p:
            problems.append(f"phases[{i}]: lr is required")
            continue
        try:
            if isinstance(loss, Mapping):  # read-only all the way down: `decision` is a mapping of its own
                loss = MappingProxyType({k: MappingProxyType(dict(v)) if isinstance(v, Mapping) else v for k, v in loss.items()})
            phases.append(Phase(epochs=p.get("epochs"), lr=p.get("lr"), loss=loss))
        except ConfigError as e:
            problems += [f"phases[{i}].{q}" for q in e.problems]
    return tuple(phases), problems


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation of the token bank (the backbone never trains)."""

    phases: tuple[Phase, ...] = (Phase(epochs=8, lr=0.01),)
    """The schedule: consecutive phases, each `{epochs: N, lr: X, loss: {overrides}}` (the paper: one phase of 8
    epochs at 0.01). An epoch trains with `loss` updated by its phase's overrides and at its phase's learning rate,
    e.g. a lower rate for the last epochs. Resuming picks the phase from the epoch."""
    batch_size: int = 16
    """Global batch (split over workers)."""
    num_workers: int = 2
    """Ray Train workers (data parallel)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 1, 2, or 3 for backbones that must be sharded."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 on GPU; fp32 (or bf16 with AMX) on CPU."""
    ema: float = 0.0
    """> 0: validate, keep and save an exponential moving average of the bank's trainable modules (this decay per
    step) instead of the raw parameters the optimizer moves -- steadier banks when validation swings from epoch to
    epoch. 0: off. ZeRO-1/2 only (under ZeRO-3 each rank holds a shard of the bank)."""
    val_examples: int = 64
    """Validation examples scored after every epoch (half positives, half negatives, as the val split has them):
    the best epoch is chosen on these; more rows, a steadier choice (64 rows: about 6 points of noise)."""
    request_dropout: float = 0.0
    """> 0: each positive training row hides this share of its request's tokens from the control block and the answer
    (a new draw every step; negatives, whose target is the teacher's answer to the whole request, validation and the
    teacher see whole requests): augmentation against modules that memorise the
    train split's words (docs/experiments/deep-prompt-probe.md: a deep bank meets the targets on its train requests, not
    on test ones). Needs
    the prefix cache: placement before_assistant, zero_stage 1 or 2."""

    @property
    def epochs(self) -> int:
        """Epochs in all: the phases' sum."""
        return sum(p.epochs for p in self.phases)

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.request_dropout < 0.9:
            problems.append(f"request_dropout: {self.request_dropout} must be in [0, 0.9)")
        if not 2 <= self.val_examples <= 100_000:
            problems.append(f"val_examples: {self.val_examples} must be in [2, 100000]")
        if not 0 <= self.ema < 1:
            problems.append(f"ema: {self.ema} must be in [0, 1)")
        if self.batch_size < 1:
            problems.append(f"batch_size: {self.batch_size} must be >= 1")
        if self.num_workers < 1:
            problems.append(f"num_workers: {self.num_workers} must be >= 1")
        if self.zero_stage not in (1, 2, 3):
            problems.append(f"zero_stage: {self.zero_stage} must be 1, 2 or 3")
        if not self.phases or not isinstance(self.phases, tuple) or not all(isinstance(p, Phase) for p in self.phases):
            problems.append(f"phases: {self.phases!r} must be a tuple of Phase (from plain data: mosaic_core.config.from_dict)")
        if self.precision not in ("fp32", "bf16"):
            problems.append(f"precision: {self.precision!r} must be fp32 or bf16")
        if problems:
            raise ConfigError(problems, "TrainConfig")


@dataclass(frozen=True, kw_only=True)
class EvalBudget:
    """How much evaluation to do (`mosaic eval --budget`, a recipe's `eval`): every rate is measured, the caps only
    bound the requests per cell. Named budgets are YAML files in pipelines/configs/eval/."""

    max_order: int = 5
    """Orders 1..max_order (the paper's Table 1: 1-4; 5 = all five on, the children's-app case)."""
    fast_cap: int | None = 40
    """Requests per (subset, group) for the teacher-forced score; null = all."""
    gen_subsets: int = 1
    """Subsets per order whose answers are generated and judged."""
    gen_requests: int = 10
    """Requests per (subset, group) generated and judged."""
    max_new_tokens: int = 24
    """Length of judged generations (stated in the report)."""
    mmlu: str | None = "data/mmlu/mmlu-mini.jsonl"
    """Frozen MMLU subset for utility; null = skip."""
    mmlu_limit: int | None = None
    """Use only the first N questions (seeded order); null = all."""
    xstest_cap: int | None = None
    """XSTest safe prompts scored per condition; null = all 250."""
    xstest_gen: int = 40
    """XSTest safe prompts generated and judged per condition."""
    baselines: tuple[str, ...] = ("base", "in_context")
    """Baselines measured on the same requests."""
    judge: str = "template+prefix"
    """mosaic_core.judge kind (an `openai` judge is configured on the CLI)."""
    batch_size: int = 16
    """Rows per forward in the evaluation actor."""
    fast_tokens: int = 3
    """Refusal tokens the fast flag reads (3 = "I'm sorry" for the default template): a row is refused where each is
    the argmax of one teacher-forced forward, i.e. greedy decoding starts with them (it agreed with judged
    generations on 180/180 test rows of a CPU bank: docs/experiments/fast-score-agreement.md)."""
    fidelity_subsets: int = 2
    """Single-module subsets whose general answers are compared with the bare model's (order-1 fidelity)."""
    fidelity_requests: int | None = 40
    """General requests per order-1 fidelity subset; null = all."""
    fidelity_all_cap: int | None = None
    """General requests compared with every module on (order-K fidelity); null = every general request."""
    fidelity_words: int = 8
    """Words of the bare model's answer that must open the answer with modules on."""
    retention_cap: int | None = None
    """Factual questions scored for retention (none / each module / all on); null = all, 0 = skip."""
    framings: str | None = "data/framings/framings.jsonl"
    """Framing templates (role-play, fiction, ...): DSR / OR / look-alike OR per family and order with requests
    wrapped in the family's templates of the evaluated split (val: val's; test, test2: test2's); null = skip."""
    framed_cap: int | None = 20
    """Requests per (family, order, group) for the framed scores (one subset per order); null = all, 0 = skip."""

    def __post_init__(self) -> None:
        problems = []
        for k in ("fidelity_requests", "fidelity_all_cap"):
            v = getattr(self, k)
            if v is not None and v < 0:
                problems.append(f"{k}: {v} must be >= 0 or null")
        if self.framed_cap is not None and self.framed_cap < 0:
            problems.append(f"framed_cap: {self.framed_cap} must be >= 0 or null")
        if self.retention_cap is not None and self.retention_cap < 0:
            problems.append(f"retention_cap: {self.retention_cap} must be >= 0 or null")
        if self.fidelity_subsets < 0 or not 1 <= self.fidelity_words <= 64:
            problems.append("fidelity_subsets must be >= 0 and fidelity_words in 1..64")
        if self.max_order < 1:
            problems.append(f"max_order: {self.max_order} must be >= 1")
        for k in ("fast_cap", "mmlu_limit", "xstest_cap"):
            v = getattr(self, k)
            if v is not None and v < 1:
                problems.append(f"{k}: {v} must be >= 1 or null")
        if self.gen_subsets < 0 or self.gen_requests < 0 or self.xstest_gen < 0:
            problems.append("gen_subsets, gen_requests, xstest_gen must be >= 0")
        if not 1 <= self.max_new_tokens <= 1024:
            problems.append(f"max_new_tokens: {self.max_new_tokens} must be in 1..1024")
        bad = sorted(set(self.baselines) - {"base", "in_context"})
        if bad:
            problems.append(f"baselines: unknown {bad} (known: base, in_context)")
        if not 1 <= self.fast_tokens <= 64:
            problems.append(f"fast_tokens: {self.fast_tokens} must be in 1..64")
        if problems:
            raise ConfigError(problems, "EvalBudget")
