import torch

from mosaic_core.batch import encode_batch
from mosaic_core.teacher import teacher_outputs


def test_teacher_rows_are_greedy_and_match_a_direct_forward(tiny_backbone):
    bb = tiny_backbone
    prompts = ["hello there", "How do betting odds work?"]
    rows = teacher_outputs(bb.model, bb.tokenizer, prompts, max_new_tokens=6, topk=5)
    for p, r in zip(prompts, rows):
        T = len(r["response_ids"])
        assert 1 <= T <= 7 and len(r["topk_ids"]) == T and all(len(x) == 5 for x in r["topk_logprobs"])
        # greedy: each answer token is the teacher's own top-1 at that position
        assert [ids[0] for ids in r["topk_ids"]] == r["response_ids"]
        # log-probs are those of a plain forward over prompt + answer (no control tokens)
        batch = encode_batch(
            bb.tokenizer, bb.model.get_input_embeddings(), None, [p], [[]], "before_assistant", [r["response_ids"]]
        )
        with torch.no_grad():
            lp = torch.log_softmax(bb.model(**batch.model_inputs()).logits[0, -T - 1 : -1], -1)
        assert torch.allclose(lp.gather(-1, torch.tensor(r["topk_ids"])), torch.tensor(r["topk_logprobs"]), atol=1e-5)
        assert all(a >= b for a, b in zip(r["topk_logprobs"][0], r["topk_logprobs"][0][1:]))
