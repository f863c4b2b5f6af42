"""ControlTokenBank: an ordered registry of categories, each owning `m` learned vectors in the backbone's
input-embedding space; DeepTokenBank: the same registry whose m tokens are key/value positions at every layer.
The only trainable parameters of MOSAIC."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from mosaic_core.categories import describe
from mosaic_core.config import BankConfig, Depth, InitMethod, Placement, Positions
from mosaic_core.errors import DuplicateCategoryError, UnknownCategoryError
from mosaic_core.gate import fires


def init_vectors(
    embeddings: torch.Tensor,
    m: int,
    method: InitMethod,
    *,
    tokenizer: Any = None,
    text: str = "",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Initial values for one category's block.

    Args:
        embeddings: the backbone's input embedding matrix, shape (V, d).
        m: number of vectors.
        method: `text` (embeddings of `text`'s tokens, cycled or mean-pooled to m rows), `vocab`
            (random vocabulary rows) or `normal` (N(0, embeddings.std())).
    Returns:
        A new tensor of shape (m, d), fp32, detached.
    """
    emb = embeddings.detach().float()
    V, d = emb.shape
    if method == "text":
        if tokenizer is None or not text:
            raise ValueError("init 'text' needs a tokenizer and a description text")
        ids = tokenizer(text, add_special_tokens=False).input_ids
        rows = emb[torch.tensor(ids, dtype=torch.long)]
        # Split the description into m contiguous chunks and mean-pool each, so every vector starts as a
        # blend of the words describing the category (this kept vectors on the embedding scale; docs/architecture.md).
        chunks = torch.tensor_split(rows, m) if len(ids) >= m else [rows[i % len(ids)][None] for i in range(m)]
        return torch.stack([c.mean(0) for c in chunks]).clone()
    if method == "vocab":
        idx = torch.randint(0, V, (m,), generator=generator)
        return emb[idx].clone()
    if method == "normal":
        return torch.randn(m, d, generator=generator) * emb.std()
    raise ValueError(f"unknown init method {method!r}")


@runtime_checkable
class Bank(Protocol):
    """What every bank offers; training, composition, artifacts and serving use banks through this alone.
    ControlTokenBank (input embeddings) and DeepTokenBank (keys and values at every layer) implement it."""

    depth: ClassVar[Depth]
    d: int
    m: int
    placement: Placement
    positions: Positions
    max_norm: float | None
    categories: list[str]
    vectors: nn.ParameterDict
    gate_layers: tuple[int, ...]
    gate_recency: float | None

    @property
    def module_shape(self) -> tuple[int, ...]: ...
    @property
    def gates(self) -> dict[str, torch.Tensor]: ...
    def set_gate(self, category: str, gate: torch.Tensor, layers: Sequence[int], recency: float | None = None) -> None: ...
    def firing(self, active: Sequence[Sequence[str]], features: torch.Tensor | None) -> list[tuple[str, ...]]: ...
    def add(self, category: str, values: torch.Tensor) -> None: ...
    def canonical(self, active: Iterable[str]) -> tuple[str, ...]: ...
    def compose(self, active: Iterable[str]) -> torch.Tensor: ...
    def freeze(self, categories: Sequence[str] | None = None) -> None: ...
    def clamp_norms_(self) -> None: ...
    def num_trainable(self) -> int: ...
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


def _gate_name(category: str) -> str:
    return f"gate__{category}"


# What both banks share, as plain functions over a bank (neither bank derives from a common implementation; each is
# an nn.Module that meets `Bank` on its own and calls these). A bank keeps its categories in registry order, one
# trainable tensor of `module_shape` each in `vectors`, and an optional gate per category as a buffer `gate__<c>`.


