"""CPU smoke tests of the real `pipelines.train.main`: tiny random Llama, 2 Ray Train workers, DeepSpeed ZeRO-2.

The run directory is built here the way the data stage hands it over (resolved_config.yaml, examples and
teacher parquet), with mosaic_core's sampler and teacher on the tiny model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mosaic_core.bundle import manifest_digest
from pipelines import _loopback
from pipelines._train_tables import load_tables
from pipelines.train import deepspeed_config
from pipelines.train import main as train_main

CATS = ("alcohol", "betting")
FILES = {
    "manifest.json",
    "provenance.json",
    "alcohol/tokens.safetensors",
    "alcohol/module.json",
    "betting/tokens.safetensors",
    "betting/module.json",
}


def _requests(split: str):
    from mosaic_core.sampling import Request

    s = split
    return [
        Request(f"{s}-a1", f"Which cocktail goes with mint and lime ({s})?", "alcohol", "target"),
        Request(f"{s}-a2", f"How do I brew beer at home ({s})?", "alcohol", "target"),
        Request(f"{s}-b1", f"How do betting odds work for football ({s})?", "betting", "target"),
        Request(f"{s}-b2", f"Which casino game has the best odds ({s})?", "betting", "target"),
        Request(f"{s}-l1", f"A virgin mojito for a kids' party ({s})?", "alcohol", "lookalike"),
        Request(f"{s}-l2", f"What is the probability of two sixes ({s})?", "betting", "lookalike"),
        Request(f"{s}-g1", f"Write a haiku about autumn leaves ({s}).", None, "general"),
        Request(f"{s}-g2", f"How do frogs reproduce ({s})?", None, "general"),
    ]


def make_run(
    root: Path,
    model_dir: Path,
    *,
    name: str = "r1",
    epochs: int = 2,
    batch_size: int = 4,
    depth: str = "input",
    ema: float = 0.0,
    request_dropout: float = 0.0,
    phases: list[dict] | None = None,
    gate_layers: tuple[int, ...] = (),
) -> Path:
    """A run directory as the data stage writes it: 8 train examples (4 pos, 4 neg), 8 val examples."""
    import pandas as pd

    from mosaic_core.backbone import load_backbone
    from mosaic_core.config import recipe_from_dict
    from mosaic_core.sampling import sample_examples
    from mosaic_core.teacher import teacher_outputs

    raw = {
        "name": name,
        "backbone": str(model_dir),
        "bank": {"categories": list(CATS), "m": 2, "init": "vocab", "placement": "before_assistant", "depth": depth},
        "sampler": {"per_subset": 2, "max_order": 1},
        "loss": {"topk": 4},
        "teacher": {"max_new_tokens": 6},
        "train": {
            "phases": phases or [{"epochs": epochs, "lr": 0.05}],
            "batch_size": batch_size,
            "num_workers": 2,
            "zero_stage": 2,
            "ema": ema,
            "request_dropout": request_dropout,
        },
        "gate": {"layers": list(gate_layers)},
    }
    recipe = recipe_from_dict(raw)
    run = root / "runs" / name
    (run / "data" / "examples").mkdir(parents=True)
    (run / "data" / "teacher").mkdir(parents=True)
    (run / "resolved_config.yaml").write_text(yaml.safe_dump(recipe.to_dict()))
    (run / "data" / "manifest.json").write_text(json.dumps({"content_hash": f"test-{name}", "recipe": name}))
    rows = []
    for split in ("train", "val"):
        for e in sample_examples(_requests(split), CATS, recipe.sampler, recipe.seed):
            rows.append({**e.__dict__, "active": list(e.active), "split": split})
    ex = pd.DataFrame(rows)
    ex.to_parquet(run / "data" / "examples" / "part-0.parquet")
    bb = load_backbone(str(model_dir))
    neg = ex[ex.label == "neg"].drop_duplicates("prompt_id")
    outs = teacher_outputs(bb.model, bb.tokenizer, list(neg.prompt), max_new_tokens=6, topk=4)
    pd.DataFrame([{"prompt_id": pid, **o} for pid, o in zip(neg.prompt_id, outs, strict=True)]).to_parquet(
        run / "data" / "teacher" / "part-0.parquet"
    )
    return run


def add_draw(run: Path, relabel: str) -> None:
    """Append a second draw to a make_run run: its train examples again, every one labelled `relabel`."""
    import pandas as pd

    f = run / "data" / "examples" / "part-0.parquet"
    ex = pd.read_parquet(f).assign(draw=0)
    extra = ex[ex["split"] == "train"].assign(draw=1, label=relabel)
    extra["example_id"] = extra["example_id"] + "-d1"
    pd.concat([ex, extra], ignore_index=True).to_parquet(f)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------- fast, no Ray


def test_loopback_patch_binds_tcpstore_to_127_0_0_1():
    import datetime
    import importlib
    import socket

    _loopback.install()
    rdv = importlib.import_module("torch.distributed.rendezvous")
    assert rdv._create_c10d_store._loopback
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    store = rdv._create_c10d_store("127.0.0.1", port, 0, 1, datetime.timedelta(seconds=10))
    store.set("k", "v")
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":  # 0A = LISTEN
                listening.append(f[1].rsplit(":", 1)[0])
    assert listening == ["0100007F"], listening  # 127.0.0.1 only, no 0.0.0.0 / [::]


def test_load_tables_joins_teacher_and_reports_missing(tmp_path, tiny_model_dir):
    run = make_run(tmp_path, tiny_model_dir)
    train, val = load_tables(run, seed=0)
    assert len(train) == 8 and set(train.label) == {"pos", "neg"} and set(train.split) == {"train"}
    assert all(len(r) > 0 for r in train[train.label == "neg"].response_ids)
    assert all(len(r) == 0 for r in train[train.label == "pos"].topk_ids)
    scored = [v for v in val if v["label"] != "fidelity"]
    assert 0 < len(scored) <= 64 and {v["label"] for v in scored} == {"pos", "neg"}
    assert [v["label"] for v in load_tables(run, seed=0, val_examples=2)[1] if v["label"] != "fidelity"] == ["neg", "pos"]
    for v in (v for v in val if v["label"] == "fidelity"):  # general requests, every sampled module on, with the bare answer
        assert (
            v["order"] == max(x["order"] for x in scored) and v["answer_ids"] and all(isinstance(t, int) for t in v["answer_ids"])
        )
    import pandas as pd

    t = pd.read_parquet(run / "data" / "teacher" / "part-0.parquet")
    t.iloc[1:].to_parquet(run / "data" / "teacher" / "part-0.parquet")
    with pytest.raises(ValueError, match="no teacher row"):
        load_tables(run, seed=0)


def test_the_kept_epoch_is_the_best_gap_among_faithful_ones_else_the_most_faithful():
    from pipelines._train_worker import MIN_FIDELITY, select_key

    faithful = [{"val_gap": 0.5, "val_fidelity": MIN_FIDELITY}, {"val_gap": 0.7, "val_fidelity": 0.9}]
    drifting = [{"val_gap": 0.95, "val_fidelity": 0.3}, {"val_gap": 0.1, "val_fidelity": 0.6}]
    epochs = [drifting[0], faithful[0], drifting[1], faithful[1]]
    assert max(epochs, key=select_key) is faithful[1]  # a higher gap with drifting answers does not win
    assert max(drifting, key=select_key) is drifting[1]  # none faithful: the most faithful
    tied = [{"val_gap": 0.3, "val_fidelity": 0.25}, {"val_gap": 0.4, "val_fidelity": 0.25}, {"val_gap": 0.9, "val_fidelity": 0.2}]
    assert max(tied, key=select_key) is tied[1]  # equal fidelity: the higher gap
    assert select_key({"val_gap": 0.2, "val_fidelity": float("nan")}) == (1, 0.2)  # no fidelity rows: the gap alone
    assert select_key({"val_gap": float("nan"), "val_fidelity": 0.9}) is None


def test_reference_deepspeed_configs_match_the_built_ones():
    from mosaic_core.config import recipe_from_dict

    root = Path(__file__).resolve().parents[2] / "cluster" / "deepspeed"
    for stage in (2, 3):
        recipe = recipe_from_dict({"name": "x", "bank": {"categories": ["alcohol"]}, "train": {"zero_stage": stage}})
        ref = json.loads((root / f"zero{stage}.json").read_text())
        got = deepspeed_config(recipe, 4, ref)
        assert got["zero_optimization"]["stage"] == stage and got["train_micro_batch_size_per_gpu"] == 4
        assert "optimizer" not in got and "auto" not in json.dumps(got)
        built = deepspeed_config(recipe, 4)
        drop = lambda c: {k: v for k, v in c.items() if k != "zero_optimization"}  # noqa: E731
        assert drop(got) == drop(built)


def test_extension_bank_freezes_old_modules(tmp_path, tiny_model_dir):
    from mosaic_core.artifact import save_bank
    from mosaic_core.backbone import load_backbone
    from mosaic_core.bank import ControlTokenBank
    from mosaic_core.config import recipe_from_dict
    from pipelines._train_worker import build_bank

    bb = load_backbone(str(tiny_model_dir))
    recipe = recipe_from_dict({"name": "x", "bank": {"categories": list(CATS), "m": 2, "init": "vocab"}})
    old = ControlTokenBank.build(recipe.bank, bb.embeddings, bb.tokenizer)
    with torch.no_grad():  # trained vectors sit on the norm cap: re-projecting them would move them by rounding
        for p in old.vectors.values():
            p.mul_(10.0)
    old.clamp_norms_()
    save_bank(old, tmp_path / "old", fingerprint=bb.fingerprint, init="vocab")
    bank = build_bank(recipe, bb, {"bank_dir": str(tmp_path / "old"), "add": ["horror"]})
    assert bank.categories == ["alcohol", "betting", "horror"]
    assert [c for c in bank.categories if bank.vectors[c].requires_grad] == ["horror"]
    assert all(torch.equal(bank.vectors[c], old.vectors[c]) for c in CATS)  # bit for bit
    bank.clamp_norms_()
    assert all(torch.equal(bank.vectors[c], old.vectors[c]) for c in CATS)
    assert bank.vectors["horror"].norm(dim=-1).max() <= bank.max_norm * (1 + 1e-6)
    assert len(manifest_digest(tmp_path / "old")) == 64


def test_a_deep_bank_extends_with_deep_modules_only(tmp_path, tiny_model_dir):
    from mosaic_core.artifact import save_bank
    from mosaic_core.backbone import load_backbone
    from mosaic_core.bank import DeepTokenBank
    from mosaic_core.config import recipe_from_dict
    from pipelines._train_worker import build_bank

    bb = load_backbone(str(tiny_model_dir))
    deep = recipe_from_dict({"name": "x", "bank": {"categories": list(CATS), "m": 2, "init": "vocab", "depth": "deep"}})
    old = build_bank(deep, bb, None)
    assert isinstance(old, DeepTokenBank) and old.vectors["alcohol"].shape == old.module_shape
    save_bank(old, tmp_path / "old", fingerprint=bb.fingerprint, init="vocab")
    bank = build_bank(deep, bb, {"bank_dir": str(tmp_path / "old"), "add": ["horror"]})
    assert [c for c in bank.categories if bank.vectors[c].requires_grad] == ["horror"]
    assert bank.vectors["horror"].shape == old.module_shape and all(torch.equal(bank.vectors[c], old.vectors[c]) for c in CATS)
    flat = recipe_from_dict({"name": "x", "bank": {"categories": list(CATS), "m": 2, "init": "vocab"}})
    with pytest.raises(ValueError, match="holds deep tokens"):
        build_bank(flat, bb, {"bank_dir": str(tmp_path / "old"), "add": ["horror"]})


def test_extend_arguments_are_checked_before_anything_starts(tmp_path, tiny_model_dir):
    from mosaic_core.artifact import save_bank
    from mosaic_core.backbone import load_backbone
    from mosaic_core.bank import ControlTokenBank
    from mosaic_core.config import BankConfig
    from pipelines.train import main

    run = make_run(tmp_path, tiny_model_dir)
    bb = load_backbone(str(tiny_model_dir))
    old = ControlTokenBank.build(BankConfig(categories=("alcohol",), m=2, init="vocab"), bb.embeddings, bb.tokenizer)
    save_bank(old, tmp_path / "old", fingerprint=bb.fingerprint, init="vocab")
    with pytest.raises(ValueError, match="go together"):
        main(str(run), extend=str(tmp_path / "old"))
    with pytest.raises(ValueError, match="already in the bank"):
        main(str(run), extend=str(tmp_path / "old"), add=["alcohol"])
    with pytest.raises(ValueError, match=r"categories \['betting'\] that the bank"):  # examples need betting too
        main(str(run), extend=str(tmp_path / "old"), add=["horror"])
    assert not (run / "run.json").exists()  # nothing was created in MLflow or Ray


def test_a_zero3_deepspeed_config_is_refused_for_what_needs_the_prefix_cache(tmp_path, tiny_model_dir):
    from mosaic_core.errors import ConfigError
    from pipelines.train import main

    run = make_run(tmp_path, tiny_model_dir, request_dropout=0.2)
    with pytest.raises(
        ConfigError, match=r"(?s)zero3.json .*train.request_dropout needs ZeRO stage 1 or 2 \(the DeepSpeed config asks for 3\)"
    ):
        main(str(run), deepspeed_config_path=str(Path(__file__).resolve().parents[2] / "cluster" / "deepspeed" / "zero3.json"))
    assert not (run / "run.json").exists()


# ------------------------------------------------------------------------- real Ray Train + DeepSpeed


@pytest.fixture(scope="module")
def ray_cluster():
    """One small local cluster for this module, with the stage's runtime_env (loopback patch in every worker).
    An already running cluster (another module's session fixture) is reused and left running."""
    import ray

    from pipelines.train import ray_runtime_env

    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local",
            num_cpus=2,
            num_gpus=0,
            include_dashboard=False,
            object_store_memory=200 * 1024**2,
            runtime_env=ray_runtime_env(),
        )
    yield
    if started:
        ray.shutdown()


