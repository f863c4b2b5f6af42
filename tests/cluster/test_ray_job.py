"""The README's cluster path, for real: cluster/local/start.sh (Ray head + MLflow server on loopback), then
`ray job submit --working-dir . -- mosaic run ...` on a tiny recipe, then the registered versions on the server."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipelines.conftest import write_tiny_dataset, write_tiny_mmlu, write_tiny_recipe

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listeners_beyond_loopback(ports: set[int]) -> list[str]:
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout.splitlines()
    bad = []
    for line in out:
        local = line.split()[3]
        host, _, port = local.rpartition(":")
        if int(port) in ports and not host.startswith(("127.", "[::ffff:127.", "[::1]")):
            bad.append(line)
    return bad


def test_ray_job_submit_runs_mosaic_run_and_registers_on_the_mlflow_server(tmp_path, tiny_model_dir):
    from mlflow import MlflowClient

    from mosaic_core.backbone import load_backbone
    from mosaic_core.bundle import registered_name

    ports = {k: _free_port() for k in ("RAY_PORT", "DASH_PORT", "MLFLOW_PORT", "AGENT_PORT", "CLIENT_PORT")}
    env = {
        **os.environ,
        **{k: str(v) for k, v in ports.items()},
        "STATE": str(tmp_path / "cluster"),
        "NUM_CPUS": "2",
        "BIN": str(BIN),
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    env.pop("RAY_ADDRESS", None)
    dataset = write_tiny_dataset(tmp_path / "dataset", per=(3, 2, 2))
    mmlu = write_tiny_mmlu(tmp_path / "mmlu.jsonl")
    recipe = write_tiny_recipe(
        tmp_path / "tiny.yaml",
        tiny_model_dir,
        dataset,
        name="tiny-job",
        bank={"categories": ["alcohol", "betting"]},
        sampler={"per_subset": 2},
        teacher={"max_new_tokens": 3},
        eval={"max_order": 2, "fast_cap": 2, "gen_requests": 1, "max_new_tokens": 2, "mmlu": str(mmlu), "xstest_gen": 0},
    )
    try:  # start inside the try: a start that times out half-way must still be stopped
        started = subprocess.run(
            ["bash", str(ROOT / "cluster" / "local" / "start.sh")], env=env, capture_output=True, text=True, timeout=300
        )
        assert started.returncode == 0, started.stdout + started.stderr
        assert _listeners_beyond_loopback(set(ports.values())) == []
        server = f"http://127.0.0.1:{ports['MLFLOW_PORT']}"
        runtime_env = {
            "excludes": [".venv", "runs", ".git", "**/__pycache__"],
            "env_vars": {"MLFLOW_TRACKING_URI": server, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"},
        }
        job = subprocess.run(
            [
                str(BIN / "ray"),
                "job",
                "submit",
                "--address",
                f"http://127.0.0.1:{ports['DASH_PORT']}",
                "--working-dir",
                str(ROOT),
                "--runtime-env-json",
                json.dumps(runtime_env),
                "--",
                "mosaic",
                "run",
                "--config",
                str(recipe),
                "--out",
                str(tmp_path / "run"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            cwd=ROOT,
        )
        assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-4000:] + job.stderr[-2000:]
        assert "MOSAIC run run" in job.stdout and "registered: " in job.stdout
        client = MlflowClient(tracking_uri=server, registry_uri=server)
        model_id = load_backbone(str(tiny_model_dir)).fingerprint.model_id
        for c in ("alcohol", "betting"):
            versions = client.search_model_versions(f"name='{registered_name(model_id, c)}'")
            assert [v.version for v in versions] in (["1"], [1])
        assert (tmp_path / "run" / "eval" / "report.json").is_file() and (tmp_path / "run" / "bank" / "manifest.json").is_file()
    finally:
        subprocess.run(
            ["bash", str(ROOT / "cluster" / "local" / "stop.sh")], env=env, capture_output=True, text=True, timeout=120
        )
    assert not (tmp_path / "cluster" / "ray.pid").exists()
