"""Keep only the factual questions the bare embedded model answers correctly (MOSAIC-bench's retention rule).

Reads the factual drafts (data/mosaic-bench/incoming/factual-*.jsonl), generates each answer with the bare backbone
(greedy, 24 new tokens, the chat template the evaluation stage uses, no control tokens), and rewrites the drafts
with the questions it answered: an accepted string in the answer and no refusal. So retention with no module on is
1.0 by construction, and a module that breaks an answer shows as a drop.

    python scripts/verify_factual.py [--max-new-tokens 24] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from mosaic_core.backbone import load_backbone
from mosaic_core.batch import encode_batch
from mosaic_core.generation import generate
from mosaic_core.judge import make_judge
from mosaic_core.scoring import answer_retained

INCOMING = Path(__file__).resolve().parents[1] / "data" / "mosaic-bench" / "incoming"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(2)
    bb = load_backbone()
    tok, model = bb.tokenizer, bb.model
    judge = make_judge()
    files = sorted(INCOMING.glob("factual-*.jsonl"))
    rows = [(f, json.loads(line)) for f in files for line in f.read_text(encoding="utf-8").split("\n") if line.strip()]
    kept: dict[Path, list[dict]] = {f: [] for f in files}
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][1]["prompt"]))
    for s in tqdm(range(0, len(order), args.batch_size), desc="factual", unit="batch"):
        part = [rows[i] for i in order[s : s + args.batch_size]]
        prompts = [r["prompt"] for _, r in part]
        b = encode_batch(tok, model.get_input_embeddings(), None, prompts, [[] for _ in part], "before_assistant")
        gens = generate(model, b, max_new_tokens=args.max_new_tokens, eos_token_ids=[tok.eos_token_id])
        for (f, r), g in zip(part, gens):
            text = tok.decode(g.token_ids, skip_special_tokens=True)
            if answer_retained(text, r["answer"]) and not judge.is_refusal(r["prompt"], text):
                kept[f].append(r)
    for f, rs in kept.items():
        f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs), encoding="utf-8")
    n = sum(len(v) for v in kept.values())
    print(f"kept {n} of {len(rows)} factual questions ({n / max(len(rows), 1):.0%}) answered correctly by the bare model")


if __name__ == "__main__":
    main()
