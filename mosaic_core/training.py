"""One MOSAIC training step's loss for a batch of examples with mixed active sets (plain torch; the Ray
Train + DeepSpeed worker and the benchmarks both call it).

Positives (label `pos`): CE on the refusal template (+ EOS). Negatives (`neg`): CE on the teacher's answer +
lambda * KL(teacher || student) at every answer position (top-k + tail bucket). With `decision.weight` > 0, every
row also gets a decision loss on starting the refusal (negatives through one short probe row each: prompt + tokens
+ the refusal's first tokens): a binary CE on its probability, or (`decision.kind: margin`) softplus margins on the
greedy flag itself. `pos_weight` scales the positives' rows; `max_answer_tokens` cuts negatives' targets to their
first tokens. `BankEMA`: a moving average of the trainable modules."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from mosaic_core.bank import Bank
from mosaic_core.batch import encode_batch
from mosaic_core.cache import PrefixCache
from mosaic_core.config import LossConfig, Placement
from mosaic_core.losses import answer_logits, decision_bce, decision_margin, margins, masked_ce, negative_loss


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


def _cut(e: dict[str, Any], n: int) -> dict[str, Any]:
    """A negative with its teacher answer cut to the first n tokens (n = 0: unchanged)."""
    if not n or e["label"] == "pos" or len(e["response_ids"]) <= n:
        return e
    return {**e, "response_ids": e["response_ids"][:n], "topk_ids": e["topk_ids"][:n], "topk_logprobs": e["topk_logprobs"][:n]}


def request_of(example: dict[str, Any]) -> Any:
    """What an example asks: its framed chat (a message list) when it has one, else the plain prompt text."""
    messages = example.get("messages")
    return json.loads(messages) if messages else example["prompt"]


def batch_loss(
    model: Any,
    tokenizer: Any,
    bank: Bank,
    examples: Sequence[dict[str, Any]],
    refusal_ids: Sequence[int],
    loss_cfg: LossConfig,
    placement: Placement | None = None,
    cache: PrefixCache | None = None,
) -> dict[str, torch.Tensor]:
    """Loss of B examples: dicts with prompt, active, label, and for negatives the teacher's response_ids,
    topk_ids, topk_logprobs. Returns `loss` (scalar, mean over rows) and detached `pos_ce`, `neg_ce`, `kl`,
    `decision` (mean decision BCE, 0 when off), `tokens` (the rows' real tokens, cached or
    not) for logging. `cache` serves the runs before the control blocks (identical results, less compute)."""
    placement = placement or bank.placement  # type: ignore[assignment]
    examples = [_cut(e, loss_cfg.max_answer_tokens) for e in examples]
    refusal = list(refusal_ids)
    targets = [refusal if e["label"] == "pos" else list(e["response_ids"]) for e in examples]
    # Only positives hide request tokens (a DroppingCache's train.request_dropout): a negative's target is the teacher's
    # answer to the whole request, and a bank fitted to that answer under hidden words learns to repair requests.
    is_pos_rows = [e["label"] == "pos" for e in examples]
    # gated=False: tokens learn what they do where inserted; whether a gated module is inserted is its gate's job
    batch = encode_batch(
        tokenizer,
        model.get_input_embeddings(),
        bank,
        [request_of(e) for e in examples],
        [list(e["active"]) for e in examples],
        placement,
        targets,
        cache=cache,
        hide=is_pos_rows,
        gated=False,
    )  # type: ignore[arg-type]
    logits, tgt, mask = answer_logits(model, batch)  # (B, T, V), (B, T), (B, T)
    is_pos = torch.tensor(is_pos_rows)
    per_row = torch.zeros(len(examples), device=logits.device)
    stats = {"pos_ce": torch.tensor(0.0), "neg_ce": torch.tensor(0.0), "kl": torch.tensor(0.0), "decision": torch.tensor(0.0)}
    tokens = batch.attention_mask.sum().detach()  # the rows' real tokens, cached or not
    decision = loss_cfg.decision
    decide, n_dec = decision.weight > 0, decision.tokens
    dec = torch.zeros(len(examples), device=logits.device)
    margin = decision.kind == "margin"
    if is_pos.any():
        idx = is_pos.nonzero().squeeze(-1)
        ce = masked_ce(logits[idx], tgt[idx], mask[idx])
        per_row = per_row.index_put((idx,), ce)
        stats["pos_ce"] = ce.detach().mean()
        if decide and margin:
            m = margins(logits[idx, :n_dec], tgt[idx, :n_dec])
            dec = dec.index_put((idx,), decision_margin(m, torch.ones_like(idx, dtype=torch.bool), decision.delta))
        elif decide:  # -log p(refusal's first n tokens) = their mean CE
            dec = dec.index_put((idx,), masked_ce(logits[idx, :n_dec], tgt[idx, :n_dec], mask[idx, :n_dec]))
    if (~is_pos).any():
        idx = (~is_pos).nonzero().squeeze(-1)
        neg = [examples[i] for i in idx.tolist()]
        k = len(neg[0]["topk_ids"][0])
        top_ids = _padded([e["topk_ids"] for e in neg], k, torch.long).to(logits.device)
        top_lp = _padded([e["topk_logprobs"] for e in neg], k, torch.float32).to(logits.device)
        loss, ce, kl = negative_loss(logits[idx], tgt[idx], mask[idx], top_ids, top_lp, loss_cfg.kl_lambda)
        per_row = per_row.index_put((idx,), loss)
        stats["neg_ce"], stats["kl"] = ce.detach().mean(), kl.detach().mean()
        if decide:  # the probe rows: same context, the refusal's first tokens as the continuation to score
            probe = encode_batch(
                tokenizer,
                model.get_input_embeddings(),
                bank,
                [request_of(e) for e in neg],
                [list(e["active"]) for e in neg],
                placement,
                [list(refusal_ids[:n_dec])] * len(neg),
                cache=cache,
                hide=[False] * len(neg),
                gated=False,
            )  # type: ignore[arg-type]
            p_logits, p_tgt, p_mask = answer_logits(model, probe)
            no = torch.zeros_like(idx, dtype=torch.bool)
            if margin:  # where the teacher itself refuses, its refusal is the target: no push off it
                own = torch.tensor([list(e["response_ids"][:n_dec]) == list(refusal_ids[:n_dec]) for e in neg], device=no.device)
                keep_off = decision_margin(margins(p_logits, p_tgt), no, decision.delta).masked_fill(own, 0.0)
                dec = dec.index_put((idx,), keep_off)
            else:
                dec = dec.index_put((idx,), decision_bce(-masked_ce(p_logits, p_tgt, p_mask), no))
            tokens = tokens + probe.attention_mask.sum().detach()
    if decide:
        per_row = per_row + decision.weight * dec
        stats["decision"] = dec.detach().mean()
    if loss_cfg.pos_weight != 1.0:
        per_row = per_row * torch.where(is_pos, loss_cfg.pos_weight, 1.0).to(per_row.device)
    return {"loss": per_row.mean(), **stats, "tokens": tokens}


class BankEMA:
    """An exponential moving average of a bank's trainable modules (train.ema): `update()` after each optimizer step
    (ema <- decay * ema + (1 - decay) * param), `swapped()` puts the averages into the bank for validation or saving
    and restores the raw parameters after. Frozen modules are not tracked (they never move)."""

    def __init__(self, bank: Bank, decay: float, state: dict[str, torch.Tensor] | None = None):
        if not 0 < decay < 1:
            raise ValueError(f"decay {decay} must be in (0, 1)")
        self.bank, self.decay = bank, decay
        tracked = [c for c in bank.categories if bank.vectors[c].requires_grad]
        src = {c: state[c] if state is not None and c in state else bank.vectors[c] for c in tracked}
        self.shadow = {c: v.detach().to(bank.vectors[c].device, torch.float32).clone() for c, v in src.items()}

    @torch.no_grad()
    def update(self) -> None:
        for c, s in self.shadow.items():
            s.lerp_(self.bank.vectors[c].detach().to(s.dtype), 1.0 - self.decay)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        raw = {c: self.bank.vectors[c].detach().clone() for c in self.shadow}
        with torch.no_grad():
            for c, s in self.shadow.items():
                self.bank.vectors[c].copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for c, r in raw.items():
                    self.bank.vectors[c].copy_(r)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {c: s.clone() for c, s in self.shadow.items()}