def _registry_fields(bank: nn.Module, d: int, m: int, placement: Placement, max_norm: float | None) -> None:
    """The fields every bank starts with: no categories, no gates."""
    bank.d, bank.m, bank.placement, bank.max_norm = d, m, placement, max_norm
    bank.categories = []
    bank.vectors = nn.ParameterDict()
    bank.gate_layers = ()  # the backbone layers whose hidden states every gate reads (mosaic_core.gate); () without gates
    bank.gate_recency = None  # how the gates' features weigh a request's tokens (gate.request_features): None, a plain mean


def canonical(bank: Bank, active: Iterable[str]) -> tuple[str, ...]:
    """`active` deduplicated and sorted into registry order; unknown names raise UnknownCategoryError."""
    wanted = set(active)
    unknown = sorted(wanted - set(bank.categories))
    if unknown:
        raise UnknownCategoryError(unknown, bank.categories)
    # Canonical order makes {a, b} and {b, a} the same input: one composition per set, not per permutation.
    return tuple(c for c in bank.categories if c in wanted)


def gates_of(bank: Bank) -> dict[str, torch.Tensor]:
    """category -> its gate, for the modules that have one: (len(gate_layers) * d + 1,) weights then bias, or
    (rows, len(gate_layers) * d + 1) for a softmax gate (mosaic_core.gate.fires)."""
    return {c: getattr(bank, _gate_name(c)) for c in bank.categories if hasattr(bank, _gate_name(c))}


def set_gate(bank: Bank, category: str, gate: torch.Tensor, layers: Sequence[int], recency: float | None = None) -> None:
    """Give a module a gate (mosaic_core.gate.fit_gate's output, or its entry of fit_softmax_gates', over the hidden
    states at `layers`, weighted by `recency`): from then on the module is inserted only for requests its gate fires
    on. Every gate of a bank reads the same features."""
    (category,) = bank.canonical([category])
    layers = tuple(int(x) for x in layers)
    if not layers or (bank.gate_layers and layers != bank.gate_layers):
        raise ValueError(f"gate layers {layers}: this bank's gates read {bank.gate_layers or 'a non-empty tuple'}")
    if bank.gates and recency != bank.gate_recency:
        raise ValueError(f"gate recency {recency}: this bank's gates read recency {bank.gate_recency}")
    width = len(layers) * bank.d + 1
    if gate.ndim not in (1, 2) or gate.shape[-1] != width or gate.numel() == 0:
        raise ValueError(
            f"{category}: a gate over {len(layers)} layers of width {bank.d} is ({width},), or (rows, {width}) for a"
            f" softmax gate, not {tuple(gate.shape)}"
        )
    bank.gate_layers, bank.gate_recency = layers, recency
    bank.register_buffer(_gate_name(category), gate.detach().to(torch.float32).clone())


def firing(bank: Bank, active: Sequence[Sequence[str]], features: torch.Tensor | None) -> list[tuple[str, ...]]:
    """Per row, the active modules to insert: those without a gate, and those whose gate fires on the row's
    request features ((B, len(gate_layers) * d), mosaic_core.gate.request_features; None when no module of
    the bank has a gate)."""
    rows = [bank.canonical(a) for a in active]
    gates = bank.gates
    if not gates:
        return rows
    if features is None:
        raise ValueError("this bank's modules are gated: pass the requests' features")
    fired = {c: fires(g, features.to(g.device)).tolist() for c, g in gates.items()}
    return [tuple(c for c in row if c not in fired or fired[c][i]) for i, row in enumerate(rows)]


def add_module(bank: Bank, category: str, values: torch.Tensor) -> None:
    """Register a new category with initial values of shape `module_shape`."""
    if category in bank.vectors:
        raise DuplicateCategoryError(f"category {category!r} is already in the bank {bank.categories}")
    if tuple(values.shape) != bank.module_shape:
        raise ValueError(f"{category}: expected shape {bank.module_shape}, got {tuple(values.shape)}")
    bank.vectors[category] = nn.Parameter(values.detach().clone().float())
    bank.categories.append(category)


