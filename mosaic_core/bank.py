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


class CategoryRegistry(nn.Module):
    """The ordered registry both banks keep: categories -> one trainable tensor of `module_shape` each, composed in
    canonical (registry) order. Neither bank derives from the other; each says what a module's tensor is."""

    positions: Positions = "shift"
    """How the block's positions relate to what follows it (BankConfig.positions); input banks always shift."""

    def __init__(self, d: int, m: int, placement: Placement = "before_assistant", max_norm: float | None = None):
        super().__init__()
        self.d, self.m, self.placement, self.max_norm = d, m, placement, max_norm
        self.categories: list[str] = []
        self.vectors = nn.ParameterDict()
        self.gate_layers: tuple[int, ...] = ()
        """The backbone layers whose hidden states every gate of this bank reads (mosaic_core.gate); () without gates."""
        self.gate_recency: float | None = None
        """How the gates' features weigh a request's tokens (mosaic_core.gate.request_features): None, a plain mean."""

    @property
    def module_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def gates(self) -> dict[str, torch.Tensor]:
        """category -> its gate, (len(gate_layers) * d + 1,) weights then bias, for the modules that have one."""
        return {c: getattr(self, _gate_name(c)) for c in self.categories if hasattr(self, _gate_name(c))}

    def set_gate(self, category: str, gate: torch.Tensor, layers: Sequence[int], recency: float | None = None) -> None:
        """Give a module a gate (mosaic_core.gate.fit_gate's output over the hidden states at `layers`, weighted by
        `recency`): from then on the module is inserted only for requests its gate fires on. Every gate of a bank
        reads the same features."""
        (category,) = self.canonical([category])
        layers = tuple(int(x) for x in layers)
        if not layers or (self.gate_layers and layers != self.gate_layers):
            raise ValueError(f"gate layers {layers}: this bank's gates read {self.gate_layers or 'a non-empty tuple'}")
        if self.gates and recency != self.gate_recency:
            raise ValueError(f"gate recency {recency}: this bank's gates read recency {self.gate_recency}")
        if tuple(gate.shape) != (len(layers) * self.d + 1,):
            raise ValueError(
                f"{category}: a gate over {len(layers)} layers of width {self.d} is ({len(layers) * self.d + 1},), not {tuple(gate.shape)}"
            )
        self.gate_layers, self.gate_recency = layers, recency
        self.register_buffer(_gate_name(category), gate.detach().to(torch.float32).clone())

    def firing(self, active: Sequence[Sequence[str]], features: torch.Tensor | None) -> list[tuple[str, ...]]:
        """Per row, the active modules to insert: those without a gate, and those whose gate fires on the row's
        request features ((B, len(gate_layers) * d), mosaic_core.gate.request_features; None when no module of
        the bank has a gate)."""
        rows = [self.canonical(a) for a in active]
        gates = self.gates
        if not gates:
            return rows
        if features is None:
            raise ValueError("this bank's modules are gated: pass the requests' features")
        fired = {c: fires(g, features.to(g.device)).tolist() for c, g in gates.items()}
        return [tuple(c for c in row if c not in fired or fired[c][i]) for i, row in enumerate(rows)]

    def add(self, category: str, values: torch.Tensor) -> None:
        """Register a new category with initial values of shape `module_shape`."""
        if category in self.vectors:
            raise DuplicateCategoryError(f"category {category!r} is already in the bank {self.categories}")
        if tuple(values.shape) != self.module_shape:
            raise ValueError(f"{category}: expected shape {self.module_shape}, got {tuple(values.shape)}")
        self.vectors[category] = nn.Parameter(values.detach().clone().float())
        self.categories.append(category)

    def canonical(self, active: Iterable[str]) -> tuple[str, ...]:
        """`active` deduplicated and sorted into registry order; unknown names raise UnknownCategoryError."""
        wanted = set(active)
        unknown = sorted(wanted - set(self.categories))
        if unknown:
            raise UnknownCategoryError(unknown, self.categories)
        # Canonical order makes {a, b} and {b, a} the same input: one composition per set, not per permutation.
        return tuple(c for c in self.categories if c in wanted)

    def freeze(self, categories: Sequence[str] | None = None) -> None:
        """Stop training these categories (all when None): incremental expansion keeps old modules fixed."""
        for c in self.canonical(categories if categories is not None else self.categories):
            self.vectors[c].requires_grad_(False)

    def clamp_norms_(self) -> None:
        """No norm cap (the input bank has one)."""

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class ControlTokenBank(CategoryRegistry):
    """Ordered categories -> (m, d) parameters; composition in canonical (registry) order."""

    depth: ClassVar[Depth] = "input"

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
            ref = next(iter(self.vectors.values()), None)
            dtype = ref.dtype if ref is not None else torch.float32
            return torch.zeros(0, self.d, dtype=dtype, device=ref.device if ref is not None else None)
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

    def extra_repr(self) -> str:
        return f"categories={self.categories}, m={self.m}, d={self.d}, placement={self.placement!r}"


class DeepTokenBank(CategoryRegistry):
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
        super().__init__(d, m, placement, max_norm=None)
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
            ref = next(iter(self.vectors.values()), None)
            return torch.zeros(
                self.layers,
                2,
                self.kv_heads,
                0,
                self.head_dim,
                dtype=ref.dtype if ref is not None else torch.float32,
                device=ref.device if ref is not None else None,
            )
        return torch.cat([self.vectors[c] for c in cats], 3)

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
