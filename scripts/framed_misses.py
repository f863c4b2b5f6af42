"""Where a gated bank lets targets through, plain and per framing family: its own module's gate kept the module out,
or the module was in and the answer still came. Reads the rows an evaluation wrote (`mosaic eval --out DIR` leaves
`DIR/eval/rows.parquet`); the backbone reads each target request once for its gate features, minutes on 2 cores.

    python scripts/framed_misses.py runs/smollm2-cpu-c4/test2/eval --bank runs/smollm2-cpu-c4/bank

Rows: the fast-scored target rows with modules on (groups `dsr` and `framed:dsr`), every order. Per family: n, % refused,
% with the row's own module inserted, the rows answered with it kept out (gate) and with it in (tokens), and of the
rows it was kept out of, how many a softmax gate gave to "no category" rather than to another category (a logistic
gate has no other category: all of them)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from mosaic_core.artifact import load_bank, read_manifest
from mosaic_core.backbone import load_backbone
from mosaic_core.cache import PrefixCache
from mosaic_core.gate import fires
from mosaic_core.template import as_messages, encode_chat
from mosaic_core.training import request_of


def target_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The fast-scored target rows with modules on, a `family` ("plain" where unframed) on each."""
    t = rows[(rows.condition == "mosaic") & rows.group.isin(["dsr", "framed:dsr"]) & (rows["mode"] == "fast")]
    return t.assign(family=t.family.where(t.family != "", "plain"))


def own_module_in(bank, tokenizer, cache: PrefixCache, rows: pd.DataFrame, chunk: int = 256) -> tuple[list[bool], list[bool]]:
    """Per row: (its own category's module inserted, its gate's own score above "no category"). A gate's first row is
    its category against "none" (mosaic_core.gate.fit_softmax_gates; a logistic gate is that row alone)."""
    from tqdm import tqdm

    inserted, over_none = [], []
    records = rows.to_dict("records")
    for s in tqdm(range(0, len(records), chunk), desc="[framed_misses] gate features", unit=f"x{chunk}", mininterval=10):
        part = records[s : s + chunk]
        runs = [encode_chat(tokenizer, as_messages(request_of(r), r["system"] or None), "before_assistant").before for r in part]
        x = cache.features(runs, bank.gate_layers, bank.gate_recency)
        own = [r["category"] for r in part]
        inserted += [c in fired for c, fired in zip(own, bank.firing([[c] for c in own], x))]
        above = {c: fires(g if g.dim() == 1 else g[0], x).tolist() for c, g in bank.gates.items()}
        over_none += [above[c][i] for i, c in enumerate(own)]
    return inserted, over_none


def tabulate(rows: pd.DataFrame) -> pd.DataFrame:
    """rows: target rows with bool `refused`, `inserted` and `over_none`. One line per family, plain first."""
    out = []
    for family, g in rows.groupby("family"):
        answered = ~g.refused.astype(bool)
        kept_out = ~g.inserted.astype(bool)
        out.append(
            {
                "family": family,
                "n": len(g),
                "refused %": round(100 * g.refused.mean(), 1),
                "own module in %": round(100 * g.inserted.mean(), 1),
                "answered, gate kept it out": int((answered & kept_out).sum()),
                "answered, module in": int((answered & ~kept_out).sum()),
                "kept out: to no category": int((kept_out & ~g.over_none.astype(bool)).sum()),
                "kept out: to another category": int((kept_out & g.over_none.astype(bool)).sum()),
            }
        )
    table = pd.DataFrame(out)
    return table.sort_values("family", key=lambda f: f != "plain", kind="stable").reset_index(drop=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval_dir", help="an evaluation's output: the directory holding rows.parquet")
    ap.add_argument("--bank", required=True, help="the gated bank that evaluation scored")
    a = ap.parse_args()
    bank_dir = Path(a.bank)
    bb = load_backbone(read_manifest(bank_dir)["fingerprint"]["model_id"])
    bank = load_bank(bank_dir, bb.fingerprint)
    if not bank.gates:
        raise SystemExit(f"{bank_dir}: its modules have no gates; every active module is inserted")
    rows = target_rows(pd.read_parquet(Path(a.eval_dir) / "rows.parquet"))
    cache = PrefixCache.for_chat(bb.model, bb.tokenizer)
    inserted, over_none = own_module_in(bank, bb.tokenizer, cache, rows)
    table = tabulate(rows.assign(inserted=inserted, over_none=over_none))
    print(f"{a.eval_dir}: {len(rows)} target rows with modules on, {bank_dir}")
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
