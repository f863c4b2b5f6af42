"""scripts/results_table.py: the README block and docs/results.md come from a report, never typed by hand."""

import json

from tests.scripts import load_script


def _script():
    return load_script("results_table")


def _cell(k, n):
    return {"rate": k / n, "k": k, "n": n, "ci95_low": 0.0, "ci95_high": 1.0}


def test_the_readme_block_is_replaced_from_the_report(tmp_path, monkeypatch):
    rep = {
        "split": "test2",
        "bank": "banks/b",
        "per_order": {
            "fast": {
                "mosaic": {
                    "1": {"dsr": _cell(9, 10), "or": _cell(1, 10), "lookalike": _cell(2, 10)},
                    "5": {"dsr": _cell(10, 10), "or": _cell(3, 10), "lookalike": _cell(0, 10)},
                }
            }
        },
        "framed": {"fiction": {"1": {"dsr": _cell(3, 4), "or": _cell(0, 4), "lookalike": _cell(1, 4)}}},
        "framed_bare": {"fiction": {"dsr": _cell(1, 4), "or": _cell(2, 4), "lookalike": _cell(0, 4)}},
        "fidelity": {"order1": _cell(8, 10), "all": _cell(7, 10)},
        "retention": {"all": _cell(19, 20)},
        "xstest": {},
    }
    (tmp_path / "r.json").write_text(json.dumps(rep))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin -->\nold numbers\n<!-- results:end -->\noutro\n")
    monkeypatch.setattr(
        "sys.argv", ["x", str(tmp_path / "r.json"), "--out", str(tmp_path / "results.md"), "--readme", str(readme)]
    )
    _script().main()
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "| DSR ↑ | 90.0 | 100.0 | 95.0 |" in text  # pooled over orders: 19 / 20
    assert "| framed (1 families): DSR / OR / look-alike OR |  |  | 75.0 / 0.0 / 25.0 |" in text
    assert "| framed, bare model (no modules) |  |  | 25.0 / 50.0 / 0.0 |" in text
    assert "Weakest framing family: fiction (DSR 75.0 %)" in text
    assert "| fiction | 75.0 / 0.0 / 25.0 | 25.0 / 50.0 / 0.0 |" in (tmp_path / "results.md").read_text()
    assert "| 5 | 100.0 [0–100] | 30.0 [0–100] | 0.0 [0–100] |" in (tmp_path / "results.md").read_text()
