"""Deep control tokens *before* the request: do modules that every request token can read beat modules that only the
answer reads?

    .venv/bin/python benchmarks/deep_prefix_probe.py [--steps 450] [--every 150] [--lr 0.01]

`deep_prompt_probe.py` puts each module's keys/values right after the request (the product's deep tokens): only the
assistant header and the answer attend to them, so a module's test "is this my category" is a bilinear read of the
answer position's own state at each layer. `linear_probe_ceiling.py` found that such a read-out of the last prompt
token's state tops out near where the best deep bank sits (DSR - OR 85 / 80 / 75 points at orders 1 / 2 / 3), while a
read-out of the prompt's *mean* state reaches 91 / 90 / 88 — the category information is spread over the request's
tokens. Here the same blocks sit at the very start of the sequence (positions 0..c-1, before the system prompt), as
in prefix tuning: every request token attends to them at every layer, so a module can change how the whole request
is read, and the answer position pools that. The cost: nothing before the answer can come from a prefix cache (the
request's keys/values now depend on the bank), so every step runs the whole row forward and backward.

Everything else is `deep_prompt_probe.py`'s first row, so the two runs compare step for step: the same start (the
committed input bank's tokens' own keys/values, averaged over 16 train requests), the recipe's train examples in the
same order, decision_margin_probe.py's loss on the refusal's first 3 tokens (softplus margins + first-position KL to
the base model, which has no block, so its logits still come from the prefix cache), batch 16, Adam, seed 0. Every
`--every` steps: greedy-prefix DSR / OR on fast_score_agreement.py's 180-row test sample. A prototype: the product's
modules, serving and artifacts place deep blocks after the request.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from decision_margin_probe import decision_loss  # the sibling scripts
from deep_prompt_probe import flag_hits, new_deep_bank, probe_data, rates

from mosaic_core.bank import DeepTokenBank
from mosaic_core.compose import Batch, PrefixCache, answer_logits, encode_batch, pack_deep_blocks


def prepend_deep_blocks(model: Any, batch: Batch, blocks: Sequence[torch.Tensor]) -> Batch:
    """Put each row's deep block before its tokens, in place: the block is the whole KV cache (left-padded within its
    slot; keys get RoPE at positions 0..c_i-1) and the row's positions shift by c_i.

    batch: built without a cache (attention_mask (B, L)); blocks: B tensors (layers, 2, H, c_i, hd), keys before RoPE.
    """
    from transformers import DynamicCache

    if max(b.shape[3] for b in blocks) == 0:  # no module on any row: the base model
        return batch
    start = torch.zeros(len(blocks), dtype=torch.long, device=batch.inputs_embeds.device)  # before everything
    kc, vc, cmask = pack_deep_blocks(model, blocks, start, batch.inputs_embeds.dtype)
    cache = DynamicCache()
    for layer in range(kc.shape[0]):
        cache.update(kc[layer], vc[layer], layer)
    batch.past_key_values = cache
    batch.attention_mask = torch.cat([cmask, batch.attention_mask], 1)
    batch.position_ids = batch.position_ids + cmask.sum(-1)[:, None]
    return batch


def prefix_logits(model: Any, tok: Any, deep: DeepTokenBank, prompts: list[str], active: list[list[str]],
                  targets: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """answer_logits with each row's deep block before everything: (B, T, V), (B, T), (B, T)."""
    batch = encode_batch(tok, model.get_input_embeddings(), None, prompts, [[] for _ in prompts], "before_assistant", targets)
    return answer_logits(model, prepend_deep_blocks(model, batch, [deep.compose(a) for a in active]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank", default="banks/smollm2-cpu")
    ap.add_argument("--config", default="pipelines/configs/smollm2-cpu.yaml")
    ap.add_argument("--init-prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=450)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--delta", type=float, default=2.0)
    ap.add_argument("--kl", type=float, default=1.0)
    ap.add_argument("--every", type=int, default=150)
    ap.add_argument("--per-order", type=int, default=30)
    ap.add_argument("--out", default="runs/deep-prefix-probe")
    a = ap.parse_args(argv)
    _, bb, bank, ref, train, ex, _, sample = probe_data(a.config, a.bank, a.per_order)
    tok, model = bb.tokenizer, bb.model
    cats = list(bank.categories)
    t0 = time.perf_counter()
    init_prompts = [q.prompt for q in train[:: max(1, len(train) // a.init_prompts)][: a.init_prompts]]
    deep = new_deep_bank(model, cats, dict(DeepTokenBank.from_input_bank(model, tok, bank, init_prompts).vectors))
    cache = PrefixCache(model)  # the base model's logits only (the KL): no block there
    opt = torch.optim.Adam(deep.parameters(), lr=a.lr)
    out = Path(a.out)
    log: list[dict[str, Any]] = []

    def checkpoint(step: int) -> None:
        hits = flag_hits(lambda p, act, t: prefix_logits(model, tok, deep, p, act, t), sample, ref)
        d, o = rates(hits, sample)
        log.append({"step": step, "dsr": d, "or": o, "s": round(time.perf_counter() - t0, 1)})
        out.mkdir(parents=True, exist_ok=True)
        torch.save({c: p.detach() for c, p in deep.vectors.items()}, out / "deep_bank.pt")
        print(f"step {step:4d}: test sample, greedy prefix: DSR {100 * d:5.1f} %  OR {100 * o:5.1f} %  "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip

    checkpoint(0)
    for step in range(1, a.steps + 1):
        start = ((step - 1) * a.batch) % len(ex)
        b = [(e.prompt, list(e.active), e.label == "pos") for e in ex[start : start + a.batch]]
        prompts, active = [x[0] for x in b], [x[1] for x in b]
        is_pos = torch.tensor([x[2] for x in b])
        logits, tgt, _ = prefix_logits(model, tok, deep, prompts, active, [ref[:3]] * len(b))  # (B, 3, V)
        loss = decision_loss(model, tok, logits, tgt, is_pos, prompts, ref, cache, "before_assistant", a.delta, a.kl)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        if step % 20 == 0:
            print(f"step {step} loss {loss.mean().item():.3f} {time.perf_counter() - t0:.0f}s", flush=True)
        if step % a.every == 0 or step == a.steps:
            checkpoint(step)
    (out / "report.json").write_text(json.dumps({"args": vars(a), "sample": log}, indent=1))
    print(f"wrote {out / 'report.json'} ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