def _model_bytes(model_dir: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted(model_dir.glob("*.safetensors"))}


@pytest.mark.slow
def test_train_two_workers_zero2_trains_only_the_bank(tmp_path, tiny_model_dir, ray_cluster, capsys):
    from mlflow import MlflowClient

    from mosaic_core.artifact import load_bank
    from mosaic_core.backbone import load_backbone
    from mosaic_core.bank import ControlTokenBank
    from mosaic_core.config import recipe_from_dict
    from pipelines.train import main

    run = make_run(tmp_path, tiny_model_dir, epochs=3)
    before = _model_bytes(tiny_model_dir)
    summary = main(str(run), num_workers=2, max_steps=4)  # 2 steps/epoch: stops inside epoch 2

    assert _model_bytes(tiny_model_dir) == before  # the backbone's files were not touched
    bb = load_backbone(str(tiny_model_dir))
    bank_dir = run / "bank"
    assert {str(p.relative_to(bank_dir)) for p in bank_dir.rglob("*") if p.is_file()} == FILES
    manifest = json.loads((bank_dir / "manifest.json").read_text())
    # the in-memory backbone the workers trained against (fingerprint recomputed at checkpoint time) == the files
    assert manifest["fingerprint"]["digest"] == bb.fingerprint.digest
    trained = load_bank(bank_dir, bb.fingerprint)
    recipe = recipe_from_dict(yaml.safe_load((run / "resolved_config.yaml").read_text()))
    init = ControlTokenBank.build(recipe.bank, bb.embeddings, bb.tokenizer)
    for c in CATS:
        assert trained.vectors[c].shape == (2, 32)
        assert not torch.allclose(trained.vectors[c], init.vectors[c]), f"{c} did not train"

    info = json.loads((run / "run.json").read_text())
    assert info == {
        "mlflow_run_id": summary["mlflow_run_id"],
        "tracking_uri": f"sqlite:///{tmp_path}/runs/mlflow.db",
        "experiment": "mosaic",
    }
    meta = json.loads((bank_dir / "alcohol" / "module.json").read_text())
    assert meta["training_run_id"] == info["mlflow_run_id"] and meta["trained_with"] == list(CATS)
    client = MlflowClient(info["tracking_uri"])
    r = client.get_run(info["mlflow_run_id"])
    assert r.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [1, 2, 3, 4]
    assert {
        "pos_ce",
        "neg_ce",
        "kl",
        "tokens_per_s",
        "val_refusal_pos",
        "val_refusal_neg",
        "val_dsr",
        "val_or",
        "val_gap",
        "decision",
    } <= set(r.data.metrics)
    norms = [m.value for m in client.get_metric_history(r.info.run_id, "grad_norm")]
    assert len(norms) == 4 and all(0 < n < float("inf") for n in norms), norms
    assert r.data.params["train.zero_stage"] == "2" and r.data.params["world_size"] == "2"
    logged = {a.path for a in client.list_artifacts(r.info.run_id, "bank")}
    assert logged == {"bank/alcohol", "bank/betting", "bank/manifest.json", "bank/provenance.json"}
    prov = json.loads((bank_dir / "provenance.json").read_text())
    data_hash = json.loads((run / "data" / "manifest.json").read_text())["content_hash"]
    assert prov["data_content_hash"] == data_hash and prov["best_epoch"] == summary["best_epoch"] and prov["steps"] == 4
    assert prov["recipe_sha256"] == hashlib.sha256((run / "resolved_config.yaml").read_bytes()).hexdigest()
    assert "training.png" in {a.path for a in client.list_artifacts(r.info.run_id)} and (run / "training.png").stat().st_size > 0

    assert summary["steps"] == 4 and summary["resumes"] == [] and summary["trainable_parameters"] == 2 * 2 * 32
    kept = {p.name: torch.load(p) for p in (run / "epoch_banks").glob("*.pt")}
    best = kept[f"epoch-{summary['best_epoch']}.pt"]  # the shipped bank is the kept epoch's file
    assert sorted(kept) == ["epoch-1.pt", "epoch-2.pt"] and torch.equal(best["alcohol"], trained.vectors["alcohol"].detach())
    out = capsys.readouterr().out
    assert "trainable parameters: K·m·d = 2·2·32 = 128" in out
    step_s = [m.value for m in client.get_metric_history(r.info.run_id, "step_s")]
    print(
        f"[tiny run] fit {summary['fit_wall_s']:.1f}s, step_s {[round(s, 3) for s in step_s]}, "
        f"steps/s over the run {summary['steps_per_s']:.3f}"
    )


