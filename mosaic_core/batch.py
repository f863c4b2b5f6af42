"""Batch rows whose active sets differ: embed each templated chat, insert its control block, left-pad.

A row is three token runs around its control block: `before` + [block] + `after` (+ `target` when training).
Rows are left-padded to one length; the attention mask marks real positions and position ids are derived
from the mask, so a row's logits do not depend on its neighbours' padding or active sets. With a PrefixCache the
`before` runs come from it as past keys/values, and a deep bank's blocks are key/value positions after them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mosaic_core.bank import Bank
from mosaic_core.cache import PrefixCache
from mosaic_core.config import Placement
from mosaic_core.kv import pack_deep_blocks, positions_from_mask
from mosaic_core.template import Message, Segments, as_messages, encode_chat


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
    past_key_values: Any = None
    """With a PrefixCache: the rows' cached `before` segments (left-padded to P); then attention_mask is
    (B, P + L) and inputs_embeds/position_ids/labels cover the L positions after them."""

    def model_inputs(self) -> dict[str, Any]:
        out = {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask, "position_ids": self.position_ids}
        return out if self.past_key_values is None else {**out, "cache": self.past_key_values}


def build_batch(
    embed: torch.nn.Module,
    bank: Bank | None,
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


def needs_cache(bank: Bank | None) -> bool:
    """Whether encoding with `bank` needs a PrefixCache: deep blocks follow the request's cached keys/values, and
    gates read the request's features there. Ungated input banks encode from their own forward."""
    return bank is not None and (bank.depth == "deep" or bool(bank.gates))


def encode_batch(
    tokenizer: Any,
    embed: torch.nn.Module,
    bank: Bank | None,
    prompts: Sequence[str | Sequence[Message]],
    active: Sequence[Sequence[str]],
    placement: Placement,
    targets: Sequence[Sequence[int]] | None = None,
    system: str | None = None,
    cache: PrefixCache | None = None,
    hide: Sequence[bool] | None = None,
    gated: bool = True,
) -> Batch:
    """Template, split, embed and pad B prompts (strings or message lists) with their active sets; with a
    `cache`, the part before each control block comes from it as past key/values (see PrefixCache). A deep bank
    (DeepTokenBank) needs the cache: its blocks are key/value positions appended after those. `hide` (B,): the rows
    a DroppingCache may hide request tokens of (None: every row). `gated`: a gated module is inserted only where
    its gate fires on the request (Bank.firing; features from the cache); False inserts every active module
    (training the tokens of gated modules)."""
    rows = [encode_chat(tokenizer, as_messages(p, system), placement) for p in prompts]
    return encode_segments(embed, bank, rows, active, targets, cache, hide, gated)


def encode_segments(
    embed: torch.nn.Module,
    bank: Bank | None,
    rows: Sequence[Segments],
    active: Sequence[Sequence[str]],
    targets: Sequence[Sequence[int]] | None = None,
    cache: PrefixCache | None = None,
    hide: Sequence[bool] | None = None,
    gated: bool = True,
) -> Batch:
    """encode_batch for rows already templated and split (encode_chat)."""
    deep = bank is not None and bank.depth == "deep"
    if gated and bank is not None and bank.gates:
        if cache is None:
            raise ValueError("gated modules read the request's features: encode with a PrefixCache.for_chat")
        active = bank.firing(active, cache.features([r.before for r in rows], bank.gate_layers, bank.gate_recency))
    if cache is None:
        if deep:
            raise ValueError("a deep bank's blocks are keys and values after the request's own: encode with a PrefixCache")
        return build_batch(embed, bank, rows, active, targets)
    flat = build_batch(
        embed, None if deep else bank, [Segments([], r.after) for r in rows], [[] for _ in rows] if deep else active, targets
    )
    past, pmask = cache.get([r.before for r in rows], hide)
    n_before = pmask.sum(-1, keepdim=True)
    flat.position_ids = positions_from_mask(flat.attention_mask) + n_before
    flat.attention_mask = torch.cat([pmask, flat.attention_mask], 1)
    flat.past_key_values, flat.prompt_len = past, flat.prompt_len + n_before.squeeze(-1).cpu()
    if deep:
        assert bank is not None
        flat = append_deep_blocks(cache.model, flat, [bank.compose(a) for a in active], keep_positions=bank.positions == "keep")
    return flat


def append_deep_blocks(model: Any, batch: Batch, blocks: Sequence[torch.Tensor], keep_positions: bool = False) -> Batch:
    """Append each row's deep block after its cached request, in place (left-padded within the block slot).

    batch: built with a PrefixCache and no bank (past (B, H, P, hd) per layer, attention_mask (B, P + L)).
    blocks: B tensors (layers, 2, H, c_i, hd), keys before RoPE. The answer sees a module at the same relative
    distance whatever the request's length. By default (`shift`) the keys get RoPE at the positions right after the
    request and the positions after the block shift by c_i, as with input tokens. With `keep_positions` the keys
    take the positions of the request's last c_i tokens and nothing after the block moves: position shifts alone
    change a small model's answers, and this way an empty or silent block leaves them exactly as they are.
    """
    from transformers import DynamicCache

    P = batch.attention_mask.shape[1] - batch.inputs_embeds.shape[1]
    pmask, amask = batch.attention_mask[:, :P], batch.attention_mask[:, P:]
    first = batch.past_key_values.layers[0].keys
    n_req = pmask.sum(-1)
    sizes = torch.tensor([b.shape[3] for b in blocks], device=n_req.device)
    start = (n_req - sizes).clamp_min(0) if keep_positions else n_req  # shared with the request's tail, or after it
    kc, vc, cmask = pack_deep_blocks(model, blocks, start, first.dtype)
    cache = DynamicCache()
    for layer, lay in enumerate(batch.past_key_values.layers):
        cache.update(torch.cat([lay.keys, kc[layer]], 2), torch.cat([lay.values, vc[layer]], 2), layer)
    c_i = cmask.sum(-1)
    batch.past_key_values = cache
    batch.attention_mask = torch.cat([pmask, cmask, amask], 1)
    if not keep_positions:
        batch.position_ids = batch.position_ids + c_i[:, None]
    batch.prompt_len = batch.prompt_len + c_i.cpu()
    return batch
