"""Smoke test of benchmarks/train_throughput.py: the in-process configurations on a tiny run, 1 timed step each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.pipelines.test_train import make_run

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ("torch", "torch-prefix-cache", "torch-online-teacher", "peft-prompt-tuning")


def test_in_process_configurations_report_tokens_per_s(tmp_path, tiny_model_dir):
    run = make_run(tmp_path, tiny_model_dir)  # 8 train rows = (1 warm-up + 1 step) x batch 4
    out = tmp_path / "results.json"
    cmd = [
        sys.executable,
        "benchmarks/train_throughput.py",
        "--run",
        str(run),
        "--steps",
        "1",
        "--batch",
        "4",
        "--threads",
        "1",
        "--configs",
        ",".join(CONFIGS),
        "--json",
        str(out),
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in p.stdout.splitlines() if line.startswith("| ") and "configuration" not in line]
    assert [r[0].strip() for r in rows] == list(CONFIGS)
    assert rows[0][5].strip() == "1.00"  # torch is the reference of the ratio column
    results = json.loads(out.read_text())["results"]
    assert [r["config"] for r in results] == list(CONFIGS)
    for r in results:
        assert r["workers"] == 1 and r["steps"] == 1
        assert r["tokens_per_s_total"] > 0 and r["tokens_per_s_worker"] == r["tokens_per_s_total"] and r["s_per_step"] > 0