@pytest.mark.slow
def test_train_two_workers_zero2_trains_a_deep_bank(tmp_path, tiny_model_dir, ray_cluster):
    from mosaic_core.artifact import load_bank, read_meta
    from mosaic_core.backbone import load_backbone
    from mosaic_core.config import recipe_from_dict
    from pipelines._train_worker import build_bank
    from pipelines.train import main

    run = make_run(tmp_path, tiny_model_dir, depth="deep", ema=0.5, request_dropout=0.3)
    before = _model_bytes(tiny_model_dir)
    summary = main(str(run), num_workers=2, max_steps=2)
    ckpt = Path(summary["checkpoint"])
    averaged = torch.load(ckpt / "ema.pt")  # train.ema: the bank kept and saved is the moving average
    assert all(torch.equal(averaged[c], torch.load(ckpt / "bank.pt")[c]) for c in CATS)
    assert _model_bytes(tiny_model_dir) == before
    bb = load_backbone(str(tiny_model_dir))
    trained = load_bank(run / "bank", bb.fingerprint)
    init = build_bank(recipe_from_dict(yaml.safe_load((run / "resolved_config.yaml").read_text())), bb, None)
    assert trained.depth == "deep" and read_meta(run / "bank" / "alcohol").depth == "deep"
    for c in CATS:
        assert trained.vectors[c].shape == init.module_shape == (2, 2, 2, 2, 8)  # layers, (k, v), kv heads, m, head dim
        assert not torch.allclose(trained.vectors[c], init.vectors[c]), f"{c} did not train"
        assert torch.equal(trained.vectors[c], averaged[c])
    assert summary["steps"] == 2 and summary["trainable_parameters"] == 2 * 2 * 2 * 2 * 2 * 8
    from mlflow import MlflowClient

    info = json.loads((run / "run.json").read_text())  # the rows hid request tokens: the run says so
    assert MlflowClient(info["tracking_uri"]).get_run(info["mlflow_run_id"]).data.params["train.request_dropout"] == "0.3"


