"""CPU smoke + contract tests of the Ray Data stage (pipelines/data.py) on a tiny model and a slice of MOSAIC-bench."""

import json
import shutil
from collections import Counter

import pandas as pd
import pytest
import yaml

from mosaic_core.backbone import load_backbone
from mosaic_core.config import SamplerConfig
from mosaic_core.errors import BackboneError, ConfigError, DatasetError
from mosaic_core.sampling import plan
from mosaic_core.teacher import teacher_outputs
from pipelines.data import main
from tests.pipelines.conftest import write_tiny_dataset, write_tiny_recipe

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("data-stage")
    recipe = write_tiny_recipe(d / "r.yaml", tiny_model_dir, write_tiny_dataset(d / "dataset"))
    run = main(str(recipe), out=str(d / "run"))
    return d, recipe, run


def test_run_dir_layout_and_sampler_counts(built):
    _, recipe, run = built
    assert sorted(p.name for p in run.iterdir()) == ["data", "provenance.json", "resolved_config.yaml"]
    assert sorted(p.name for p in (run / "data").iterdir()) == ["examples", "manifest.json", "teacher"]
    ex = pd.read_parquet(run / "data" / "examples")
    train = ex[ex["split"] == "train"]
    budget = plan(("alcohol", "betting", "horror"), SamplerConfig(per_subset=4, max_order=2))
    per = Counter((tuple(a), lab) for a, lab in zip(train["active"], train["label"]))
    assert len(per) == 2 * 6  # 3 subsets of order 1 + 3 of order 2, each pos and neg
    for (active, _), n in per.items():
        assert n == budget[len(active)]
    assert set(ex.columns) >= {"example_id", "prompt_id", "prompt", "active", "order", "label", "kind"}
    assert ex["example_id"].is_unique
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["counts"]["train"]["per_label"] == {"pos": 24, "neg": 24}


def test_teacher_once_per_unique_negative_prompt_and_equal_to_direct(built, tiny_model_dir):
    _, _, run = built
    ex = pd.read_parquet(run / "data" / "examples")
    teacher = pd.read_parquet(run / "data" / "teacher")
    neg_ids = set(ex.loc[ex["label"] == "neg", "prompt_id"])
    assert teacher["prompt_id"].is_unique and set(teacher["prompt_id"]) == neg_ids
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["counts"]["teacher_passes"] == len(neg_ids) <= manifest["counts"]["negative_examples"]
    bb = load_backbone(str(tiny_model_dir))
    prompts = ex.drop_duplicates("prompt_id").set_index("prompt_id")["prompt"]
    sample = teacher.head(3)
    direct = teacher_outputs(bb.model, bb.tokenizer, [prompts[p] for p in sample["prompt_id"]], max_new_tokens=4, topk=4)
    for (_, row), ref in zip(sample.iterrows(), direct):
        assert list(row["response_ids"]) == ref["response_ids"]
        assert [list(x) for x in row["topk_ids"]] == ref["topk_ids"]
        got = [list(x) for x in row["topk_logprobs"]]
        assert all(abs(a - b) < 1e-5 for ga, ra in zip(got, ref["topk_logprobs"]) for a, b in zip(ga, ra))


def test_rerun_reuses_and_a_changed_input_rebuilds(built, capsys):
    d, recipe, run = built
    before = (run / "data" / "manifest.json").stat().st_mtime_ns
    main(str(recipe), out=str(run))
    assert "reusing" in capsys.readouterr().out
    assert (run / "data" / "manifest.json").stat().st_mtime_ns == before
    dataset2 = d / "dataset2"
    shutil.copytree(d / "dataset", dataset2)
    with open(dataset2 / "dataset.jsonl", "a") as f:
        f.write(
            json.dumps(
                {
                    "id": "general-g-extra00001",
                    "prompt": "How do I boil an egg?",
                    "category": None,
                    "kind": "general",
                    "split": "train",
                }
            )
            + "\n"
        )
    recipe2 = write_tiny_recipe(d / "r2.yaml", yaml.safe_load(recipe.read_text())["backbone"], dataset2)
    run2 = d / "run2"
    shutil.copytree(run, run2)
    old_hash = json.loads((run2 / "data" / "manifest.json").read_text())["content_hash"]
    main(str(recipe2), out=str(run2))
    assert json.loads((run2 / "data" / "manifest.json").read_text())["content_hash"] != old_hash