def freeze(bank: Bank, categories: Sequence[str] | None = None) -> None:
    """Stop training these categories (all when None): incremental expansion keeps old modules fixed."""
    for c in bank.canonical(categories if categories is not None else bank.categories):
        bank.vectors[c].requires_grad_(False)


def num_trainable(bank: Bank) -> int:
    """How many numbers of the bank train (frozen modules excluded)."""
    return sum(p.numel() for p in bank.parameters() if p.requires_grad)


def _empty_like_modules(bank: Bank, shape: tuple[int, ...]) -> torch.Tensor:
    """The block of the empty active set: zeros of `shape`, in the modules' dtype and device."""
    ref = next(iter(bank.vectors.values()), None)
    return torch.zeros(
        shape, dtype=ref.dtype if ref is not None else torch.float32, device=ref.device if ref is not None else None
    )


class ControlTokenBank(nn.Module):
    """Ordered categories -> (m, d) parameters; composition in canonical (registry) order."""

    depth: ClassVar[Depth] = "input"
    positions: Positions = "shift"
    """Input tokens always shift what follows them (BankConfig.positions is for deep banks)."""
    d: int
    m: int
    placement: Placement
    max_norm: float | None
    categories: list[str]
    vectors: nn.ParameterDict
    gate_layers: tuple[int, ...]
    gate_recency: float | None

    def __init__(self, d: int, m: int, placement: Placement = "before_assistant", max_norm: float | None = None):
        super().__init__()
        _registry_fields(self, d, m, placement, max_norm)

    @classmethod
    def build(cls, cfg: BankConfig, embeddings: torch.Tensor, tokenizer: Any = None, seed: int = 0) -> ControlTokenBank:
        """A bank for `cfg.categories`, initialised by `cfg.init` from the backbone's embeddings (V, d); `seed`
        draws `vocab` / `normal` initialisations."""
        mean_norm = embeddings.detach().float().norm(dim=-1).mean().item()
        max_norm = cfg.max_norm_ratio * mean_norm if cfg.max_norm_ratio else None
        bank = ControlTokenBank(d=embeddings.shape[1], m=cfg.m, placement=cfg.placement, max_norm=max_norm)
        gen = torch.Generator().manual_seed(seed)
        for c in cfg.categories:
            v = init_vectors(embeddings, cfg.m, cfg.init, tokenizer=tokenizer, text=describe(c), generator=gen)
            bank.add(c, v)
        bank.clamp_norms_()
        return bank

    @property
    def module_shape(self) -> tuple[int, ...]:
        """One module's tensor shape: (m, d)."""
        return (self.m, self.d)

    def compose(self, active: Iterable[str]) -> torch.Tensor:
        """The control block for an active set, shape (k*m, d); (0, d) for the empty set."""
        cats = self.canonical(active)
        if not cats:
            return _empty_like_modules(self, (0, self.d))
        return torch.cat([self.vectors[c] for c in cats], 0)

    @torch.no_grad()
    def clamp_norms_(self) -> None:
        """Project every trainable vector back into the ball of radius `max_norm` (no-op without a cap).

        Frozen modules are skipped: one sitting exactly on the cap would move by float rounding (~1e-9),
        changing its bytes and its sha256 (incremental expansion must keep old modules bit-identical)."""
        if self.max_norm is None:
            return
        for p in self.vectors.values():
            if not p.requires_grad:
                continue
            n = p.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            p.mul_(torch.clamp(self.max_norm / n, max=1.0))

    # The registry both banks keep: the plain functions above, bound as methods (no shared base class).
    gates = property(gates_of)
    set_gate = set_gate
    firing = firing
    add = add_module
    canonical = canonical
    freeze = freeze
    num_trainable = num_trainable

    def extra_repr(self) -> str:
        return f"categories={self.categories}, m={self.m}, d={self.d}, placement={self.placement!r}"


