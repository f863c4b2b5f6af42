"""scripts/gate_report.py: what a gated bank would refuse on val, read off its gates (a hand-made case)."""

from pathlib import Path

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


def _script():
    return load_script("gate_report")


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