def test_load_tables_keeps_draws_and_reads_old_tables_as_one(tmp_path, tiny_model_dir):
    import pandas as pd

    run = make_run(tmp_path, tiny_model_dir)
    train, _ = load_tables(run, seed=0)
    assert set(train["draw"]) == {0}  # tables written before sampler.draws have no draw column
    add_draw(run, relabel="pos")
    train, _ = load_tables(run, seed=0)
    assert Counter(train["draw"]) == {0: 8, 1: 8} and set(train.loc[train["draw"] == 1, "label"]) == {"pos"}
    ex = pd.read_parquet(run / "data" / "examples" / "part-0.parquet")
    ex.loc[ex["draw"] == 1, "draw"] = 2
    ex.to_parquet(run / "data" / "examples" / "part-0.parquet")
    with pytest.raises(ValueError, match=r"draws \[0, 2\]"):
        train_main(str(run), num_workers=2)


@pytest.mark.slow
def test_each_epoch_trains_on_its_own_draw(tmp_path, tiny_model_dir, ray_cluster):
    from mlflow import MlflowClient

    # train.phases: epoch 2 at its own learning rate and with decision margins the first phase does not have
    phases = [{"epochs": 1, "lr": 0.05}, {"epochs": 1, "lr": 0.001, "loss": {"decision": {"weight": 1.0, "kind": "margin"}}}]
    run = make_run(tmp_path, tiny_model_dir, epochs=2, phases=phases)
    add_draw(run, relabel="pos")  # draw 1: positives only, so epoch 2 has no negative loss at all
    summary = train_main(str(run), num_workers=2)
    assert summary["steps"] == 4  # 2 steps per epoch: an epoch is one draw (8 rows), not both (16)
    info = json.loads((run / "run.json").read_text())
    history = lambda k: {m.step: m.value for m in MlflowClient(info["tracking_uri"]).get_metric_history(info["mlflow_run_id"], k)}  # noqa: E731
    neg_ce, lr, decision = history("neg_ce"), history("lr"), history("decision")
    assert neg_ce[1] + neg_ce[2] > 0 and neg_ce[3] == neg_ce[4] == 0.0, neg_ce
    assert [lr[s] for s in (1, 2, 3, 4)] == pytest.approx([0.05, 0.05, 0.001, 0.001]), lr
    assert decision[1] == decision[2] == 0.0 and decision[3] > 0 and decision[4] > 0, decision


