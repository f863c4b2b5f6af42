"""scripts/recipe_keys.py: docs/recipe-keys.md lists every recipe and budget key, generated from the docstrings."""

import re

from tests.scripts import load_script


def test_the_key_reference_is_up_to_date_and_the_recipe_stays_small(tmp_path, monkeypatch, capsys):
    script = load_script("recipe_keys")
    assert script.main(["--check"]) == 0, "docs/recipe-keys.md is out of date: run scripts/recipe_keys.py"
    text = script.render()
    recipe = int(re.search(r"## Recipe \((\d+) keys\)", text).group(1))
    assert recipe <= 40  # a new recipe key replaces one: a knob nobody needs costs every reader
    assert "| `loss.decision` | `{'kind': 'bce', 'weight': 0.0, 'tokens': 4, 'delta': 2.0}` |" in text
    assert "| `fidelity_all_cap` | `None` |" in text
    assert all(row.count(" | ") == 2 and not row.endswith("|  |") for row in text.splitlines() if row.startswith("| `"))
    stale = tmp_path / "keys.md"
    stale.write_text("old\n")
    monkeypatch.setattr(script, "OUT", stale)
    monkeypatch.setattr(script, "ROOT", tmp_path)
    assert script.main(["--check"]) == 1 and "out of date" in capsys.readouterr().err
