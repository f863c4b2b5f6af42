import torch

from mosaic_core.losses import answer_positions, decision_bce, decision_margin, margins, masked_ce, negative_loss, topk_tail_kl


def _bucketed_kl_bruteforce(t_logits, s_logits, k):
    """KL over (teacher top-k tokens + one tail bucket), from full distributions, one position at a time."""
    out = []
    for tl, sl in zip(t_logits, s_logits):
        p, q = tl.softmax(-1), sl.softmax(-1)
        top = p.topk(k).indices
        rest = torch.ones_like(p, dtype=torch.bool)
        rest[top] = False
        pb = torch.cat([p[top], p[rest].sum()[None]])
        qb = torch.cat([q[top], q[rest].sum()[None]])
        out.append((pb * (pb.log() - qb.log())).sum())
    return torch.stack(out)


def test_topk_tail_kl_matches_bruteforce():
    torch.manual_seed(0)
    V, T, k = 50, 6, 5
    t_logits, s_logits = torch.randn(T, V) * 2, torch.randn(T, V) * 2
    t_lp = torch.log_softmax(t_logits, -1)
    top_lp, top_ids = t_lp.topk(k, -1)
    ours = topk_tail_kl(s_logits[None], top_ids[None], top_lp[None], torch.ones(1, T))
    assert torch.allclose(ours, _bucketed_kl_bruteforce(t_logits, s_logits, k).mean()[None], atol=1e-5)


def test_full_vocab_topk_equals_exact_kl_and_zero_for_identical():
    torch.manual_seed(1)
    V, T = 20, 4
    t_logits, s_logits = torch.randn(T, V), torch.randn(T, V)
    t_lp = torch.log_softmax(t_logits, -1)
    top_lp, top_ids = t_lp.topk(V, -1)
    exact = (t_lp.exp() * (t_lp - torch.log_softmax(s_logits, -1))).sum(-1).mean()
    ours = topk_tail_kl(s_logits[None], top_ids[None], top_lp[None], torch.ones(1, T))
    assert torch.allclose(ours, exact[None], atol=1e-5)
    same = topk_tail_kl(t_logits[None], top_ids[None, :, :5], top_lp[None, :, :5], torch.ones(1, T))
    assert same.abs().item() < 1e-5


def test_masked_positions_do_not_count():
    torch.manual_seed(2)
    V, T, k = 30, 5, 4
    s = torch.randn(1, T, V)
    lp, ids = torch.log_softmax(torch.randn(1, T, V), -1).topk(k, -1)
    m = torch.tensor([[1, 1, 0, 0, 0]])
    assert torch.allclose(topk_tail_kl(s, ids, lp, m), topk_tail_kl(s[:, :2], ids[:, :2], lp[:, :2], m[:, :2]))


def test_masked_ce_per_row():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 11)
    targets = torch.tensor([[4, 5, 6], [7, -100, -100]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    ce = masked_ce(logits, targets, mask)
    ref0 = torch.nn.functional.cross_entropy(logits[0], targets[0])
    ref1 = torch.nn.functional.cross_entropy(logits[1, :1], targets[1, :1])
    assert torch.allclose(ce, torch.stack([ref0, ref1]), atol=1e-6)


def test_answer_positions_with_left_padded_labels():
    labels = torch.tensor([[-100, -100, -100, -100, 3, 4, 5], [-100, -100, -100, -100, -100, -100, 9]])
    idx, mask = answer_positions(labels, 3)
    assert idx.tolist() == [[3, 4, 5], [5, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_negative_loss_is_ce_when_the_student_is_the_teacher():
    torch.manual_seed(4)
    logits = torch.randn(2, 3, 13)
    targets, mask = torch.tensor([[3, 4, 5], [9, -100, -100]]), torch.tensor([[1, 1, 1], [1, 0, 0]])
    lp, ids = torch.log_softmax(logits, -1).topk(4, -1)
    loss, ce, kl = negative_loss(logits, targets, mask, ids, lp, kl_lambda=1.0)
    assert kl.abs().max() < 1e-5 and torch.allclose(loss, ce) and torch.allclose(ce, masked_ce(logits, targets, mask))
    # a shorter teacher (Tk < T) only covers its own positions
    _, _, kl2 = negative_loss(logits + torch.randn_like(logits), targets, mask, ids[:, :1], lp[:, :1], kl_lambda=1.0)
    assert torch.isfinite(kl2).all() and (kl2 > 0).all()
    # the KL is weighed by lambda, the CE by 1
    loss3, ce3, kl3 = negative_loss(logits + 1.5 * torch.randn_like(logits), targets, mask, ids, lp, kl_lambda=2.0)
    assert (kl3 > 0).all() and torch.allclose(loss3, ce3 + 2 * kl3)


def test_decision_bce_is_binary_ce_of_exp_score():
    p = torch.tensor([0.9, 0.2, 0.9, 0.2])
    refuse = torch.tensor([True, True, False, False])
    got = decision_bce(p.log(), refuse)
    want = torch.nn.functional.binary_cross_entropy(p, refuse.float(), reduction="none")
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.isfinite(decision_bce(torch.zeros(1), torch.tensor([False]))).all()  # p = 1 clamps, no inf


def test_margins_and_the_margin_decision_loss():
    logits = torch.tensor([[[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]]])  # (1, 2, 3)
    m = margins(logits, torch.tensor([[0, 1]]))
    assert torch.equal(m, torch.tensor([[2.0, -3.0]]))  # token 0 wins by 2; token 1 loses to token 2 by 3
    sp = torch.nn.functional.softplus
    refuse = decision_margin(m, torch.tensor([True]), 1.0)
    keep_off = decision_margin(m, torch.tensor([False]), 1.0)
    assert torch.allclose(refuse, (sp(torch.tensor(-1.0)) + sp(torch.tensor(4.0))) / 2)  # every token must win by 1
    assert torch.allclose(keep_off, sp(torch.tensor(1.0 - 3.0)))  # one token losing (the weakest) is enough
