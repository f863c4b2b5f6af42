"""MOSAIC losses, on answer-aligned tensors: position t of a row is the model's prediction of its t-th target
token (`answer_logits` computes the LM head at those positions only).

Positives: cross-entropy on the refusal template. Negatives: cross-entropy on the frozen model's own answer
+ lambda * forward KL(teacher || student) at every answer position, where the teacher is stored as its top-k
log-probs and the remaining mass is one tail bucket (so k+1 outcomes, exact in the limit k = V). Optionally a
binary CE on the probability of starting the refusal (`decision_bce`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mosaic_core.batch import Batch


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean cross-entropy over real positions.

    Args:
        logits: (B, T, V) answer-aligned; targets: (B, T) token ids; mask: (B, T) 1 where the position is real.
    Returns:
        (B,) mean CE of each row (0 for a row with no real position).
    """
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp_min(0), reduction="none")  # (B, T)
    m = mask.float()
    return (ce * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def topk_tail_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Forward KL(teacher || student) over k+1 buckets (teacher's top-k tokens + everything else).

    Args:
        student_logits: (B, T, V) student logits at the T answer positions.
        topk_ids: (B, T, k) teacher's top-k token ids per position.
        topk_logprobs: (B, T, k) teacher's log-probs of those tokens.
        mask: (B, T) 1 where the position is real.
    Returns:
        (B,) mean KL per row over its real positions.
    """
    s_logp = torch.log_softmax(student_logits.float(), -1)
    s_top = s_logp.gather(-1, topk_ids)  # (B, T, k)
    t_top = topk_logprobs.float()
    # Tail masses: log(1 - sum p_top), computed in log space and clamped away from log(0).
    t_tail = torch.log1p(-t_top.exp().sum(-1).clamp(max=1 - 1e-6))
    s_tail = torch.log1p(-s_top.exp().sum(-1).clamp(max=1 - 1e-6))
    kl = (t_top.exp() * (t_top - s_top)).sum(-1) + t_tail.exp() * (t_tail - s_tail)  # (B, T)
    m = mask.float()
    return (kl * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def answer_positions(labels: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the logits predicting each target token, per row, padded to T.

    With left padding the targets sit at the end of each row: the logit at position j predicts token j+1.
    Returns (idx (B, T) long, mask (B, T)); padded slots point at position 0 and are masked out.
    """
    B, L = labels.shape
    idx = torch.zeros(B, T, dtype=torch.long, device=labels.device)
    mask = torch.zeros(B, T, dtype=torch.long, device=labels.device)
    for b in range(B):
        pos = (labels[b] != -100).nonzero().squeeze(-1) - 1  # logits predicting the labelled tokens
        n = min(T, pos.numel())
        idx[b, :n], mask[b, :n] = pos[:n], 1
    return idx, mask


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
    assert batch.labels is not None, "answer_logits needs a batch built with targets"
    hidden = model.get_decoder()(**batch.model_inputs()).last_hidden_state  # (B, L, d)
    T = int((batch.labels != -100).sum(-1).max().clamp_min(1))
    idx, mask = answer_positions(batch.labels, T)  # (B, T): the position whose output predicts target t
    h = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
    targets = batch.labels.gather(1, (idx + 1).clamp(max=batch.labels.shape[1] - 1)).masked_fill(mask == 0, -100)
    return model.get_output_embeddings()(h), targets, mask


def negative_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    kl_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CE on the teacher's answer + lambda * KL to its top-k distribution, per row.

    Args:
        logits: (B, T, V) answer-aligned; targets, mask: (B, T) the teacher's answer ids and real positions.
        topk_ids / topk_logprobs: (B, Tk, k), Tk <= T, the teacher's distribution at each answer position,
            zero-padded beyond a row's answer length.
    Returns:
        (loss (B,), ce (B,), kl (B,)).
    """
    Tk = topk_ids.shape[1]
    ce = masked_ce(logits, targets, mask)
    kl = topk_tail_kl(logits[:, :Tk], topk_ids, topk_logprobs, mask[:, :Tk])
    return ce + kl_lambda * kl, ce, kl


def decision_bce(score: torch.Tensor, refuse: torch.Tensor) -> torch.Tensor:
    """Binary CE of p = exp(score) against whether the row should refuse.

    Args:
        score: (B,) mean log-probs (<= 0) of the refusal's first tokens; refuse: (B,) bool.
    Returns:
        (B,) -log p where refuse, -log(1 - p) elsewhere.
    """
    s = score.clamp(max=-1e-6)  # log(1 - p) is -inf at p = 1
    return torch.where(refuse, -s, -torch.log(-torch.expm1(s)))


def margins(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, n, V) logits, (B, n) targets -> (B, n): each target's logit minus the best other logit (> 0: the argmax)."""
    t = logits.gather(-1, targets[..., None]).squeeze(-1)
    other = logits.scatter(-1, targets[..., None], float("-inf")).amax(-1)
    return t - other


def decision_margin(m: torch.Tensor, refuse: torch.Tensor, delta: float) -> torch.Tensor:
    """Softplus margins on the refusal's first n tokens, the greedy flag evaluation reads.

    Args:
        m: (B, n) margins of the refusal's first tokens (margins()); refuse: (B,) bool.
    Returns:
        (B,) where refuse: mean softplus(delta - m), every token the argmax by delta; elsewhere
        softplus(delta + min m): refusing needs all n to be the argmax, so the weakest losing by delta is enough.
    """
    return torch.where(refuse, F.softplus(delta - m).mean(-1), F.softplus(delta + m.amin(-1)))
