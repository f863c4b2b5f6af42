"""Place control blocks into templated chats and batch rows whose active sets differ.

A row is three token runs around its control block: `before` + [block] + `after` (+ `target` when training).
Rows are left-padded to one length; the attention mask marks real positions and position ids are derived
from the mask, so a row's logits do not depend on its neighbours' padding or active sets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mosaic_core.bank import ControlTokenBank
from mosaic_core.config import Placement

Message = dict[str, str]


@dataclass(frozen=True)
class Segments:
    """Token ids of one templated chat, split where the control block goes."""

    before: list[int]
    after: list[int]


def as_messages(prompt: str | Sequence[Message], system: str | None = None) -> list[Message]:
    """A user prompt (or a ready message list) as chat messages, with an optional system message first."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system:
        msgs = [{"role": "system", "content": system}, *[m for m in msgs if m["role"] != "system"]]
    return msgs


def _ids(tokenizer: Any, text: str) -> list[int]:
    # The chat template already writes every special token it wants (BOS included): add none twice.
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def encode_chat(tokenizer: Any, messages: Sequence[Message], placement: Placement) -> Segments:
    """Split the templated chat (with generation prompt) at the control block's place.

    `prefix`: at the very start, after a BOS token if the sequence starts with one that is a true BOS (it
    occurs once); SmolLM2's `<|im_start|>` is its BOS *and* its turn marker, so there the block goes first.
    `before_assistant`: after the last user turn, right before the assistant header.
    """
    full = _ids(tokenizer, tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True))
    if placement == "prefix":
        bos = tokenizer.bos_token_id
        cut = 1 if full and bos is not None and full[0] == bos and full.count(bos) == 1 else 0
        return Segments(full[:cut], full[cut:])
    if placement == "before_assistant":
        head = _ids(tokenizer, tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=False))
        if full[: len(head)] != head:  # tokenisation merged across the boundary: fall back to text split
            text_full = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
            text_head = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=False)
            return Segments(_ids(tokenizer, text_head), _ids(tokenizer, text_full[len(text_head):]))
        return Segments(head, full[len(head):])
    raise ValueError(f"unknown placement {placement!r}")


@dataclass
class Batch:
    """Model inputs for B rows, left-padded to length L.

    inputs_embeds: (B, L, d); attention_mask: (B, L) long; position_ids: (B, L) long;
    labels: (B, L) long with -100 outside targets, or None; prompt_len: (B,) positions before the target.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    prompt_len: torch.Tensor

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) counting only real tokens, so left padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def build_batch(
    embed: torch.nn.Module,
    bank: ControlTokenBank | None,
    rows: Sequence[Segments],
    active: Sequence[Sequence[str]],
    targets: Sequence[Sequence[int]] | None = None,
) -> Batch:
    """Embed B rows, insert each row's control block, left-pad.

    Args:
        embed: the backbone's input embedding module (V -> d).
        bank: the control-token bank (None: no blocks, every active set must be empty).
        rows: B templated chats split at the block position.
        active: B active sets (any order; composed canonically).
        targets: optional B target token runs appended after the prompt; they get labels, all else -100.
    """
    if len(rows) != len(active) or (targets is not None and len(targets) != len(rows)):
        raise ValueError("rows, active and targets must have the same length")
    weight = embed.weight
    pieces, label_rows, prompt_lens = [], [], []
    for i, seg in enumerate(rows):
        tgt = list(targets[i]) if targets is not None else []
        ids = torch.tensor(seg.before + seg.after + tgt, dtype=torch.long, device=weight.device)
        tok = embed(ids)  # (n, d)
        if active[i]:
            if bank is None:
                raise ValueError("active modules given but no bank")
            block = bank.compose(active[i]).to(tok.dtype)
        else:
            block = tok.new_zeros(0, tok.shape[-1])
        nb = len(seg.before)
        pieces.append(torch.cat([tok[:nb], block, tok[nb:]], 0))
        plen = nb + block.shape[0] + len(seg.after)
        prompt_lens.append(plen)
        label_rows.append([-100] * plen + tgt)
    L = max(p.shape[0] for p in pieces)
    d = pieces[0].shape[-1]
    B = len(pieces)
    embeds = pieces[0].new_zeros(B, L, d)
    mask = torch.zeros(B, L, dtype=torch.long, device=weight.device)
    labels = torch.full((B, L), -100, dtype=torch.long, device=weight.device)
    for i, p in enumerate(pieces):
        n = p.shape[0]
        embeds[i, L - n :] = p
        mask[i, L - n :] = 1
        labels[i, L - n :] = torch.tensor(label_rows[i], dtype=torch.long)
    return Batch(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions_from_mask(mask),
        labels=labels if targets is not None else None,
        prompt_len=torch.tensor(prompt_lens),
    )


def encode_batch(
    tokenizer: Any,
    embed: torch.nn.Module,
    bank: ControlTokenBank | None,
    prompts: Sequence[str | Sequence[Message]],
    active: Sequence[Sequence[str]],
    placement: Placement,
    targets: Sequence[Sequence[int]] | None = None,
    system: str | None = None,
) -> Batch:
    """Template, split, embed and pad B prompts (strings or message lists) with their active sets."""
    rows = [encode_chat(tokenizer, as_messages(p, system), placement) for p in prompts]
    return build_batch(embed, bank, rows, active, targets)
