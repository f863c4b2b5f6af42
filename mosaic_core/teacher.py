"""The counterfactual teacher (PAPER.md): the same frozen model with NO control tokens answers each negative
prompt; its greedy answer and its top-k log-probs at every answer position are stored once per unique
prompt and reused by every example that uses the prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mosaic_core.compose import answer_logits, encode_batch
from mosaic_core.config import Placement
from mosaic_core.generation import generate


@torch.inference_mode()
def teacher_topk(
    model: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[Sequence[int]], *, topk: int,
    placement: Placement = "before_assistant",
) -> list[dict[str, list]]:  # fmt: skip
    """The bare model's top-k log-probs at the positions predicting each given answer token: one teacher-forced
    forward over prompt + answer, LM head only at those positions. Rows as `teacher_outputs` returns them."""
    batch = encode_batch(tokenizer, model.get_input_embeddings(), None, prompts, [[] for _ in prompts], placement, responses)
    logits, _, _ = answer_logits(model, batch)  # (B, T, V): position t predicts answer token t
    top_lp, top_id = torch.log_softmax(logits.float(), -1).topk(topk, -1)
    return [{"response_ids": list(r), "topk_ids": top_id[i, : len(r)].tolist(), "topk_logprobs": top_lp[i, : len(r)].tolist()}
            for i, r in enumerate(responses)]  # fmt: skip


@torch.inference_mode()
def teacher_outputs(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int, topk: int,
    placement: Placement = "before_assistant",
) -> list[dict[str, list]]:  # fmt: skip
    """For each prompt: `response_ids` (T,) — the greedy answer, ending with EOS when the model stopped —,
    `topk_ids` / `topk_logprobs` (T, k): the teacher's distribution at the positions predicting each of them.

    The distribution comes from one teacher-forced forward over prompt + answer (`teacher_topk`), so it is
    exactly what the student is distilled towards at the same positions."""
    eos = tokenizer.eos_token_id
    empty = [[] for _ in prompts]
    gens = generate(model, encode_batch(tokenizer, model.get_input_embeddings(), None, prompts, empty, placement),
                    max_new_tokens=max_new_tokens, eos_token_ids=[eos])  # fmt: skip
    responses = [g.token_ids + ([eos] if g.finish_reason == "stop" else []) for g in gens]
    return teacher_topk(model, tokenizer, prompts, [r if r else [eos] for r in responses], topk=topk, placement=placement)
