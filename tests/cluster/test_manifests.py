"""Every manifest in cluster/ loads and validates against the schema of the tool that consumes it."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"


def test_cluster_launcher_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER / "ray-cluster-gpu.yaml").read_text())
    validate_config(prepare_config(cfg))
    assert cfg["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 8
    cfg["available_node_types"]["head"]["bogus"] = 1
    with pytest.raises(Exception, match="bogus"):
        validate_config(prepare_config(cfg))


def test_runtime_env_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()))
    assert env["env_vars"]["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and ".venv" in env["excludes"]


def test_rayjob_runs_a_shipped_recipe():
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob-train.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["mosaic", "run"] and (ROOT / entry[entry.index("--config") + 1]).is_file()
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"


@pytest.mark.parametrize("name, stage", [("zero2.json", 2), ("zero3.json", 3)])
def test_deepspeed_configs(name, stage):
    path = CLUSTER / "deepspeed" / name
    if not path.is_file():
        pytest.skip(f"{name} not shipped yet")
    cfg = json.loads(path.read_text())
    assert cfg["zero_optimization"]["stage"] == stage and "optimizer" not in cfg  # client optimizer (docs/architecture.md)


@pytest.mark.parametrize("script", ["start.sh", "stop.sh"])
def test_local_cluster_scripts_parse_and_bind_loopback(script):
    path = CLUSTER / "local" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "pkill" not in text and "killall" not in text and "ray stop" not in text.replace("never `ray stop`", "")
    if script == "start.sh":
        assert (
            "--dashboard-host 127.0.0.1" in text and "--host 127.0.0.1" in text and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in text
        )


def test_rayservice_serve_config_validates_and_matches_the_app_builder():
    from ray.serve.schema import ServeDeploySchema

    svc = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    assert (svc["apiVersion"], svc["kind"]) == ("ray.io/v1", "RayService")
    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    local = ServeDeploySchema.model_validate(yaml.safe_load((CLUSTER / "serve_config.yaml").read_text()))
    assert serve_cfg.applications[0].import_path == local.applications[0].import_path == "pipelines.serve:build_app"
    assert local.http_options.host == "127.0.0.1"  # the shipped local config never listens beyond loopback
    assert {d.name for d in serve_cfg.applications[0].deployments} <= {d.name for d in local.applications[0].deployments}
