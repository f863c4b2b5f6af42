"""Building a bank from its config: a fresh bank at the recipe's initialisation (input tokens, or deep keys and values
read off those input tokens) and incremental expansion (a trained bank frozen, new modules appended).

Sits above the batch in the core's layering (config -> bank -> template -> kv/cache -> batch -> init): a deep bank's
initial keys and values are what the frozen backbone makes of its input tokens, which takes a forward pass through
the batched chat."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from mosaic_core.bank import Bank, ControlTokenBank, DeepTokenBank, init_vectors
from mosaic_core.batch import encode_batch
from mosaic_core.categories import describe
from mosaic_core.config import BankConfig
from mosaic_core.kv import rotate
from mosaic_core.template import as_messages, encode_chat


@torch.no_grad()
def deep_from_input_bank(model: Any, tokenizer: Any, bank: ControlTokenBank, prompts: Sequence[str]) -> DeepTokenBank:
    """Each module's tokens' own keys (RoPE undone) and values at every layer, averaged over `prompts` with that
    module alone active: the deep bank that starts closest to `bank` (the block then sits after prompts it was not
    computed on, which is why it is an average). Modules: (layers, 2, kv_heads, m, head_dim)."""
    if bank.placement != "before_assistant" or not prompts:
        raise ValueError("deep_from_input_bank needs a before_assistant bank and at least one prompt")
    deep = DeepTokenBank.for_model(model, bank.m)
    rope = model.get_decoder().rotary_emb
    for c in bank.categories:
        enc = encode_batch(tokenizer, model.get_input_embeddings(), bank, list(prompts), [[c]] * len(prompts), bank.placement)
        layers = model.get_decoder()(**enc.model_inputs(), use_cache=True).cache.layers
        L, rows = enc.attention_mask.shape[1], []
        for i, p in enumerate(prompts):
            nb = len(encode_chat(tokenizer, as_messages(p), bank.placement).before)
            start = L - int(enc.attention_mask[i].sum()) + nb  # left padding, the request, then the block
            cos, sin = rope(layers[0].keys, torch.arange(nb, nb + bank.m, device=layers[0].keys.device)[None])  # (1, m, hd)
            k = torch.stack([rotate(lay.keys[i, :, start : start + bank.m], cos, sin, inverse=True) for lay in layers])
            v = torch.stack([lay.values[i, :, start : start + bank.m] for lay in layers])
            rows.append(torch.stack([k, v], 1))  # (layers, 2, kv_heads, m, hd)
        deep.add(c, torch.stack(rows).mean(0))
    return deep


def build_bank(cfg: BankConfig, embeddings: torch.Tensor, tokenizer: Any = None, model: Any = None, seed: int = 0) -> Bank:
    """A fresh bank as `cfg` describes it (`seed`: for `vocab` / `normal` initialisation). `depth: deep`: the input bank `cfg.init` gives, turned deep over the
    categories' own descriptions as prompts -- requests of every category, so no module starts tuned to one."""
    if cfg.depth != "deep":
        return ControlTokenBank.build(cfg, embeddings, tokenizer, seed)
    if model is None:
        raise ValueError("a deep bank is built from the backbone's keys and values: pass model=")
    flat = ControlTokenBank.build(dataclasses.replace(cfg, depth="input", positions="shift"), embeddings, tokenizer, seed)
    deep = deep_from_input_bank(model, tokenizer, flat, [describe(c) for c in cfg.categories])
    deep.positions = cfg.positions
    return deep


def extend_bank(
    bank: Bank,
    add: Sequence[str],
    cfg: BankConfig,
    embeddings: torch.Tensor,
    tokenizer: Any,
    model: Any = None,
    seed: int = 0,
) -> Bank:
    """Incremental expansion: freeze every module of the trained `bank` and append `add`, initialised per `cfg`
    (deep modules over the whole bank's descriptions). Only the new modules train."""
    if bank.depth != cfg.depth:
        raise ValueError(
            f"the bank holds {bank.depth} tokens; the recipe's bank.depth is {cfg.depth}: new modules must be of the bank's depth"
        )
    bank.freeze()
    gen = torch.Generator().manual_seed(seed)
    for c in add:
        v = init_vectors(embeddings, bank.m, cfg.init, tokenizer=tokenizer, text=describe(c), generator=gen)
        if bank.depth == "deep":
            flat = ControlTokenBank(d=bank.d, m=bank.m, placement=bank.placement)
            flat.add(c, v)
            v = deep_from_input_bank(model, tokenizer, flat, [describe(x) for x in [*bank.categories, c]]).vectors[c]
        bank.add(c, v)
    bank.clamp_norms_()
    return bank
