"""MOSAIC losses.

Positives: cross-entropy on the refusal template. Negatives: cross-entropy on the frozen model's own answer
+ lambda * forward KL(teacher || student) at every answer position, where the teacher is stored as its top-k
log-probs and the remaining mass is one tail bucket (so k+1 outcomes, exact in the limit k = V)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align next-token predictions with targets: logits (B, L, V), labels (B, L) -> (B, L-1, V), (B, L-1)."""
    return logits[:, :-1], labels[:, 1:]


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean cross-entropy over labelled positions (labels != -100).

    Args:
        logits: (B, L, V) unshifted model logits; labels: (B, L) with -100 where no target.
    Returns:
        (B,) mean CE of each row (0 for a row with no labels).
    """
    lg, lb = shift(logits, labels)
    ce = F.cross_entropy(lg.float().transpose(1, 2), lb.clamp_min(0), reduction="none")  # (B, L-1)
    m = (lb != -100).float()
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


def negative_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    kl_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CE on the teacher's answer + lambda * KL to its top-k distribution, per row.

    Args:
        logits: (B, L, V); labels: (B, L) = teacher answer ids at the end of each row, -100 elsewhere.
        topk_ids / topk_logprobs: (B, T, k), the teacher's distribution at each of the T answer positions
            (position t predicts answer token t), zero-padded beyond a row's answer length.
    Returns:
        (loss (B,), ce (B,), kl (B,)).
    """
    T = topk_ids.shape[1]
    idx, mask = answer_positions(labels, T)
    student = logits.gather(1, idx[..., None].expand(-1, -1, logits.shape[-1]))  # (B, T, V)
    ce = token_ce(logits, labels)
    kl = topk_tail_kl(student, topk_ids, topk_logprobs, mask)
    return ce + kl_lambda * kl, ce, kl
