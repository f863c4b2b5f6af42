"""Key/value states of the token runs before rows' control blocks, computed once and reused (the KV layer between
the chat template and the batch): `PrefixCache`, and `DroppingCache`, which hides a share of each request's tokens
for training. `encode_batch(..., cache=)` and the serving scheduler read them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Self

import torch

from mosaic_core.kv import positions_from_mask
from mosaic_core.template import as_messages, encode_chat


class PrefixCache:
    """Key/value states of the token runs before rows' control blocks, computed once per distinct run.

    Causal attention means nothing before a control block depends on the bank, so for a frozen backbone those
    states are constants: with `before_assistant` placement that is the system prompt and the whole request,
    about half of a training row. Computing them once (no grad) and reusing them every epoch removes that
    share of each step. Not for ZeRO-3, whose per-module gathers are collective: ranks with different cache
    misses would run different numbers of forwards.
    """

    def __init__(self, model: Any, max_bytes: int = 4 << 30, chunk: int = 16, head: int = 0):
        # 4 GiB holds ~1,700 SmolLM2-135M requests of 51 tokens (46 KB per token in fp32) but only ~500 of
        # Llama-3.1-8B's (128 KB per token in bf16): beyond it the oldest entries go, and misses are recomputed.
        # `head` > 0: runs that share their first `head` tokens (the chat template's system prompt and user header,
        # see `for_chat`) keep one copy of those tokens' states -- causal attention makes them the same in every run.
        self.model, self.max_bytes, self.chunk, self.head = model, max_bytes, chunk, head
        self.store: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.heads: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.hits = self.misses = self.bytes = 0
        self.feats: dict[tuple[tuple[int, ...], tuple[int, ...], float | None], torch.Tensor] = {}
        self.feat_bytes = 0  # gate features, bounded apart: an eighth of max_bytes (7 KB a request on SmolLM2-135M)

    @classmethod
    def for_chat(cls, model: Any, tokenizer: Any, system: str | None = None, **kw: Any) -> Self:
        """`head` read off the chat template: the tokens every templated request starts with."""
        runs = [encode_chat(tokenizer, as_messages(p, system), "before_assistant").before for p in ("a", "Z")]
        return cls(model, head=common_head(runs), **kw)

    def features(self, runs: Sequence[Sequence[int]], layers: Sequence[int], recency: float | None = None) -> torch.Tensor:
        """(B, len(layers) * d) gate features of B runs (mosaic_core.gate.request_features over each run's tokens
        after the template's head), computed once per run, layer set and recency. Needs `head` (a cache from
        `for_chat`): the features must skip the system prompt and user header exactly as the gates' training did."""
        from mosaic_core.gate import request_features

        if self.head <= 0:
            raise ValueError("gate features skip the chat template's head: build the cache with PrefixCache.for_chat")
        layers = tuple(layers)
        keys = [(tuple(r), layers, recency) for r in runs]
        found = {k: self.feats[k] for k in dict.fromkeys(keys) if k in self.feats}
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        if missing:
            found.update(zip(missing, request_features(self.model, [k[0] for k in missing], self.head, layers, recency=recency)))
            for k in missing:
                self.feats[k] = found[k]
                self.feat_bytes += found[k].nbytes
            while self.feat_bytes > self.max_bytes // 8 and len(self.feats) > 1:  # oldest first, as the key/values
                self.feat_bytes -= self.feats.pop(next(iter(self.feats))).nbytes
        return torch.stack([found[k] for k in keys])

    def _head_of(self, run: tuple[int, ...]) -> tuple[int, ...]:
        return run[: self.head] if 0 < self.head < len(run) else ()

    @torch.no_grad()
    def _fill(self, runs: list[tuple[int, ...]]) -> None:
        device = self.model.get_input_embeddings().weight.device
        for i in range(0, len(runs), self.chunk):
            part = runs[i : i + self.chunk]
            L = max(len(r) for r in part)
            ids = torch.zeros(len(part), L, dtype=torch.long, device=device)
            mask = torch.zeros(len(part), L, dtype=torch.long, device=device)
            for j, r in enumerate(part):
                ids[j, L - len(r) :], mask[j, L - len(r) :] = torch.tensor(r, device=device), 1
            out = self.model.get_decoder()(
                input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=True
            )
            layers = [(lay.keys, lay.values) for lay in out.cache.layers]  # each (b, heads, L, hd)
            for j, r in enumerate(part):
                h = self._head_of(r)
                if h and h not in self.heads:
                    self.heads[h] = [
                        (k[j, :, L - len(r) : L - len(r) + len(h)].clone(), v[j, :, L - len(r) : L - len(r) + len(h)].clone())
                        for k, v in layers
                    ]
                    self.bytes += _nbytes(self.heads[h])  # kept: never evicted
                start = L - len(r) + len(h)  # the run's own tokens after its shared head
                entry = [(k[j, :, start:].clone(), v[j, :, start:].clone()) for k, v in layers]
                self.bytes += _nbytes(entry)
                self.store[r] = entry
                while self.bytes > self.max_bytes and len(self.store) > 1:  # oldest first: bounded, not an LRU
                    self.bytes -= _nbytes(self.store.pop(next(iter(self.store))))

    def _refill(self, run: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A run evicted while this very batch was filled (a budget smaller than one batch): compute it again."""
        self._fill([run])
        return self.store[run]

    def get(self, befores: Sequence[Sequence[int]], hide: Sequence[bool] | None = None) -> tuple[Any, torch.Tensor]:
        """(DynamicCache with (B, heads, P, hd) per layer, left-padded; mask (B, P)) for B token runs. `hide`: which
        rows may hide request tokens (DroppingCache; None: all); a PrefixCache hides nothing."""
        from transformers import DynamicCache

        keys = [tuple(b) for b in befores]
        if any(not k for k in keys):
            raise ValueError("PrefixCache needs a non-empty run before every control block")
        missing = list(dict.fromkeys(k for k in keys if k not in self.store))
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        self._fill(missing)
        entries = [self.store[k] if k in self.store else self._refill(k) for k in keys]
        P = max(len(k) for k in keys)
        k0 = entries[0][0][0]  # (heads, n, hd)
        mask = torch.zeros(len(keys), P, dtype=torch.long, device=k0.device)
        # per row, once (not per layer): where it starts in the padded block, its shared head's states and length
        rows = [(P - len(key), self.heads[h] if (h := self._head_of(key)) else None, len(h)) for key in keys]
        cache = DynamicCache()
        for layer in range(len(entries[0])):
            K = k0.new_zeros(len(keys), k0.shape[0], P, k0.shape[-1])
            V = torch.zeros_like(K)
            for j, ((at, head, n), e) in enumerate(zip(rows, entries)):
                if head is not None:
                    K[j, :, at : at + n], V[j, :, at : at + n] = head[layer]
                K[j, :, at + n :], V[j, :, at + n :] = e[layer]
            cache.update(K, V, layer)
        for j, k in enumerate(keys):
            mask[j, P - len(k) :] = 1
        return cache, mask


class DroppingCache(PrefixCache):
    """A PrefixCache whose rows hide a random `p` of their request's tokens from everything after them (attention mask
    0; the positions after shift left by as many): data augmentation against memorised words (train.request_dropout;
    docs/experiments/deep-prompt-probe.md). The system prompt and the user header (the first `head` tokens
    of every run) and the turn's last `tail` tokens stay. A row keeps the same hidden tokens until `new_step()`, so a
    request met twice in one step is hidden the same way; rows whose `hide` is False (negatives) see it whole. p = 0 (outside `hiding`): PrefixCache exactly -- the cached
    keys/values are always the whole request's, only what reads them changes."""

    def __init__(self, model: Any, head: int, tail: int = 2, max_bytes: int = 4 << 30):
        super().__init__(model, max_bytes, head=head)
        self.tail, self.p = tail, 0.0
        self.hidden: dict[tuple[int, ...], torch.Tensor] = {}

    def new_step(self) -> None:
        self.hidden.clear()

    @contextmanager
    def _sharing(self, p: float) -> Iterator[None]:
        old, self.p = self.p, p
        try:
            yield
        finally:
            self.p = old

    @contextmanager
    def hiding(self, p: float) -> Iterator[None]:
        """Rows hide a share `p` of their request inside this block (a new step: new hidden tokens)."""
        self.new_step()
        with self._sharing(p):
            yield

    def whole(self) -> AbstractContextManager[None]:
        """Rows see their whole request inside this block (the base model's own answers, scoring)."""
        return self._sharing(0.0)

    def get(self, befores: Sequence[Sequence[int]], hide: Sequence[bool] | None = None) -> tuple[Any, torch.Tensor]:
        cache, mask = super().get(befores)
        if self.p > 0:
            P = mask.shape[1]
            for j, b in enumerate(befores):
                if hide is not None and not hide[j]:
                    continue
                key = tuple(b)
                if key not in self.hidden:
                    drop = torch.rand(len(key)) < self.p
                    drop[: self.head], drop[len(key) - self.tail :] = False, False
                    self.hidden[key] = drop
                mask[j, P - len(key) :] = mask[j, P - len(key) :].masked_fill(self.hidden[key].to(mask.device), 0)
        return cache, mask


def _nbytes(entry: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Bytes of one stored run's (keys, values) per layer."""
    return sum(k.nbytes + v.nbytes for k, v in entry)


def common_head(runs: Sequence[Sequence[int]]) -> int:
    """Length of the token run every one of `runs` starts with (the system prompt and the user header)."""
    n = min(len(r) for r in runs)
    for i in range(n):
        if len({r[i] for r in runs}) > 1:
            return i
    return n
