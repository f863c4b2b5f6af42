"""The counterfactual teacher (docs/architecture.md): the same frozen model with NO control tokens answers each negative
prompt; its greedy answer and its top-k log-probs at every answer position are stored once per unique
prompt and reused by every example that uses the prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mosaic_core.batch import encode_batch
from mosaic_core.config import Placement
from mosaic_core.generation import generate

TEACHER_COLS = ("response_ids", "topk_ids", "topk_logprobs")  # a teacher row's columns besides its prompt_id


@torch.inference_mode()
def teacher_outputs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    *,
    max_new_tokens: int,
    topk: int,
    placement: Placement = "before_assistant",
) -> list[dict[str, list]]:
    """For each prompt: `response_ids` (T,) — the greedy answer, ending with EOS when the model stopped —,
    `topk_ids` / `topk_logprobs` (T, k): the teacher's distribution at the positions predicting each of them.

    The distribution comes from one teacher-forced forward over prompt + answer, so it is exactly what the
    student is distilled towards at the same positions."""
    eos = tokenizer.eos_token_id
    embed = model.get_input_embeddings()
    empty = [[] for _ in prompts]
    gens = generate(
        model, encode_batch(tokenizer, embed, None, prompts, empty, placement), max_new_tokens=max_new_tokens, eos_token_ids=[eos]
    )
    responses = [g.token_ids + ([eos] if g.finish_reason == "stop" else []) for g in gens]
    responses = [r if r else [eos] for r in responses]
    batch = encode_batch(tokenizer, embed, None, prompts, empty, placement, responses)
    logits = model(**batch.model_inputs()).logits  # (B, L, V)
    out = []
    L = logits.shape[1]
    for i, r in enumerate(responses):
        T = len(r)
        lp = torch.log_softmax(logits[i, L - T - 1 : L - 1].float(), -1)  # (T, V): positions predicting r
        top_lp, top_id = lp.topk(topk, -1)
        out.append({"response_ids": list(r), "topk_ids": top_id.tolist(), "topk_logprobs": top_lp.tolist()})
    return out