class DeepTokenBank(nn.Module):
    """Ordered categories -> (layers, 2, kv_heads, m, head_dim) parameters: per layer, m keys (before RoPE; [:, 0])
    and m values ([:, 1]) for each key/value head -- m positions of the KV cache written directly (prefix tuning,
    P-tuning v2) right after the request, instead of m input embeddings whose keys and values are whatever the
    frozen layers make of them. The answer reads a module through every layer's attention: per head a bilinear
    test of its query (computed from the request) against the module's keys. 30 x 2 x 3 x 64 = 11,520 numbers per
    token on SmolLM2-135M against 576 for an embedding row.

    `d` (the hidden size) is kept for artifacts; there is no norm cap (`max_norm` None). Composition concatenates
    modules along the token axis (dim 3) in canonical order; mosaic_core.batch.append_deep_blocks places them.
    Built from a config by mosaic_core.init.build_bank (keys and values read off input tokens)."""

    depth: ClassVar[Depth] = "deep"
    positions: Positions
    """How the block's positions relate to what follows it (BankConfig.positions): `shift` or `keep`."""
    d: int
    m: int
    placement: Placement
    max_norm: float | None
    categories: list[str]
    vectors: nn.ParameterDict
    gate_layers: tuple[int, ...]
    gate_recency: float | None

    def __init__(
        self,
        d: int,
        m: int,
        layers: int,
        kv_heads: int,
        head_dim: int,
        placement: Placement = "before_assistant",
        positions: Positions = "shift",
    ):
        if placement != "before_assistant":
            raise ValueError(f"deep tokens follow the request: placement must be before_assistant, not {placement!r}")
        super().__init__()
        _registry_fields(self, d, m, placement, max_norm=None)
        self.layers, self.kv_heads, self.head_dim, self.positions = layers, kv_heads, head_dim, positions

    @property
    def module_shape(self) -> tuple[int, ...]:
        """One module's tensor shape: (layers, 2, kv_heads, m, head_dim)."""
        return (self.layers, 2, self.kv_heads, self.m, self.head_dim)

    @classmethod
    def for_model(cls, model: Any, m: int) -> DeepTokenBank:
        """An empty deep bank shaped for a (Llama-family) causal LM's attention."""
        c = model.config
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(d=c.hidden_size, m=m, layers=c.num_hidden_layers, kv_heads=c.num_key_value_heads, head_dim=hd)

    def compose(self, active: Iterable[str]) -> torch.Tensor:
        """The block for an active set, (layers, 2, kv_heads, r*m, head_dim); r = 0 for the empty set."""
        cats = self.canonical(active)
        if not cats:
            return _empty_like_modules(self, (self.layers, 2, self.kv_heads, 0, self.head_dim))
        return torch.cat([self.vectors[c] for c in cats], 3)

    def clamp_norms_(self) -> None:
        """No norm cap on keys and values."""

    # The registry both banks keep: the plain functions above, bound as methods (no shared base class).
    gates = property(gates_of)
    set_gate = set_gate
    firing = firing
    add = add_module
    canonical = canonical
    freeze = freeze
    num_trainable = num_trainable

    def extra_repr(self) -> str:
        return f"categories={self.categories}, m={self.m}, depth='deep', positions={self.positions!r}, module_shape={self.module_shape}"


def new_bank(
    *,
    d: int,
    m: int,
    placement: Placement,
    max_norm: float | None = None,
    depth: Depth = "input",
    shape: Sequence[int] = (),
    positions: Positions = "shift",
) -> Bank:
    """An empty bank of either depth, as artifacts and checkpoints describe it (`shape`: a deep module's)."""
    if depth == "deep":
        layers, _, kv_heads, _, head_dim = shape
        return DeepTokenBank(
            d=d, m=m, layers=layers, kv_heads=kv_heads, head_dim=head_dim, placement=placement, positions=positions
        )
    return ControlTokenBank(d=d, m=m, placement=placement, max_norm=max_norm)
