"""Iteration-level (continuous) batching, the way vLLM schedules decoding: rows join the running batch between decode
steps and leave it the step they finish, so a short request never waits for a long one and every decode step is
shared by all running rows whatever their module sets, lengths, token budgets and sampling settings.

A joining row is prefilled on its own (with its modules' blocks, through `encode_segments`), and its keys/values are
then merged into the running batch's cache by left-padding: the rows already running are never recomputed. A leaving
row's cache rows are dropped, and columns that only padding still uses are trimmed.

Not thread-safe: one thread owns a `ContinuousBatcher` (the serving replica's engine thread)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mosaic_core.batch import encode_segments, needs_cache
from mosaic_core.cache import PrefixCache
from mosaic_core.generation import Generation, _pick
from mosaic_core.template import Segments


@dataclass
class RowSpec:
    """One request to decode: its templated chat split at the block position, its active set and how to sample.

    `should_stop(tokens)` is asked after every new token (stop strings, streaming, cancellation): True ends the row
    with finish reason `stop`. `seed`: the row samples from its own generator, so a seeded request gives the same
    answer whatever else is running."""

    segments: Segments
    active: tuple[str, ...]
    max_tokens: int
    eos_token_ids: Sequence[int]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    should_stop: Callable[[list[int]], bool] | None = None


@dataclass
class _Row:
    key: Any
    spec: RowSpec
    tokens: list[int] = field(default_factory=list)
    gen: torch.Generator | None = None


class ContinuousBatcher:
    """A running batch of rows decoding together, one token per row per `step()`.

    State (B running rows, cache length L): per layer keys/values (B, kv heads, L, head dim) left-padded, the
    attention mask (B, L), each row's last position id (B, 1) and the logits of its next token (B, V).
    `forward_positions` counts the real (non-padding) input positions every forward has processed, so a test can
    check that a join costs only the newcomer's prefill and a decode step one position per running row."""

    def __init__(self, model: Any, cache: PrefixCache | None = None):
        self.model, self.prefix_cache = model, cache
        self.embed = model.get_input_embeddings()
        self.rows: list[_Row] = []
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask = self.pos = self.logits = None
        self.forward_positions = 0

    def __len__(self) -> int:
        return len(self.rows)

    # ------------------------------------------------------------------------------------------------ join

    @torch.inference_mode()
    def join(self, keyed: Sequence[tuple[Any, RowSpec]], bank: Any = None) -> None:
        """Prefill new rows (one forward for all of them, none for the rows running) and add them to the batch.

        keyed: (caller's key, spec) pairs; `bank`: the modules their active sets name (the snapshot they were
        admitted under: a later swap does not touch rows already prefilled)."""
        if not keyed:
            return
        specs = [s for _, s in keyed]
        for s in specs:
            if s.max_tokens < 1:
                raise ValueError(f"max_tokens {s.max_tokens} must be >= 1")
        cached = needs_cache(bank)
        if cached and self.prefix_cache is None:
            raise ValueError("deep blocks and gates read the request's cached keys/values: give the batcher a PrefixCache")
        batch = encode_segments(
            self.embed, bank, [s.segments for s in specs], [s.active for s in specs], cache=self.prefix_cache if cached else None
        )
        out = self.model(**batch.model_inputs(), use_cache=True)
        self.forward_positions += int(batch.attention_mask[:, -batch.inputs_embeds.shape[1] :].sum())  # the new rows' own
        layers = [(lay.keys, lay.values) for lay in out.cache.layers]
        new_mask, new_pos = batch.attention_mask, batch.position_ids[:, -1:]
        new_logits = out.logits[:, -1].float()
        rows = [
            _Row(k, s, gen=torch.Generator(device=new_logits.device).manual_seed(s.seed) if s.seed is not None else None)
            for k, s in keyed
        ]
        if not self.rows:
            self.keys, self.values = [k for k, _ in layers], [v for _, v in layers]
            self.mask, self.pos, self.logits, self.rows = new_mask, new_pos, new_logits, rows
            return
        L = max(self.mask.shape[1], new_mask.shape[1])
        self.keys = [torch.cat([_lpad(a, L, 2), _lpad(b, L, 2)], 0) for a, (b, _) in zip(self.keys, layers)]
        self.values = [torch.cat([_lpad(a, L, 2), _lpad(b, L, 2)], 0) for a, (_, b) in zip(self.values, layers)]
        self.mask = torch.cat([_lpad(self.mask, L, 1), _lpad(new_mask, L, 1)], 0)
        self.pos = torch.cat([self.pos, new_pos], 0)
        self.logits = torch.cat([self.logits, new_logits], 0)
        self.rows += rows

    # ------------------------------------------------------------------------------------------------ step

    @torch.inference_mode()
    def step(self) -> list[tuple[Any, Generation]]:
        """Pick every running row's next token, retire the rows that finished, and run one decode forward for the
        rest. Returns the finished rows' (key, Generation)."""
        if not self.rows:
            return []
        nxt = self.logits.argmax(-1)
        for i, r in enumerate(self.rows):
            if r.spec.temperature > 0:  # one row at a time: its own generator, its own settings
                nxt[i] = _pick(self.logits[i : i + 1], r.spec.temperature, r.spec.top_p, r.gen)[0]
        done: list[tuple[Any, Generation]] = []
        keep: list[int] = []
        for i, r in enumerate(self.rows):
            t = int(nxt[i])
            if t in r.spec.eos_token_ids:
                done.append((r.key, Generation(r.tokens, "stop")))
                continue
            r.tokens.append(t)
            if r.spec.should_stop is not None and r.spec.should_stop(r.tokens):
                done.append((r.key, Generation(r.tokens, "stop")))
            elif len(r.tokens) >= r.spec.max_tokens:
                done.append((r.key, Generation(r.tokens, "length")))
            else:
                keep.append(i)
        self._keep(keep)
        if self.rows:
            from transformers import DynamicCache

            B = len(self.rows)
            self.mask = torch.cat([self.mask, self.mask.new_ones(B, 1)], 1)
            self.pos = self.pos + 1
            cache = DynamicCache()
            for layer, (k, v) in enumerate(zip(self.keys, self.values)):
                cache.update(k, v, layer)
            out = self.model(
                input_ids=nxt[keep][:, None], attention_mask=self.mask, position_ids=self.pos, cache=cache, use_cache=True
            )
            self.forward_positions += B
            self.keys = [lay.keys for lay in out.cache.layers]
            self.values = [lay.values for lay in out.cache.layers]
            self.logits = out.logits[:, -1].float()
        return done

    def cancel(self, key: Any) -> bool:
        """Drop a running row now (its client went away). False when no row has this key."""
        idx = [i for i, r in enumerate(self.rows) if r.key == key]
        if not idx:
            return False
        self._keep([i for i in range(len(self.rows)) if i not in idx])
        return True

    def _keep(self, keep: list[int]) -> None:
        """Keep only rows `keep` (indices into the running rows), trimming cache columns no kept row reads."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.keys, self.values, self.mask, self.pos, self.logits = [], [], None, None, None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        first = int(mask.any(0).long().argmax())  # leading columns that are padding for every kept row
        self.mask = mask[:, first:]
        self.keys = [k.index_select(0, idx)[:, :, first:] for k in self.keys]
        self.values = [v.index_select(0, idx)[:, :, first:] for v in self.values]
        self.pos, self.logits = self.pos.index_select(0, idx), self.logits.index_select(0, idx)


def _lpad(x: torch.Tensor, L: int, dim: int) -> torch.Tensor:
    """Left-pad `x` with zeros along `dim` to length L."""
    n = x.shape[dim]
    if n == L:
        return x
    shape = list(x.shape)
    shape[dim] = L - n
    return torch.cat([x.new_zeros(shape), x], dim)
