"""benchmarks/chain_progress.py on two stage reports in deep_prompt_probe's format (written here: the script only reads them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _report(path: Path, dsr: float, or_: float) -> str:
    orders = {f"order{o}": {"dsr": dsr + o / 10, "or": or_, "lookalike_or": 30.0, "base_dsr": 8.5, "base_or": 7.5,
                            "base_lookalike_or": 10.9} for o in (1, 2, 3)}
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"args": {}, **orders}))
    return str(path)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "benchmarks/chain_progress.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)


def test_table_counts_the_targets_each_stage_meets_and_the_plot_is_written(tmp_path):
    a = _report(tmp_path / "a" / "report.json", dsr=94.0, or_=10.5)  # DSR 94.1/94.2/94.3: none of six
    b = _report(tmp_path / "b" / "report.json", dsr=94.95, or_=9.0)  # DSR 95.05/95.15/95.25, OR 9: all six
    out = tmp_path / "chain.png"
    p = _run(f"first={a}", f"second={b}", "--out", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| first | 94.10 / 10.50 (30.0) | 94.20 / 10.50 (30.0) | 94.30 / 10.50 (30.0) | 0 of 6 |" in p.stdout
    assert "| second | 95.05 / 9.00 (30.0) | 95.15 / 9.00 (30.0) | 95.25 / 9.00 (30.0) | 6 of 6 |" in p.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_stage_without_a_report_is_named_in_one_line(tmp_path):
    p = _run(f"missing={tmp_path / 'nope.json'}", "--out", str(tmp_path / "x.png"))
    assert p.returncode != 0
    assert "stage missing:" in p.stderr and "not found" in p.stderr
    assert "Traceback" not in p.stderr
