"""Module gates: a linear test of what the frozen backbone makes of a request, deciding whether an active module's
control tokens are inserted at all (docs/experiments/gated-modules.md).

A request's features are a weighted mean of the backbone's hidden states over the request's own tokens (after the
chat template's shared head) at a few layers, concatenated: (|layers| * d,). The weights are uniform, or with a
`recency` of r tokens decay as exp(-k / r) with a token's distance k from the request's end: a framing ("for my
novel...", "you are an assistant that never refuses") mostly comes first and a request's own question last, so its
words then weigh less and switch modules on or off less often (docs/experiments/one-recipe.md). A gate is one
weight vector and a bias over them, fitted per category by logistic regression on the train split (one against the
rest); it fires where `features @ w + b > 0`. A softmax gate is fitted once for all categories and "no category"
together, and a category's gate fires where the request is more likely its own than any other category's or none's:
one category's evidence then counts against the others', so a request of another category (or a look-alike) switches
fewer modules on than under five independent tests (docs/experiments/softmax-gates.md). It is stored per module as
rows of scores against "no category", the module's own first. Where no active module's gate fires, nothing is
inserted and the answer is the bare backbone's, bit for bit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


@torch.inference_mode()
def request_features(
    model: Any,
    runs: Sequence[Sequence[int]],
    head: int,
    layers: Sequence[int],
    batch_size: int = 16,
    recency: float | None = None,
) -> torch.Tensor:
    """Mean hidden state of each run's tokens after its first `head` (the template's system prompt and user header),
    uniform or weighted towards the run's end (`recency`, in tokens; the module docstring).

    Args:
        model: a causal LM whose `get_decoder()` returns hidden states (index 0: the embeddings, i: after layer i).
        runs: B token runs (a request's templated turns up to the control block); each longer than `head`.
        layers: which hidden states to average, e.g. (10, 20, 30).
        recency: None for a plain mean; r > 0 weighs the token k places before the run's last one by exp(-k / r).
    Returns:
        (B, len(layers) * d) float32, rows in the order of `runs`. Runs are batched by length (less padding);
        right padding leaves every real token's states as in an unpadded forward.
    """
    if any(len(r) <= head for r in runs):
        raise ValueError(f"every run needs tokens after its {head}-token head")
    if recency is not None and not recency > 0:
        raise ValueError(f"recency {recency} must be > 0 tokens (None: a plain mean)")
    device = model.get_input_embeddings().weight.device
    order = sorted(range(len(runs)), key=lambda i: len(runs[i]))
    out: list[torch.Tensor | None] = [None] * len(runs)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        T = max(len(runs[i]) for i in idx)
        ids = torch.zeros(len(idx), T, dtype=torch.long, device=device)
        mask = torch.zeros(len(idx), T, dtype=torch.long, device=device)
        for j, i in enumerate(idx):
            ids[j, : len(runs[i])], mask[j, : len(runs[i])] = torch.tensor(list(runs[i]), device=device), 1
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        own = mask.clone().float()
        own[:, :head] = 0
        if recency is not None:
            ends = mask.sum(1, keepdim=True) - 1  # (b, 1): each run's last real token
            own = own * torch.exp(-(ends - torch.arange(T, device=device)).clamp(min=0) / recency)
        w = (own / own.sum(1, keepdim=True)).unsqueeze(-1)  # (b, T, 1): a weighted mean over the own tokens
        feats = torch.cat([(hidden[layer].float() * w).sum(1) for layer in layers], -1)
        for j, i in enumerate(idx):
            out[i] = feats[j].cpu()
    return torch.stack(out)  # type: ignore[arg-type]


def fit_gate(
    features: torch.Tensor, labels: torch.Tensor, weight_decay: float = 0.01, threshold: float = 0.5, max_iter: int = 200
) -> torch.Tensor:
    """A gate by logistic regression, positives and negatives weighing the same in total.

    Args:
        features: (N, F) request features; labels: (N,) 1 for the category's requests, 0 for the rest.
        weight_decay: L2 on the weights of the standardised features.
        threshold: the probability at and above which the gate fires, folded into the bias.
    Returns:
        (F + 1,) float32: the weights over raw features, then the bias; fires where `x @ g[:-1] + g[-1] > 0`.
    """
    _check_probability("threshold", threshold)
    y = labels.float()
    if not 0 < y.sum() < len(y):
        raise ValueError("a gate needs both positives and negatives")
    pos_weight = (1 - y).sum() / y.sum()

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)

    raw_w, bias = _fit_linear(features, (), loss, weight_decay, max_iter)
    return at_threshold(torch.cat([raw_w, bias[None]]).float(), threshold)


def at_threshold(gate: torch.Tensor, threshold: float, fitted_at: float = 0.5) -> torch.Tensor:
    """The same gate firing at probability `threshold` instead of `fitted_at`: a logistic gate's probability is
    sigmoid(x @ w + b), so only the bias moves, by logit(fitted_at) - logit(threshold).

    Args:
        gate: (F + 1,) weights then bias, as `fit_gate` returns; fires at p >= `fitted_at`.
    Returns:
        (F + 1,) a new tensor, the weights unchanged.
    """
    if gate.ndim != 1:
        raise ValueError("a softmax gate fires where its category is the most likely: it has no threshold to move")
    _check_probability("threshold", threshold)
    _check_probability("fitted_at", fitted_at)
    shift = torch.logit(torch.tensor(fitted_at)) - torch.logit(torch.tensor(threshold))
    return torch.cat([gate[:-1], gate[-1:] + shift.to(gate)])


def _check_probability(name: str, p: float) -> None:
    if not 0 < p < 1:
        raise ValueError(f"{name} {p} must be in (0, 1)")


def fit_softmax_gates(
    features: torch.Tensor, labels: torch.Tensor, categories: int, weight_decay: float = 0.01, max_iter: int = 300
) -> torch.Tensor:
    """One softmax over `categories` + "no category", every class weighing the same in total; a category's gate
    fires where its class is the most likely.

    Args:
        features: (N, F) request features; labels: (N,) long, a category's index in 0..categories-1, or `categories`
            for a request of no category.
        weight_decay: L2 on the weights of the standardised features.
    Returns:
        (categories, categories, F + 1) float32: [k] is category k's gate, rows of scores against "no category"
        (weights over raw features, then the bias), category k's row first, then the others' in index order.
    """
    K = categories + 1
    counts = torch.bincount(labels, minlength=K)
    if labels.min() < 0 or labels.max() >= K or not bool((counts > 0).all()):
        raise ValueError(f"a softmax gate needs requests of every one of the {categories} categories and of none")
    class_weight = len(labels) / (K * counts.float())

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, labels, weight=class_weight)

    raw_w, bias = _fit_linear(features, (K,), loss, weight_decay, max_iter)
    rows = torch.cat([raw_w.T, bias[:, None]], 1)  # (K, F + 1): scores over raw features
    rows = rows[:categories] - rows[categories]  # against "no category": a gate fires only above 0
    order = [[k] + [j for j in range(categories) if j != k] for k in range(categories)]
    return torch.stack([rows[o] for o in order]).float()


def _fit_linear(
    features: torch.Tensor, outputs: tuple[int, ...], loss: Any, weight_decay: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (F, *outputs) and biases (*outputs) minimising `loss(logits)` + L2 on the weights of the standardised
    features (LBFGS), returned over the raw features: x_std @ w == x @ (w / sd) - mu @ (w / sd)."""
    mu, sd = features.mean(0), features.std(0) + 1e-6
    x = (features - mu) / sd
    w = torch.zeros(x.shape[1], *outputs, requires_grad=True)
    b = torch.zeros(outputs, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = loss(x @ w + b) + weight_decay * (w * w).sum()
        total.backward()
        return total

    opt.step(closure)
    with torch.no_grad():
        raw_w = w / sd.reshape(-1, *[1] * len(outputs))
        return raw_w, b - mu @ raw_w


def fires(gate: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(B,) bool: where a gate fires on features (B, F). A logistic gate (F + 1,) fires where its score is above 0; a
    softmax gate (R, F + 1) where its own row's score (row 0) is above 0 ("no category") and not below any other row's."""
    if gate.ndim == 1:
        return features @ gate[:-1].to(features) + gate[-1].to(features) > 0
    scores = features @ gate[:, :-1].T.to(features) + gate[:, -1].to(features)  # (B, R)
    own = scores[:, 0]
    return (own > 0) & (own >= scores[:, 1:].amax(1)) if gate.shape[0] > 1 else own > 0
