"""`mosaic modules register|list|promote|show` and `resolve_bundle` against a real MLflow 3.17 registry:
a sqlite store in a temp dir (the default `runs/mlflow.db` layout), and once a real `mlflow server` on loopback.

Tests share one store (creating the sqlite schema costs seconds); each uses its own backbone id, so its
registered models (`mosaic.<backbone>.<category>`) and version numbers are its own."""

import dataclasses
import json
import os
import re

# Before mlflow is imported (by pipelines.modules below): tests send nothing off the machine.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import hashlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from mlflow import MlflowClient

from mosaic_core.artifact import save_bank
from mosaic_core.bank import ControlTokenBank
from mosaic_core.bundle import manifest_digest
from mosaic_core.config import BankConfig
from mosaic_core.errors import ArtifactError, IncompatibleBackboneError, IntegrityError, UnknownCategoryError
from pipelines.modules import cli, resolve_bundle


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("registry")


@pytest.fixture
def here(store_dir, monkeypatch):
    """Work from the shared store's directory with no MLFLOW_TRACKING_URI: the default runs/mlflow.db applies."""
    monkeypatch.chdir(store_dir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return store_dir


@pytest.fixture
def client(here):
    uri = f"sqlite:///{here / 'runs' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def fingerprint(tiny_backbone, model_id, **changes):
    return dataclasses.replace(tiny_backbone.fingerprint, model_id=model_id, **changes)


def make_run(
    root, name, fp, embeddings, *, categories=("alcohol", "betting"), training_run_id=None, extends=None, report=None, seed=0
):
    """A run directory as the training stage leaves it: bank/, resolved_config.yaml, optionally eval/report.json."""
    run = Path(root) / "runs" / name
    cfg = BankConfig(categories=tuple(categories), m=2, init="normal")
    bank = ControlTokenBank.build(cfg, embeddings, seed=seed)
    save_bank(
        bank, run / "bank", fingerprint=fp, init="normal", training_run_id=training_run_id or f"train-{name}", extends=extends
    )
    (run / "resolved_config.yaml").write_text(f"seed: {seed}\nbank:\n  m: 2\n")
    if report is not None:
        (run / "eval").mkdir()
        (run / "eval" / "report.json").write_text(json.dumps(report))
    return run, bank


def versions(client, name):
    return sorted((str(v.version) for v in client.search_model_versions(f"name='{name}'")), key=int)


def test_register_twice_gives_versions_1_and_2_with_provenance(here, client, tiny_backbone, capsys):
    fp = fingerprint(tiny_backbone, "tiny-reg")
    report = {"per_module": {"alcohol": {"dsr": 0.91234, "or": 0.05, "note": "not a number"}}}
    run, _ = make_run(here, "reg", fp, tiny_backbone.embeddings, report=report)
    cli(["register", "--run", "runs/reg"])  # relative: resolved against the working directory
    cli(["register", "--run", "runs/reg"])
    out = capsys.readouterr().out
    assert "registered mosaic.tiny-reg.alcohol version 2" in out and "registered mosaic.tiny-reg.betting version 2" in out

    assert versions(client, "mosaic.tiny-reg.alcohol") == ["1", "2"] == versions(client, "mosaic.tiny-reg.betting")
    run_info = json.loads((run / "run.json").read_text())
    assert run_info["tracking_uri"] == f"sqlite:///{here / 'runs' / 'mlflow.db'}"
    v1, v2 = (client.get_model_version("mosaic.tiny-reg.alcohol", v) for v in ("1", "2"))
    assert v1.run_id == v2.run_id == run_info["mlflow_run_id"]  # the second registration reused the run
    assert v2.source == (here / "runs" / "mlartifacts").as_uri() + f"/{v2.run_id}/artifacts/modules/alcohol"
    meta = json.loads((run / "bank" / "alcohol" / "module.json").read_text())
    recipe = hashlib.sha256((run / "resolved_config.yaml").read_bytes()).hexdigest()
    assert {
        k: v2.tags[k]
        for k in (
            "m",
            "d",
            "placement",
            "backbone_fingerprint",
            "recipe_sha256",
            "module_sha256",
            "training_run_id",
            "eval.dsr",
            "eval.or",
            "trained_with",
        )
    } == {
        "m": "2",
        "d": str(tiny_backbone.embeddings.shape[1]),
        "placement": "before_assistant",
        "backbone_fingerprint": fp.digest,
        "recipe_sha256": recipe,
        "module_sha256": meta["sha256"],
        "training_run_id": "train-reg",
        "eval.dsr": "0.9123",
        "eval.or": "0.05",
        "trained_with": "mosaic.tiny-reg.betting:2",
    }
    assert "eval.note" not in v2.tags
    betting = client.get_model_version("mosaic.tiny-reg.betting", "1")
    assert not any(k.startswith("eval.") for k in betting.tags) and betting.tags["trained_with"] == "mosaic.tiny-reg.alcohol:1"

    registered = json.loads((run / "bank" / "registered.json").read_text())
    assert {c: (r["name"], r["version"]) for c, r in registered.items()} == {
        "alcohol": ("mosaic.tiny-reg.alcohol", "2"),
        "betting": ("mosaic.tiny-reg.betting", "2"),
    }
    # A version's files are exactly the module artifact.
    listed = client.list_artifacts(v2.run_id, "modules/alcohol")
    assert sorted(Path(f.path).name for f in listed) == ["module.json", "tokens.safetensors"]


def test_register_uses_the_training_run_recorded_in_run_json(here, client, tmp_path, tiny_backbone, monkeypatch):
    # What the training stage leaves: its MLflow run (holding the metrics) named in run.json, with its store.
    run, _ = make_run(here, "trained", fingerprint(tiny_backbone, "tiny-trained"), tiny_backbone.embeddings)
    exp = client.get_experiment_by_name("mosaic")
    train_run = client.create_run(exp.experiment_id, run_name="trained").info.run_id
    uri = f"sqlite:///{here / 'runs' / 'mlflow.db'}"
    (run / "run.json").write_text(json.dumps({"mlflow_run_id": train_run, "tracking_uri": uri, "experiment": "mosaic"}))
    monkeypatch.chdir(tmp_path)  # elsewhere: the default runs/mlflow.db would be another, empty store
    cli(["register", "--run", str(run)])
    assert client.get_model_version("mosaic.tiny-trained.alcohol", "1").run_id == train_run
    assert sorted(f.path for f in client.list_artifacts(train_run, "modules")) == ["modules/alcohol", "modules/betting"]
    assert not (tmp_path / "runs").exists()


def test_promote_moves_the_alias_and_the_alias_loads_identical_tensors(here, client, tiny_backbone, tiny_tok, capsys):
    fp = fingerprint(tiny_backbone, "tiny-promo")
    _, bank = make_run(here, "promo", fp, tiny_backbone.embeddings)
    cli(["register", "--run", "runs/promo"])
    cli(["register", "--run", "runs/promo"])
    name = "mosaic.tiny-promo.alcohol"
    cli(["promote", "alcohol", "1", "--alias", "production", "--backbone", "tiny-promo"])
    assert str(client.get_model_version_by_alias(name, "production").version) == "1"
    cli(["promote", name, "2", "--alias", "production"])  # a full name works too
    assert str(client.get_model_version_by_alias(name, "production").version) == "2"
    assert "moved from version 1" in capsys.readouterr().out
    cli(["promote", "betting", "2", "--alias", "production", "--backbone", "tiny-promo"])

    uris = ["models:/mosaic.tiny-promo.betting@production", f"models:/{name}@production"]
    loaded, info = resolve_bundle(uris, fp)
    assert loaded.categories == ["alcohol", "betting"]  # training order, whatever the request order
    for c in bank.categories:
        assert torch.equal(loaded.vectors[c], bank.vectors[c].detach())
    assert [(i["name"], i["version"], i["requested"]) for i in info] == [
        (name, "2", uris[1]),
        ("mosaic.tiny-promo.betting", "2", uris[0]),
    ]
    with pytest.raises(IncompatibleBackboneError):
        resolve_bundle(uris, fingerprint(tiny_backbone, "tiny-promo", embedding_sha256="0" * 64))
    # MLflow 3.17's models:/ download looks names up in the *global* registry (./mlflow.db); we never do.
    assert not (here / "mlflow.db").exists()


def test_incompatible_bundles_are_refused_and_expansions_accepted(here, tiny_backbone):
    fp = fingerprint(tiny_backbone, "tiny-mix")
    emb = tiny_backbone.embeddings
    run_a, _ = make_run(here, "mix-a", fp, emb, training_run_id="train-A")
    make_run(here, "mix-b", fp, emb, training_run_id="train-B", seed=1)
    # An expansion names its base bank the way the training stage does: by the manifest digest.
    make_run(here, "mix-c", fp, emb, categories=("horror",), training_run_id="train-C", extends=manifest_digest(run_a / "bank"))
    other = fingerprint(tiny_backbone, "tiny-mix2", embedding_sha256="0" * 64)
    make_run(here, "mix-d", other, emb, training_run_id="train-A")  # same run id, but another backbone
    for r in ("mix-a", "mix-b", "mix-c", "mix-d"):
        cli(["register", "--run", f"runs/{r}"])

    with pytest.raises(ArtifactError, match="not trained together") as e:
        resolve_bundle(["models:/mosaic.tiny-mix.alcohol/1", "models:/mosaic.tiny-mix.betting/2"])
    assert "mosaic.tiny-mix.alcohol v1" in str(e.value) and "mosaic.tiny-mix.betting v2" in str(e.value)

    expanded, _ = resolve_bundle(
        ["models:/mosaic.tiny-mix.horror/1", "models:/mosaic.tiny-mix.alcohol/1", "models:/mosaic.tiny-mix.betting/1"], fp
    )
    assert expanded.categories == ["alcohol", "betting", "horror"]
    with pytest.raises(ArtifactError, match="neither extends"):  # horror extends bank A, not bank B
        resolve_bundle(["models:/mosaic.tiny-mix.horror/1", "models:/mosaic.tiny-mix.alcohol/2"])

    with pytest.raises(IncompatibleBackboneError, match="different backbones"):
        resolve_bundle(["models:/mosaic.tiny-mix.alcohol/1", "models:/mosaic.tiny-mix2.betting/1"])


def test_tampered_artifact_in_the_store_is_refused(here, client, tiny_backbone, capsys):
    fp = fingerprint(tiny_backbone, "tiny-tamper")
    make_run(here, "tamper", fp, tiny_backbone.embeddings)
    cli(["register", "--run", "runs/tamper"])
    source = client.get_model_version("mosaic.tiny-tamper.betting", "1").source
    stored = Path(unquote(urlparse(source).path)) / "tokens.safetensors"
    raw = bytearray(stored.read_bytes())
    raw[-1] ^= 0xFF
    stored.write_bytes(bytes(raw))

    with pytest.raises(IntegrityError, match="sha256"):
        resolve_bundle(["models:/mosaic.tiny-tamper.alcohol/1", "models:/mosaic.tiny-tamper.betting/1"], fp)
    cli(["show", "models:/mosaic.tiny-tamper.betting/1"])
    assert "MISMATCH" in capsys.readouterr().out


def test_list_and_show_print_names_aliases_and_checked_files(here, tiny_backbone, capsys):
    fp = fingerprint(tiny_backbone, "tiny-list")
    make_run(here, "listed", fp, tiny_backbone.embeddings, report={"per_module": {"alcohol": {"dsr": 0.8, "or": 0.1}}})
    cli(["register", "--run", "runs/listed"])
    cli(["promote", "alcohol", "1", "--alias", "production", "--backbone", "tiny-list"])
    cli(["promote", "betting", "1", "--alias", "canary", "--backbone", "tiny-list"])
    capsys.readouterr()

    cli(["list"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["NAME", "VERSION", "ALIASES", "PLACEMENT", "M", "DSR", "OR", "RUN"]
    rows = {tuple(line.split()[:2]): line.split() for line in lines[2:]}
    assert rows[("mosaic.tiny-list.alcohol", "1")][2:] == ["production", "before_assistant", "2", "0.8", "0.1", "listed"]
    assert rows[("mosaic.tiny-list.betting", "1")][2:] == ["canary", "before_assistant", "2", "-", "-", "listed"]

    cli(["show", "alcohol", "--alias", "production", "--backbone", "tiny-list"])
    out = capsys.readouterr().out
    assert out.startswith("mosaic.tiny-list.alcohol  version 1  aliases: production")
    assert "OK (matches module.json)" in out and "module_sha256" in out and "eval.dsr" in out


def test_user_mistakes_raise_typed_errors(here, tmp_path, tiny_backbone, capsys):
    from pipelines.cli import main as mosaic

    with pytest.raises(ArtifactError, match="does not exist"):
        cli(["register", "--run", str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="has no bank/manifest.json"):
        cli(["register", "--run", str(tmp_path / "empty")])

    fp = fingerprint(tiny_backbone, "tiny-err")
    run, _ = make_run(here, "err", fp, tiny_backbone.embeddings)
    cli(["register", "--run", "runs/err"])
    with pytest.raises(UnknownCategoryError, match="mosaic.tiny-err.horror"):
        cli(["promote", "horror", "1", "--backbone", "tiny-err"])
    with pytest.raises(ArtifactError, match="has no version 7; versions: 1; aliases: none"):
        cli(["promote", "alcohol", "7", "--backbone", "tiny-err"])
    with pytest.raises(ArtifactError, match="has no alias 'production'"):
        cli(["show", "alcohol", "--alias", "production", "--backbone", "tiny-err"])
    with pytest.raises(ArtifactError, match="reserved"):
        cli(["promote", "alcohol", "1", "--alias", "latest", "--backbone", "tiny-err"])
    with pytest.raises(ArtifactError, match="not a module URI"):
        resolve_bundle(["mosaic.tiny-err.alcohol"])
    missing = tmp_path / "elsewhere" / "mlflow.db"
    with pytest.raises(ArtifactError, match="no MLflow registry"):
        cli(["list", "--tracking-uri", f"sqlite:///{missing}"])
    assert not missing.parent.exists()

    # Registered files are immutable: a changed bank in an already registered run dir is refused.
    make_run(here / "changed", "err", fp, tiny_backbone.embeddings, seed=5)
    shutil.rmtree(run / "bank")
    shutil.copytree(here / "changed" / "runs" / "err" / "bank", run / "bank")
    with pytest.raises(ArtifactError, match="immutable"):
        cli(["register", "--run", "runs/err"])

    # Through the `mosaic` entry point a user mistake is one line and exit code 2.
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        mosaic(["modules", "promote", "horror", "1", "--backbone", "tiny-err"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("mosaic modules: error: unknown safety module")


# --------------------------------------------------------------------------------------------- real server


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOOPBACK = {"127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"}


def _listeners():
    """(host, port, owner pids) of every listening TCP socket, from `ss -ltnp` (pids only for our own processes)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        host, _, port = line.split()[3].rpartition(":")
        rows.append((host, port, {int(p) for p in re.findall(r"pid=(\d+)", line)}))
    return rows


def _group_pids(pgid):
    """Pids of the process group `pgid` (the server's CLI process and everything it spawned)."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process exited meanwhile
        if int(fields[2]) == pgid:
            pids.add(int(stat.parent.name))
    return pids


def _stop(proc):
    """SIGTERM the server's process group (CLI, uvicorn and job runner), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.slow  # the server alone needs 10-30 s to answer /health on a busy 2-core box
def test_register_against_a_real_mlflow_server_on_loopback(tmp_path, tiny_backbone, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # No telemetry; no background job runner (8 huey processes, not needed by the registry: halves start-up here).
    env.update(MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 's.db'}",
        "--artifacts-destination",
        str(tmp_path / "art"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"mlflow server exited: {(tmp_path / 'server.log').read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server not healthy within 60 s"
            time.sleep(0.5)
        if shutil.which("ss"):  # the network rule (docs/architecture.md): nothing the server opens listens beyond loopback
            rows = _listeners()
            on_port = {h for h, p, _ in rows if p == str(port)}
            assert on_port and on_port <= LOOPBACK, on_port
            group = _group_pids(proc.pid)
            assert {h for h, _, pids in rows if pids & group} <= LOOPBACK

        fp = fingerprint(tiny_backbone, "tiny-server")
        _, bank = make_run(tmp_path, "served", fp, tiny_backbone.embeddings)
        cli(["register", "--run", "runs/served", "--tracking-uri", url])
        client = MlflowClient(tracking_uri=url, registry_uri=url)
        assert versions(client, "mosaic.tiny-server.alcohol") == ["1"] == versions(client, "mosaic.tiny-server.betting")
        assert client.get_model_version("mosaic.tiny-server.alcohol", "1").source.startswith("mlflow-artifacts:")
        cli(["promote", "alcohol", "1", "--backbone", "tiny-server", "--tracking-uri", url])
        loaded, _ = resolve_bundle(["models:/mosaic.tiny-server.alcohol@production"], fp, tracking_uri=url)
        assert torch.equal(loaded.vectors["alcohol"], bank.vectors["alcohol"].detach())
        assert list((tmp_path / "art").rglob("tokens.safetensors"))  # proxied into --artifacts-destination
        assert not (tmp_path / "runs" / "mlflow.db").exists()  # nothing fell back to the default store
    finally:
        _stop(proc)
        log.close()