def test_draws_add_samples_and_the_teacher_answers_every_draws_negatives(built):
    d, recipe, run = built
    one = json.loads((run / "data" / "manifest.json").read_text())
    recipe3 = write_tiny_recipe(
        d / "r3.yaml",
        yaml.safe_load(recipe.read_text())["backbone"],
        d / "dataset",
        sampler={"per_subset": 4, "max_order": 2, "draws": 2},
    )
    run3 = main(str(recipe3), out=str(d / "run3"))
    ex = pd.read_parquet(run3 / "data" / "examples")
    train = ex[ex["split"] == "train"]
    assert Counter(train["draw"]) == {0: 48, 1: 48} and set(ex.loc[ex["split"] == "val", "draw"]) == {0}
    first = pd.read_parquet(run / "data" / "examples")
    assert set(train.loc[train["draw"] == 0, "example_id"]) == set(first.loc[first["split"] == "train", "example_id"])
    assert ex["example_id"].is_unique
    teacher = pd.read_parquet(run3 / "data" / "teacher")
    assert set(teacher["prompt_id"]) == set(ex.loc[ex["label"] == "neg", "prompt_id"])
    manifest = json.loads((run3 / "data" / "manifest.json").read_text())
    assert manifest["counts"]["draws"] == 2 and one["counts"]["draws"] == 1
    assert manifest["content_hash"] != one["content_hash"]
    # draw 0's negatives were answered by the first run (others maybe by test_rerun's): from the cache, unchanged
    first_rows = pd.read_parquet(run / "data" / "teacher").set_index("prompt_id")
    assert len(first_rows) <= manifest["teacher_reused"] < len(teacher)
    for pid, row in teacher.set_index("prompt_id").loc[first_rows.index].iterrows():
        assert list(row["response_ids"]) == list(first_rows.loc[pid, "response_ids"])
        assert [list(x) for x in row["topk_logprobs"]] == [list(x) for x in first_rows.loc[pid, "topk_logprobs"]]


def test_force_runs_the_teacher_on_every_prompt(built):
    d, recipe, run = built
    manifest = main(str(recipe), out=str(d / "run4"), force=True) / "data" / "manifest.json"
    assert json.loads(manifest.read_text())["teacher_reused"] == 0
    again = main(str(recipe), out=str(d / "run5")) / "data" / "manifest.json"  # a new run dir: answers from the cache
    assert json.loads(again.read_text())["teacher_reused"] == json.loads(manifest.read_text())["counts"]["teacher_passes"]


def _no_half_output(run):
    return not (run / "data").exists() and not list(run.glob(".data-*")) if run.exists() else True


@pytest.mark.parametrize("problem", ["corrupt", "missing_column", "empty_split"])
def test_bad_dataset_gets_a_clear_error_and_leaves_nothing(tmp_path, tiny_model_dir, problem):
    dataset = write_tiny_dataset(tmp_path / "dataset")
    f = dataset / "dataset.jsonl"
    lines = f.read_text().splitlines()
    if problem == "corrupt":
        f.write_text("\n".join(lines[:5]) + '\n{"id": "x", "prompt": "unterminated\n' + "\n".join(lines[5:]) + "\n")
    elif problem == "missing_column":
        f.write_text("".join(json.dumps({k: v for k, v in json.loads(x).items() if k != "split"}) + "\n" for x in lines))
    else:
        f.write_text("".join(x + "\n" for x in lines if json.loads(x)["split"] != "val"))
    recipe = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, dataset)
    with pytest.raises(DatasetError) as e:
        main(str(recipe), out=str(tmp_path / "run"))
    assert {"corrupt": "cannot read dataset", "missing_column": "['split']", "empty_split": "split 'val'"}[problem] in str(
        e.value
    )
    assert _no_half_output(tmp_path / "run")


def test_unknown_category_and_bad_backbone(tmp_path, tiny_model_dir):
    dataset = write_tiny_dataset(tmp_path / "dataset")
    recipe = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, dataset, bank={"categories": ["alcohol", "news"], "m": 2})
    with pytest.raises(ConfigError, match=r"\['news'\] not in the dataset"):
        main(str(recipe), out=str(tmp_path / "run"))
    recipe = write_tiny_recipe(tmp_path / "r2.yaml", tmp_path / "no-such-model", dataset)
    with pytest.raises(BackboneError, match="does not exist"):
        main(str(recipe), out=str(tmp_path / "run2"))
    assert _no_half_output(tmp_path / "run") and _no_half_output(tmp_path / "run2")