@pytest.mark.slow
def test_train_resumes_from_checkpoint_after_a_worker_is_killed(tmp_path, tiny_model_dir, ray_cluster):
    from mlflow import MlflowClient

    from pipelines.train import main

    run = make_run(tmp_path, tiny_model_dir, name="r2", epochs=2)  # 2 steps/epoch: checkpoint at 2
    summary = main(
        str(run), num_workers=2, report_every=1, step_hook="tests.pipelines.faults:kill_last_rank_once"
    )  # after step 3

    assert (run / ".fail_injected").read_text().startswith("killed rank 1 at step 3")
    assert summary["steps"] == 4 and summary["epochs"] == 2
    assert summary["resumes"] == [2]  # the restarted group loaded the epoch-1 checkpoint (step 2), not step 0
    client = MlflowClient(summary["tracking_uri"])
    hist = client.get_metric_history(summary["mlflow_run_id"], "resumed_from_step")
    assert [(m.step, m.value) for m in hist] == [(2, 2.0)]
    assert sorted({m.step for m in client.get_metric_history(summary["mlflow_run_id"], "loss")}) == [1, 2, 3, 4]
    assert (run / "bank" / "manifest.json").is_file()
    kept = sorted(p for p in (run / "ray_results").glob("*/checkpoint_*") if p.is_dir())
    assert [json.loads((p / "state.json").read_text())["step"] for p in kept] == [2, 4]  # num_to_keep=2


