"""Place control blocks into templated chats and batch rows whose active sets differ.

A row is three token runs around its control block: `before` + [block] + `after` (+ `target` when training).
Rows are left-padded to one length; the attention mask marks real positions and position ids are derived
from the mask, so a row's logits do not depend on its neighbours' padding or active sets."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mosaic_core.bank import Bank
from mosaic_core.config import Placement

if TYPE_CHECKING:  # the cache builds on this module (chat template, positions); annotations only here
    from mosaic_core.cache import PrefixCache

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


def _special_strings(tokenizer: Any) -> list[str]:
    """The text of every special token (turn markers, BOS/EOS, pad...), longest first."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found = {str(t.content) for t in decoder.values() if getattr(t, "special", False)}
    found |= {str(s) for s in getattr(tokenizer, "all_special_tokens", []) or []}
    return sorted((s for s in found if s), key=len, reverse=True)


def _content_spans(tokenizer: Any, messages: Sequence[Message], text: str, add_generation_prompt: bool) -> list[tuple[int, int]]:
    """Where each message's content sits in the templated `text`: (start, end) character spans.

    The template is rendered a second time with every content replaced by a unique sentinel; the text between
    sentinels is the template's own. A template that trims content (Llama 3's `| trim`) is handled; one that
    rewrites content otherwise cannot be split safely and raises ValueError."""
    nonce = uuid.uuid4().int  # digits: survive case changes, so those are reported as rewriting content
    marks, probe = {}, []
    for i, m in enumerate(messages):
        m = dict(m)
        if isinstance(m.get("content"), str):
            mark = f"\ue000{nonce}:{i}\ue001"
            marks[mark] = m["content"]
            m["content"] = mark
        probe.append(m)
    if not marks:
        return []
    rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=add_generation_prompt)
    parts = re.split(f"(\ue000{nonce}:\\d+\ue001)", rendered)  # template, mark, template, mark, ..., template
    spans: list[tuple[int, int]] = []
    if not text.startswith(parts[0]):
        raise ValueError("the chat template renders differently on a second call: cannot locate message content")
    pos = len(parts[0])
    for j in range(1, len(parts), 2):
        content, after, last = marks[parts[j]], parts[j + 1], j + 2 >= len(parts)
        for cand in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            end = pos + len(cand)
            if text[pos:end] == cand and (text[end:] == after if last else text.startswith(after, end)):
                break
        else:
            raise ValueError("the chat template rewrites message content: cannot tokenise it as plain text safely")
        spans.append((pos, end))
        pos = end + len(after)
    return spans


