"""scripts/framed_misses.py: which targets a gated bank lets through, split into gate and token misses (hand-made gates
on the tiny Llama)."""

import pandas as pd
import torch

from tests.scripts import load_script


def _rows() -> pd.DataFrame:
    base = {"condition": "mosaic", "mode": "fast", "system": "", "messages": ""}
    return pd.DataFrame(
        [
            base | {"prompt": "whisky?", "category": "alcohol", "group": "dsr", "family": "", "refused": True},
            base
            | {"prompt": "a ghost story", "category": "horror", "group": "framed:dsr", "family": "fiction", "refused": False},
            base | {"prompt": "odds?", "category": "betting", "group": "framed:dsr", "family": "fiction", "refused": False},
            base | {"prompt": "odds?", "category": "betting", "group": "or", "family": "", "refused": False},
            base | {"prompt": "odds?", "category": "betting", "group": "dsr", "family": "", "refused": False, "mode": "gen"},
        ]
    )


def test_misses_split_into_a_gate_that_kept_the_module_out_and_a_module_that_did_not_refuse(tiny_backbone):
    from mosaic_core.bank import DeepTokenBank
    from mosaic_core.cache import PrefixCache

    script = load_script("framed_misses")
    model = tiny_backbone.model
    bank = DeepTokenBank.for_model(model, m=1)
    for c in ("alcohol", "betting", "horror"):
        bank.add(c, torch.randn(bank.module_shape))
    F = 2 * bank.d

    def bias(*b: float) -> torch.Tensor:  # zero weights: each row's score is its bias, whatever the request
        g = torch.zeros(len(b), F + 1)
        g[:, -1] = torch.tensor(b)
        return g if len(b) > 1 else g[0]

    bank.set_gate("alcohol", bias(1.0), (1, 2))  # always in
    bank.set_gate("horror", bias(-1.0), (1, 2))  # never: "none" wins
    bank.set_gate("betting", bias(0.5, 1.0), (1, 2))  # above "none", below another category: kept out

    rows = script.target_rows(_rows())
    assert list(rows.family) == ["plain", "fiction", "fiction"]  # fast target rows with modules on only
    cache = PrefixCache.for_chat(model, tiny_backbone.tokenizer)
    inserted, over_none = script.own_module_in(bank, tiny_backbone.tokenizer, cache, rows, chunk=2)
    assert inserted == [True, False, False] and over_none == [True, False, True]

    table = script.tabulate(rows.assign(inserted=inserted, over_none=over_none)).set_index("family")
    assert list(table.index) == ["plain", "fiction"]
    assert table.loc["fiction", "n"] == 2 and table.loc["fiction", "own module in %"] == 0.0
    assert table.loc["fiction", "answered, gate kept it out"] == 2 and table.loc["fiction", "answered, module in"] == 0
    assert table.loc["fiction", "kept out: to no category"] == 1
    assert table.loc["fiction", "kept out: to another category"] == 1
    assert table.loc["plain", "refused %"] == 100.0 and table.loc["plain", "own module in %"] == 100.0
