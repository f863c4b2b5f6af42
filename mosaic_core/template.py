"""The chat template: a request (a prompt or a message list) templated by the backbone's tokenizer and split where
the control block goes (`Segments`: `before` + [block] + `after`). Message content is always plain text.

The layer above the bank in the core (config -> bank -> template -> kv -> cache -> batch -> init/losses ->
training/scoring; docs/architecture.md): token ids only, no tensors."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
    text gives (the shipped banks and the teacher outputs depend on them; tests/unit/test_batch.py checks it on
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