def chat_ids(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
    """Token ids of the templated chat, where message *content* is always plain text.

    Special-token text inside any message's content (`<|im_end|>`, `<|im_start|>assistant`, BOS/EOS) is
    tokenised as the characters it is, never as a turn marker: otherwise a caller could forge turns (write an
    assistant turn the model believes it said) or end the prompt early. Only the special tokens the template
    itself writes are special. Chats without such text get exactly the ids plain tokenisation of the templated
    text gives (the shipped banks and the teacher outputs depend on them; tests/unit/test_compose.py checks it on
    MOSAIC-bench's prompts)."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    specials = _special_strings(tokenizer)
    contents = [m["content"] for m in messages if isinstance(m.get("content"), str)]
    if not any(sp in c for sp in specials for c in contents):  # the common case: nothing to neutralise
        return _ids(tokenizer, text)
    spans = _content_spans(tokenizer, messages, text, add_generation_prompt)
    # Cut only at the template's own special tokens (outside every content span); tokenise what lies between with
    # special tokens as text. Tokenizers split at added tokens before anything else, so ordinary text gets the
    # same ids as before.
    pattern = re.compile("|".join(re.escape(s) for s in specials))
    ids_of = {s: tokenizer.convert_tokens_to_ids(s) for s in specials}
    cuts, bounds = [], [0] + [x for span in spans for x in span] + [len(text)]
    for k in range(0, len(bounds), 2):  # template regions: [0, s0), [e0, s1), ..., [e_last, len)
        a, b = bounds[k], bounds[k + 1]
        cuts += [(mt.start(), mt.end()) for mt in pattern.finditer(text, a, b)]
    out: list[int] = []
    pos = 0
    for a, b in cuts:
        if a > pos:
            out += list(tokenizer(text[pos:a], add_special_tokens=False, split_special_tokens=True).input_ids)
        out.append(ids_of[text[a:b]])
        pos = b
    if pos < len(text):
        out += list(tokenizer(text[pos:], add_special_tokens=False, split_special_tokens=True).input_ids)
    return out


def encode_chat(tokenizer: Any, messages: Sequence[Message], placement: Placement) -> Segments:
    """Split the templated chat (with generation prompt) at the control block's place.

    Message content is plain text (`chat_ids`): special-token text in it never becomes a turn marker.
    `prefix`: at the very start, after a BOS token if the sequence starts with one that is a true BOS (it
    occurs once); SmolLM2's `<|im_start|>` is its BOS *and* its turn marker, so there the block goes first.
    `before_assistant`: after the last user turn, right before the assistant header.
    """
    full = chat_ids(tokenizer, messages, add_generation_prompt=True)
    if placement == "prefix":
        bos = tokenizer.bos_token_id
        cut = 1 if full and bos is not None and full[0] == bos and full.count(bos) == 1 else 0
        return Segments(full[:cut], full[cut:])
    if placement == "before_assistant":
        head = chat_ids(tokenizer, messages, add_generation_prompt=False)
        if full[: len(head)] != head:  # tokenisation merged across the boundary: fall back to text split
            text_full = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
            text_head = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=False)
            return Segments(head, _ids(tokenizer, text_full[len(text_head) :]))
        return Segments(head, full[len(head) :])
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
    past_key_values: Any = None
    """With a PrefixCache: the rows' cached `before` segments (left-padded to P); then attention_mask is
    (B, P + L) and inputs_embeds/position_ids/labels cover the L positions after them."""

    def model_inputs(self) -> dict[str, Any]:
        out = {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask, "position_ids": self.position_ids}
        return out if self.past_key_values is None else {**out, "cache": self.past_key_values}


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) counting only real tokens, so left padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


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


def rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """RoPE on keys (..., n, hd) with cos/sin (..., n, hd) broadcastable; `inverse` undoes it."""
    half = k.shape[-1] // 2
    rot = torch.cat((-k[..., half:], k[..., :half]), -1)  # transformers' rotate_half
    return k * cos - rot * sin if inverse else k * cos + rot * sin


def pack_deep_blocks(
    model: Any, blocks: Sequence[torch.Tensor], start: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B rows' deep blocks as one key/value slot, each left-padded to the longest block C.

    blocks: B tensors (layers, 2, H, c_i, hd), keys before RoPE; start: (B,) long, the position of each row's first
    block token (its keys get RoPE at start_i .. start_i + c_i - 1). Returns keys (layers, B, H, C, hd) with RoPE,
    values (layers, B, H, C, hd) and the slot's attention mask (B, C) long, on `start`'s device."""
    B, C = len(blocks), max(b.shape[3] for b in blocks)
    n_layers, H, hd = blocks[0].shape[0], blocks[0].shape[2], blocks[0].shape[-1]
    dev = start.device
    kc = torch.zeros(n_layers, B, H, C, hd, dtype=dtype, device=dev)
    vc = torch.zeros(n_layers, B, H, C, hd, dtype=dtype, device=dev)
    cmask = torch.zeros(B, C, dtype=torch.long, device=dev)
    pos = torch.zeros(B, C, dtype=torch.long, device=dev)
    for i, b in enumerate(blocks):
        c = b.shape[3]
        if c:
            kc[:, i, :, C - c :], vc[:, i, :, C - c :] = b[:, 0].to(dtype), b[:, 1].to(dtype)
            cmask[i, C - c :] = 1
            pos[i, C - c :] = start[i] + torch.arange(c, device=dev)
    cos, sin = model.get_decoder().rotary_emb(kc[0], pos)  # (B, C, hd)
    return rotate(kc, cos[:, None], sin[:, None]), vc, cmask


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


def answer_logits(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LM head at the positions that predict each row's target tokens, and nowhere else.

    Runs the decoder over the whole batch, then the output projection only where a target is predicted: on a
    135M model with a 49k vocabulary the full (B, L, V) logits (and their float log-softmax) cost about a
    fifth of a training step and are mostly thrown away. Assumes the causal LM's logits are
    `get_output_embeddings()(last_hidden_state)` (true for Llama-family models: no logit soft-capping).

    Args:
        batch: a Batch with labels (targets at the end of each row).
    Returns:
        logits (B, T, V), targets (B, T) long, mask (B, T) long -- position t predicts target token t.
    """
    from mosaic_core.losses import answer_positions

    assert batch.labels is not None, "answer_logits needs a batch built with targets"
    hidden = model.get_decoder()(**batch.model_inputs()).last_hidden_state  # (B, L, d)
    T = int((batch.labels != -100).sum(-1).max().clamp_min(1))
    idx, mask = answer_positions(batch.labels, T)  # (B, T): the position whose output predicts target t
    h = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
    targets = batch.labels.gather(1, (idx + 1).clamp(max=batch.labels.shape[1] - 1)).masked_fill(mask == 0, -100)
    return model.get_output_embeddings()(h), targets, mask
