"""One MOSAIC training step's loss for a batch of examples with mixed active sets (plain torch; the Ray
Train + DeepSpeed worker and the benchmarks both call it).

Positives (label `pos`): CE on the refusal template (+ EOS). Negatives (`neg`): CE on the teacher's answer +
lambda * KL(teacher || student) at every answer position (top-k + tail bucket)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mosaic_core.bank import ControlTokenBank
from mosaic_core.compose import encode_batch
from mosaic_core.config import LossConfig, Placement
from mosaic_core.losses import negative_loss, token_ce


def refusal_target(tokenizer: Any, template: str) -> list[int]:
    """Token ids the model must produce to refuse: the template followed by EOS (end of turn)."""
    return list(tokenizer(template, add_special_tokens=False).input_ids) + [tokenizer.eos_token_id]


def _padded(rows: Sequence[Sequence[Sequence[float]]], k: int, dtype: torch.dtype) -> torch.Tensor:
    """Ragged (B, T_i, k) lists -> zero-padded (B, T_max, k) tensor."""
    T = max((len(r) for r in rows), default=1) or 1
    out = torch.zeros(len(rows), T, k, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


def batch_loss(
    model: Any, tokenizer: Any, bank: ControlTokenBank, examples: Sequence[dict[str, Any]], refusal_ids: Sequence[int],
    loss_cfg: LossConfig, placement: Placement | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Loss of B examples: dicts with prompt, active, label, and for negatives the teacher's response_ids,
    topk_ids, topk_logprobs. Returns `loss` (scalar, mean over rows) and detached `pos_ce`, `neg_ce`, `kl`,
    `tokens` for logging."""
    placement = placement or bank.placement  # type: ignore[assignment]
    targets = [list(refusal_ids) if e["label"] == "pos" else list(e["response_ids"]) for e in examples]
    batch = encode_batch(tokenizer, model.get_input_embeddings(), bank, [e["prompt"] for e in examples],
                         [list(e["active"]) for e in examples], placement, targets)  # type: ignore[arg-type]  # fmt: skip
    logits = model(**batch.model_inputs()).logits
    is_pos = torch.tensor([e["label"] == "pos" for e in examples])
    per_row = torch.zeros(len(examples), device=logits.device)
    stats = {"pos_ce": torch.tensor(0.0), "neg_ce": torch.tensor(0.0), "kl": torch.tensor(0.0)}
    if is_pos.any():
        idx = is_pos.nonzero().squeeze(-1)
        ce = token_ce(logits[idx], batch.labels[idx])
        per_row = per_row.index_put((idx,), ce)
        stats["pos_ce"] = ce.detach().mean()
    if (~is_pos).any():
        idx = (~is_pos).nonzero().squeeze(-1)
        neg = [examples[i] for i in idx.tolist()]
        k = len(neg[0]["topk_ids"][0])
        top_ids = _padded([e["topk_ids"] for e in neg], k, torch.long).to(logits.device)
        top_lp = _padded([e["topk_logprobs"] for e in neg], k, torch.float32).to(logits.device)
        loss, ce, kl = negative_loss(logits[idx], batch.labels[idx], top_ids, top_lp, loss_cfg.kl_lambda)
        per_row = per_row.index_put((idx,), loss)
        stats["neg_ce"], stats["kl"] = ce.detach().mean(), kl.detach().mean()
    return {"loss": per_row.mean(), **stats, "tokens": batch.attention_mask.sum().detach()}