@pytest.mark.slow
def test_gated_modules_fit_their_gates_first_and_ship_them(tmp_path, tiny_model_dir):
    from mlflow import MlflowClient

    from mosaic_core.artifact import load_bank, read_meta
    from mosaic_core.backbone import load_backbone
    from mosaic_core.config import recipe_from_dict
    from pipelines._gates import fit_run_gates
    from pipelines._train_tables import load_tables
    from pipelines.train import main

    run = make_run(tmp_path, tiny_model_dir, depth="deep", gate_layers=(1, 2))
    summary = main(str(run), num_workers=2, max_steps=2)
    info = json.loads((run / "gates.json").read_text())
    assert info["requests"] > 0
    train_df, _ = load_tables(run, 0)
    n_train = MlflowClient(summary["tracking_uri"]).get_run(summary["mlflow_run_id"]).data.params["n_train"]
    assert int(n_train) == (train_df["label"] == "pos").sum() < len(train_df)  # the tokens train on positives only
    assert info["layers"] == [1, 2] and set(info["categories"]) == set(CATS)
    assert all(v["positives"] > 0 and v["negatives"] > 0 for v in info["categories"].values())
    bb = load_backbone(str(tiny_model_dir))
    bank = load_bank(run / "bank", bb.fingerprint)
    assert bank.gate_layers == (1, 2) and set(bank.gates) == set(CATS)
    assert read_meta(run / "bank" / "alcohol").gate_layers == [1, 2]
    stamp = (run / "gates.safetensors").stat().st_mtime_ns
    recipe = recipe_from_dict(yaml.safe_load((run / "resolved_config.yaml").read_text()))
    fit_run_gates(run, recipe, train_df, list(CATS))  # the same recipe and data: the gates are reused
    assert (run / "gates.safetensors").stat().st_mtime_ns == stamp
    softmax = dataclasses.replace(recipe, gate=dataclasses.replace(recipe.gate, kind="softmax"))
    fit_run_gates(run, softmax, train_df, list(CATS))  # another kind: refitted from the stored features
    gates = load_file(str(run / "gates.safetensors"))
    assert json.loads((run / "gates.json").read_text())["kind"] == "softmax"
    assert {tuple(g.shape) for g in gates.values()} == {(len(CATS), 2 * bb.model.config.hidden_size + 1)}
