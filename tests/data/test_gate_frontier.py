"""scripts/gate_frontier.py: the val chats it reads and the feature columns of a layer set."""

from dataclasses import replace
from pathlib import Path

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


def test_columns_pick_a_layer_sets_slice_of_features_read_at_the_union():
    columns = load_script("gate_frontier").columns
    # read at layers 3, 6, 9 with 2 columns each: [3a 3b 6a 6b 9a 9b]
    assert columns((3, 6, 9), (6, 9), 2).tolist() == [2, 3, 4, 5]
    assert columns((3, 6, 9), (9, 3), 2).tolist() == [4, 5, 0, 1]  # in the set's order, as a gate of that set reads


def test_val_chats_are_each_request_plain_then_inside_every_val_template():
    from mosaic_core.config import load_recipe
    from mosaic_core.dataset import load_framings
    from pipelines.data import FRAMINGS

    recipe = load_recipe(ROOT / "pipelines" / "configs" / "smollm2-135m" / "cpu.yaml")
    recipe = replace(recipe, dataset=str(ROOT / recipe.dataset))
    rows, meta, chats = load_script("gate_frontier").val_chats(recipe)
    families = [t["family"] for t in load_framings(FRAMINGS) if t["split"] == "val"]
    assert len(chats) == len(meta) == len(rows) * (1 + len(families))
    assert chats[: len(rows)] == [r["prompt"] for r in rows] and {m["family"] for m in meta[: len(rows)]} == {"plain"}
    for k, family in enumerate(families, start=1):
        block = slice(k * len(rows), (k + 1) * len(rows))
        assert {m["family"] for m in meta[block]} == {family}
        assert all(r["prompt"] in c[-1]["content"] for r, c in zip(rows, chats[block]))