def test_val_share_lends_val_requests_to_training_and_validates_on_the_rest(built):
    d, recipe, run = built
    dataset = write_tiny_dataset(d / "dataset-val4", per=(4, 4, 0))
    backbone = yaml.safe_load(recipe.read_text())["backbone"]
    lend = write_tiny_recipe(d / "r-val.yaml", backbone, dataset, sampler={"per_subset": 4, "max_order": 2, "val_share": 0.4})
    ex = pd.read_parquet(main(str(lend), out=str(d / "run-val")) / "data" / "examples")
    split_of = {r["id"]: r["split"] for r in pd.read_json(dataset / "dataset.jsonl", lines=True).to_dict("records")}
    train_from = Counter(split_of[p] for p in ex.loc[ex["split"] == "train", "prompt_id"])
    val_ids = set(ex.loc[ex["split"] == "val", "prompt_id"])
    assert train_from["val"] > 0 and train_from["train"] > 0  # training draws from both splits
    assert {split_of[p] for p in val_ids} == {"val"}
    assert val_ids.isdisjoint(ex.loc[ex["split"] == "train", "prompt_id"])  # validation never scores a lent request
    plain = write_tiny_recipe(d / "r-val0.yaml", backbone, dataset, sampler={"per_subset": 4, "max_order": 2})
    ex0 = pd.read_parquet(main(str(plain), out=str(d / "run-val0")) / "data" / "examples")
    assert {split_of[p] for p in ex0.loc[ex0["split"] == "train", "prompt_id"]} == {"train"}


def test_committed_store_serves_shorter_answers_by_prefix_and_skips_the_teacher(
    built, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """A store made at T=4, k=4 serves a recipe asking for T=2, k=3: its rows are the prefixes the teacher itself
    gives at T=2 (greedy is causal), and the data stage runs no teacher pass."""
    import pipelines.data as data_stage

    d, _, run = built
    bb = load_backbone(str(tiny_model_dir))
    store = data_stage.TeacherStore(tmp_path / "teacher", bb.fingerprint.digest)
    ex = pd.read_parquet(run / "data" / "examples")
    prompts = ex.drop_duplicates("prompt_id")[["prompt_id", "prompt"]]
    rows = pd.read_parquet(run / "data" / "teacher")
    store.add(rows, prompts, backbone=str(tiny_model_dir), max_new_tokens=4, topk=4)
    monkeypatch.setattr(data_stage, "TEACHER_STORE", tmp_path / "teacher")
    short = write_tiny_recipe(
        tmp_path / "short.yaml",
        tiny_model_dir,
        write_tiny_dataset(tmp_path / "dataset"),
        teacher={"max_new_tokens": 2},
        loss={"topk": 3, "max_answer_tokens": 2},
    )
    capsys.readouterr()
    out = main(str(short), out=str(tmp_path / "runs" / "short"))
    assert "answers from the committed store, 0 from" in capsys.readouterr().out
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["teacher_reused"] == manifest["counts"]["teacher_passes"] > 0
    got = pd.read_parquet(out / "data" / "teacher").set_index("prompt_id")
    sample = list(got.index[:3])
    direct = teacher_outputs(
        bb.model, bb.tokenizer, [prompts.set_index("prompt_id")["prompt"][p] for p in sample], max_new_tokens=2, topk=3
    )
    for p, ref in zip(sample, direct):
        assert list(got.loc[p, "response_ids"]) == ref["response_ids"]
        assert [list(x) for x in got.loc[p, "topk_ids"]] == ref["topk_ids"]
        assert all(abs(a - b) < 1e-4 for ga, ra in zip(got.loc[p, "topk_logprobs"], ref["topk_logprobs"]) for a, b in zip(ga, ra))
    wider = write_tiny_recipe(tmp_path / "wide.yaml", tiny_model_dir, write_tiny_dataset(tmp_path / "dataset"), loss={"topk": 8})
    assert not store.serves(__import__("mosaic_core.config", fromlist=["load_recipe"]).load_recipe(wider))


def test_framed_share_frames_training_requests_and_the_teacher_answers_the_framed_chats(tmp_path, tiny_model_dir):
    from mosaic_core.training import request_of

    recipe = write_tiny_recipe(
        tmp_path / "r.yaml", tiny_model_dir, write_tiny_dataset(tmp_path / "dataset"), sampler={"framed_share": 0.5}
    )
    run = main(str(recipe), out=str(tmp_path / "run"))
    ex = pd.read_parquet(run / "data" / "examples")
    train, val = ex[ex["split"] == "train"], ex[ex["split"] == "val"]
    framed = train[train["messages"] != ""]
    assert 0 < len(framed) < len(train) and (val["messages"] == "").all()
    assert {p.split("@")[1].split("-")[0] for p in framed["prompt_id"]} <= {
        "roleplay",
        "fiction",
        "research",
        "override",
        "prefix",
        "hypothetical",
        "translation",
        "multiturn",
    }
    teacher = pd.read_parquet(run / "data" / "teacher").set_index("prompt_id")
    neg = framed[framed["label"] == "neg"].iloc[0]
    chat = request_of(neg.to_dict())
    assert isinstance(chat, list) and neg["prompt"] in chat[-1]["content"]
    bb = load_backbone(str(tiny_model_dir))
    direct = teacher_outputs(bb.model, bb.tokenizer, [chat], max_new_tokens=4, topk=4)[0]
    assert list(teacher.loc[neg["prompt_id"], "response_ids"]) == direct["response_ids"]
