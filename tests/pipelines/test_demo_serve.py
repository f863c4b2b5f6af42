"""The end of `make demo` (scripts/demo_serve.py) on a tiny model: a real `mosaic serve` process, every request of
the table through the official `openai` client under three module settings, the server stopped by its PID."""

import pytest

from tests.pipelines.test_serve import _make_run, _save_tiny_chat_model
from tests.scripts import load_script


@pytest.mark.slow
def test_demo_serves_the_bank_calls_it_and_stops_the_server(tmp_path, capsys):
    from mosaic_core.backbone import load_backbone

    model_dir = _save_tiny_chat_model(tmp_path / "tiny")
    bb = load_backbone(str(model_dir))
    run, _ = _make_run(tmp_path / "runs", "demo", bb, seed=0)
    demo = load_script("demo_serve")
    rows = demo.main(
        [
            "--bank",
            str(run / "bank"),
            "--backbone",
            str(model_dir),
            "--model",
            bb.fingerprint.model_id,
            "--max-tokens",
            "4",
            "--ready-timeout",
            "420",
        ]
    )
    out = capsys.readouterr().out
    assert len(rows) == 5 * 3 + 2 * 2  # categories: none / own / all five; general: none / all five
    assert {r["modules"] for r in rows} == {"none", "own", "all five"} and all(isinstance(r["refused"], bool) for r in rows)
    assert all(r["inserted"] == r["safety_modules"] for r in rows)  # an ungated bank: every active module goes in
    assert "first words of the answer" in out and "stopped (exit 0)" in out
