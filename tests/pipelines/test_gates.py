"""The training stage's gate step (pipelines/_gates.py) on the tiny Llama: framed copies and the feature store."""

import torch

from pipelines._gates import cached_features, fit_gates, framed_copies, gate_rates


def test_framed_copies_wrap_each_plain_request_in_a_train_framing_the_same_way_every_run():
    from mosaic_core.dataset import load_framings
    from pipelines.data import FRAMINGS

    plain = [("How do frogs reproduce?", None), ("Best whisky for a beginner?", "alcohol")]
    two = framed_copies(plain, 2)
    assert two == framed_copies(plain, 2) and len(two) == 4
    assert [label for _, label in two] == [None, "alcohol", None, "alcohol"]
    train_turns = {m["content"] for t in load_framings(FRAMINGS) if t["split"] == "train" for m in t["messages"]}
    for (chat, _), (request, _) in zip(two, plain * 2):
        assert any(request in m["content"] for m in chat)
        assert {m["content"].replace(request, "{request}") for m in chat} <= train_turns  # train templates only


def test_gate_features_are_read_once_per_request_and_match_a_fresh_reading(tmp_path, tiny_backbone, monkeypatch, capsys):
    import mosaic_core.gate as gate

    bb, store = tiny_backbone, tmp_path / "gate_features.pt"
    chats = ["Name a fruit.", [{"role": "user", "content": "Roll a die."}], "Name a fruit."]
    first = cached_features(store, bb, chats[:2], (1, 2))
    read = []
    real = gate.request_features
    monkeypatch.setattr(gate, "request_features", lambda m, runs, *a, **k: read.append(len(runs)) or real(m, runs, *a, **k))
    more = cached_features(store, bb, [*chats, "Tell me a joke."], (1, 2))
    assert read == [1] and "1 read by the backbone, 3 from gate_features.pt" in capsys.readouterr().out
    torch.testing.assert_close(more[:2], first)
    torch.testing.assert_close(more[2], first[0])  # the same request: the same row
    fresh = cached_features(tmp_path / "other.pt", bb, ["Tell me a joke."], (1, 2))
    torch.testing.assert_close(more[3], fresh[0])
    cached_features(store, bb, chats[:1], (2,))  # other layers: read again, not mixed with (1, 2)'s
    assert read[-1] == 1
    before = len(read)
    recent = cached_features(store, bb, chats[:1], (2,), recency=4.0)  # another weighting: read again too
    assert read[before:] == [1]
    back = cached_features(store, bb, chats[:2], (1, 2))  # the first reading is still stored beside the others
    assert read[before:] == [1]
    torch.testing.assert_close(back, first)
    torch.testing.assert_close(recent, cached_features(tmp_path / "third.pt", bb, chats[:1], (2,), recency=4.0))


def test_gate_rates_count_a_request_refused_where_any_active_gate_fires():
    cats = ["alcohol", "betting"]
    rows = [
        {"kind": "target", "category": "alcohol"},
        {"kind": "target", "category": "betting"},
        {"kind": "general", "category": None},
        {"kind": "lookalike", "category": "alcohol"},
    ]
    # the alcohol gate fires on its target and the look-alike; the betting gate misses its target, fires on general
    fired = torch.tensor([[True, False], [False, False], [False, True], [True, False]])
    per = gate_rates(fired, rows, cats)
    # order 1: {alcohol}: DSR 1/1, OR (betting target + general) 0/2, LA 1/1; {betting}: DSR 0/1, OR 1/2, no LA row
    assert per[1] == {"dsr": 50.0, "or": 25.0, "la": 100.0}
    # order 2, both on: DSR 1/2, OR general 1/1, LA 1/1
    assert per[2] == {"dsr": 50.0, "or": 100.0, "la": 100.0}


def test_gate_training_set_is_distinct_requests_then_framed_copies_copy_by_copy():
    import pandas as pd

    from pipelines._gates import gate_training_set

    df = pd.DataFrame(
        [
            {"prompt": "Mix a negroni.", "kind": "target", "category": "alcohol", "messages": None},
            {"prompt": "Mix a negroni.", "kind": "target", "category": "alcohol", "messages": None},  # a second draw
            {"prompt": "Mix a virgin mojito.", "kind": "lookalike", "category": "alcohol", "messages": None},
            {"prompt": "How do frogs breed?", "kind": "general", "category": None, "messages": None},
        ]
    )
    chats, own = gate_training_set(df, 0)
    assert chats == ["Mix a negroni.", "Mix a virgin mojito.", "How do frogs breed?"]
    assert own == ["alcohol", None, None]  # a look-alike is no category's
    two_chats, two_own = gate_training_set(df, 2)
    one_chats, one_own = gate_training_set(df, 1)
    assert len(two_chats) == 9 and two_chats[:6] == one_chats and two_own[:6] == one_own  # fewer copies: a prefix
    assert two_own[3:] == own * 2
    assert all(isinstance(c, list) and "Mix a negroni." in c[-1]["content"] for c in (two_chats[3], two_chats[6]))


def test_fit_gates_gives_each_category_its_gate_of_the_recipes_kind():
    from mosaic_core.gate import fires

    g = torch.Generator().manual_seed(3)
    own = ["alcohol"] * 40 + ["betting"] * 40 + [None] * 80 + ["vaping"] * 10  # a category not fitted counts as none
    centres = {"alcohol": 3.0, "betting": -3.0, None: 0.0, "vaping": 0.0}
    x = torch.stack([torch.tensor([centres[o], abs(centres[o])]) for o in own]) + 0.3 * torch.randn(len(own), 2, generator=g)
    logistic = fit_gates(x, own, ["alcohol", "betting"], "logistic", 0.01)
    softmax = fit_gates(x, own, ["alcohol", "betting"], "softmax", 0.01)
    assert {tuple(v.shape) for v in logistic.values()} == {(3,)} and {tuple(v.shape) for v in softmax.values()} == {(2, 3)}
    for gates in (logistic, softmax):
        for c in ("alcohol", "betting"):
            truth = torch.tensor([o == c for o in own])
            assert (fires(gates[c], x) == truth).float().mean() > 0.95
    assert softmax["alcohol"].data_ptr() != softmax["betting"].data_ptr()  # own storage each: safetensors saves them
