"""benchmarks/deep_prefix_probe.py: a deep block placed before a row is exactly the keys/values of tokens placed there
(tiny model), no block is the base model, padding inside the block slot changes nothing, gradients reach every module;
and a smoke run of the script on the real backbone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _setup(tok):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import deep_prefix_probe

    from tests.tiny import tiny_model

    torch.manual_seed(0)
    return tiny_model(len(tok), init_range=0.2), deep_prefix_probe


def test_a_block_before_the_row_is_the_keys_and_values_of_tokens_there(tiny_tok):
    from mosaic_core.compose import answer_logits, encode_batch, rotate

    model, probe = _setup(tiny_tok)
    embed, dec = model.get_input_embeddings(), model.get_decoder()
    x = torch.tensor([[5, 17, 9]])  # three "module" tokens
    with torch.no_grad():
        past = dec(input_ids=x, use_cache=True).past_key_values
        cos, sin = dec.rotary_emb(past.layers[0].keys, torch.arange(3)[None])
        block = torch.stack([torch.stack([rotate(lay.keys[0], cos, sin, inverse=True), lay.values[0]])
                             for lay in past.layers])  # (layers, 2, H, 3, hd): keys before RoPE
        ref = [2, 7, 11]
        batch = encode_batch(tiny_tok, embed, None, ["Mix me a mojito."], [[]], "before_assistant", [ref])
        n = 3 + batch.inputs_embeds.shape[1]
        joined = type(batch)(inputs_embeds=torch.cat([embed(x), batch.inputs_embeds], 1),
                             attention_mask=torch.ones(1, n, dtype=torch.long), position_ids=torch.arange(n)[None],
                             labels=torch.cat([torch.full((1, 3), -100), batch.labels], 1), prompt_len=batch.prompt_len + 3)
        want, _, _ = answer_logits(model, joined)  # the three tokens themselves before the row
        got, _, _ = answer_logits(model, probe.prepend_deep_blocks(model, batch, [block]))  # block: (layers, 2, H, 3, hd)
    assert torch.allclose(got, want, atol=1e-4)


def test_no_block_is_the_base_model_and_the_loss_reaches_every_module(tiny_tok):
    from mosaic_core.bank import DeepTokenBank
    from mosaic_core.compose import answer_logits, encode_batch

    model, probe = _setup(tiny_tok)
    deep = DeepTokenBank.for_model(model, 2)
    for c in ("alcohol", "betting"):
        deep.add(c, torch.randn(deep.module_shape))
    prompts, ref = ["Mix me a mojito.", "Odds on red tonight?"], [[2, 7, 11]] * 2
    plain = encode_batch(tiny_tok, model.get_input_embeddings(), None, prompts, [[], []], "before_assistant", ref)
    base, _, _ = answer_logits(model, plain)
    none, _, _ = probe.prefix_logits(model, tiny_tok, deep, prompts, [[], []], ref)
    assert torch.equal(none, base)
    mixed, _, _ = probe.prefix_logits(model, tiny_tok, deep, prompts, [["alcohol"], ["alcohol", "betting"]], ref)
    alone, _, _ = probe.prefix_logits(model, tiny_tok, deep, prompts[:1], [["alcohol"]], ref[:1])
    assert not torch.allclose(mixed[0], base[0])
    assert torch.allclose(mixed[:1], alone, atol=1e-4)  # a shorter block, left-padded in a batch: the same row
    mixed.logsumexp(-1).sum().backward()
    assert deep.vectors["alcohol"].grad.abs().sum() > 0 and deep.vectors["betting"].grad.abs().sum() > 0


@pytest.mark.slow
def test_the_probe_trains_and_scores_on_the_real_backbone(tmp_path):
    cmd = [sys.executable, "benchmarks/deep_prefix_probe.py", "--steps", "2", "--every", "2", "--per-order", "1",
           "--init-prompts", "2", "--out", str(tmp_path)]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["step"] for r in report["sample"]] == [0, 2]
    assert all(0 <= r["dsr"] <= 1 and 0 <= r["or"] <= 1 for r in report["sample"])
    assert sorted(torch.load(tmp_path / "deep_bank.pt")) == ["addiction", "alcohol", "betting", "horror", "sex"]
