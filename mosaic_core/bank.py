"""ControlTokenBank: an ordered registry of categories, each owning `m` learned vectors in the backbone's
input-embedding space. The only trainable parameters of MOSAIC."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from mosaic_core.categories import describe
from mosaic_core.config import BankConfig, InitMethod, Placement
from mosaic_core.errors import DuplicateCategoryError, UnknownCategoryError


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
        # blend of the words describing the category (FINDINGS 2b: this kept vectors on the embedding scale).
        chunks = torch.tensor_split(rows, m) if len(ids) >= m else [rows[i % len(ids)][None] for i in range(m)]
        return torch.stack([c.mean(0) for c in chunks]).clone()
    if method == "vocab":
        idx = torch.randint(0, V, (m,), generator=generator)
        return emb[idx].clone()
    if method == "normal":
        return torch.randn(m, d, generator=generator) * emb.std()
    raise ValueError(f"unknown init method {method!r}")


class ControlTokenBank(nn.Module):
    """Ordered categories -> (m, d) parameters; composition in canonical (registry) order."""

    def __init__(self, d: int, m: int, placement: Placement = "before_assistant", max_norm: float | None = None):
        super().__init__()
        self.d, self.m, self.placement, self.max_norm = d, m, placement, max_norm
        self.categories: list[str] = []
        self.vectors = nn.ParameterDict()

    @classmethod
    def build(cls, cfg: BankConfig, embeddings: torch.Tensor, tokenizer: Any = None) -> ControlTokenBank:
        """A bank for `cfg.categories`, initialised by `cfg.init` from the backbone's embeddings (V, d)."""
        mean_norm = embeddings.detach().float().norm(dim=-1).mean().item()
        max_norm = cfg.max_norm_ratio * mean_norm if cfg.max_norm_ratio else None
        bank = cls(d=embeddings.shape[1], m=cfg.m, placement=cfg.placement, max_norm=max_norm)
        gen = torch.Generator().manual_seed(cfg.seed)
        for c in cfg.categories:
            v = init_vectors(embeddings, cfg.m, cfg.init, tokenizer=tokenizer, text=describe(c), generator=gen)
            bank.add(c, v)
        bank.clamp_norms_()
        return bank

    def add(self, category: str, values: torch.Tensor) -> None:
        """Register a new category with initial values of shape (m, d)."""
        if category in self.vectors:
            raise DuplicateCategoryError(f"category {category!r} is already in the bank {self.categories}")
        if tuple(values.shape) != (self.m, self.d):
            raise ValueError(f"{category}: expected shape {(self.m, self.d)}, got {tuple(values.shape)}")
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

    def compose(self, active: Iterable[str]) -> torch.Tensor:
        """The control block for an active set, shape (k*m, d); (0, d) for the empty set."""
        cats = self.canonical(active)
        if not cats:
            ref = next(iter(self.vectors.values()), None)
            dtype = ref.dtype if ref is not None else torch.float32
            return torch.zeros(0, self.d, dtype=dtype, device=ref.device if ref is not None else None)
        return torch.cat([self.vectors[c] for c in cats], 0)

    def freeze(self, categories: Sequence[str] | None = None) -> None:
        """Stop training these categories (all when None): incremental expansion keeps old modules fixed."""
        for c in self.canonical(categories if categories is not None else self.categories):
            self.vectors[c].requires_grad_(False)

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

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def extra_repr(self) -> str:
        return f"categories={self.categories}, m={self.m}, d={self.d}, placement={self.placement!r}"
