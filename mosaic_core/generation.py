"""Batched decoding from a composed `Batch` (rows with different active sets in one forward), with a KV
cache. Greedy by default; temperature / top-p sampling with a seeded generator. Also the text helpers of stop
strings that a streaming server needs (`find_stop`, `holdback`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mosaic_core.batch import Batch


@dataclass(frozen=True)
class Generation:
    """One row's output: new token ids (stop token excluded) and why it ended (`stop` or `length`)."""

    token_ids: list[int]
    finish_reason: str


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row from logits (B, V) -> (B,)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p  # smallest prefix with mass >= top_p (the first token always kept)
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.inference_mode()
def generate(
    model: Any,
    batch: Batch,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    should_stop: Callable[[int, list[int]], bool] | None = None,
) -> list[Generation]:
    """Decode up to `max_new_tokens` for every row of `batch` (B rows, left-padded).

    `should_stop(row, tokens_so_far)` lets a caller end a row early (e.g. on a stop string); such rows
    finish with `stop`. Rows that are done keep decoding pad tokens but their output is frozen.
    """
    B = batch.inputs_embeds.shape[0]
    device = batch.inputs_embeds.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos = torch.tensor(list(eos_token_ids), device=device)
    out = model(**batch.model_inputs(), use_cache=True)
    cache, mask, pos = out.cache, batch.attention_mask, batch.position_ids[:, -1:]
    logits = out.logits[:, -1]
    tokens: list[list[int]] = [[] for _ in range(B)]
    reasons: list[str | None] = [None] * B
    for _ in range(max_new_tokens):
        nxt = _pick(logits, temperature, top_p, gen)
        for i in range(B):
            if reasons[i] is not None:
                continue
            t = int(nxt[i])
            if bool((eos == t).any()):
                reasons[i] = "stop"
                continue
            tokens[i].append(t)
            if should_stop is not None and should_stop(i, tokens[i]):
                reasons[i] = "stop"
        if all(r is not None for r in reasons):
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
        pos = pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
    return [Generation(tokens[i], reasons[i] or "length") for i in range(B)]


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters may still turn into a stop string (or are an incomplete UTF-8 character), so a
    stream must not send them yet."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if s.startswith(text[-k:]):
                keep = max(keep, k)
                break
    n = len(text)
    while n - keep > 0 and text[n - keep - 1] == "\ufffd":  # a byte-level BPE may split one character
        keep += 1
    return keep
