"""scripts/gate_report.py: what a gated bank would refuse on val, read off its gates (a hand-made case)."""

from pathlib import Path

import torch

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


def _script():
    return load_script("gate_report")


def test_rates_count_a_request_refused_where_any_active_gate_fires():
    rates = _script().rates
    cats = ["alcohol", "betting"]
    rows = [
        {"kind": "target", "category": "alcohol"},
        {"kind": "target", "category": "betting"},
        {"kind": "general", "category": None},
        {"kind": "lookalike", "category": "alcohol"},
    ]
    # the alcohol gate fires on its target and the look-alike; the betting gate misses its target, fires on general
    fired = torch.tensor([[True, False], [False, False], [False, True], [True, False]])
    per = rates(fired, rows, cats)
    # order 1: {alcohol}: DSR 1/1, OR (betting target + general) 0/2, LA 1/1; {betting}: DSR 0/1, OR 1/2, no LA row
    assert per[1] == {"dsr": 50.0, "or": 25.0, "la": 100.0}
    # order 2, both on: DSR 1/2, OR general 1/1, LA 1/1
    assert per[2] == {"dsr": 50.0, "or": 100.0, "la": 100.0}


def test_val_requests_leave_out_what_training_borrowed_and_frame_each_once():
    from dataclasses import replace

    from mosaic_core.config import load_recipe

    recipe = load_recipe(ROOT / "pipelines" / "configs" / "smollm2-135m" / "cpu.yaml")
    recipe = replace(recipe, dataset=str(ROOT / recipe.dataset))
    rows, chats = _script().val_requests(recipe)
    assert len(chats) == 2 * len(rows) and chats[: len(rows)] == [r["prompt"] for r in rows]
    assert all(isinstance(c, list) and any(r["prompt"] in m["content"] for m in c) for r, c in zip(rows, chats[len(rows) :]))
    val = sum(
        1 for r in (ROOT / recipe.dataset).glob("*.jsonl") for line in r.read_text().splitlines() if '"split": "val"' in line
    )
    assert 0.3 * val < len(rows) < 0.7 * val  # sampler.val_share 0.5 lent about half
