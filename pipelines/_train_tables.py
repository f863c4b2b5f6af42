"""The train stage's inputs from a run's data/: the training rows joined with the teacher (one Ray dataset per
sampler draw, named by `draw_dataset`) and the validation rows (refusal and fidelity). Read at the driver
(pipelines/train.py); the workers (pipelines/_train_worker.py) read the draws by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _read_parquet_dir(path: Path) -> Any:
    import pandas as pd

    from mosaic_core.errors import ConfigError

    files = sorted(path.glob("*.parquet")) if path.is_dir() else []
    if not files:
        raise ConfigError([f"no parquet files in {path}: run the data stage (`mosaic data`) first"], "run directory")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def load_tables(run: Path, seed: int, val_examples: int = 64) -> tuple[Any, list[dict[str, Any]]]:
    """(train rows joined with the teacher, shuffled) and the validation rows: up to `val_examples` scored for
    refusal (prompt, active, label, order; half of each label where the split has them) and up to `val_examples`
    general requests with every sampled module on and the teacher's answer (`answer_ids`), scored for fidelity."""
    from mosaic_core.errors import ConfigError
    from mosaic_core.teacher import TEACHER_COLS

    ex = _read_parquet_dir(run / "data" / "examples")
    teacher = _read_parquet_dir(run / "data" / "teacher")[["prompt_id", *TEACHER_COLS]].drop_duplicates("prompt_id")
    bad = sorted(set(ex["label"]) - {"pos", "neg"})
    if bad:
        raise ConfigError([f"examples: unknown label(s) {bad}"], str(run))
    train = ex[ex["split"] == "train"] if "split" in ex else ex
    train = train.merge(teacher, on="prompt_id", how="left")
    is_neg = train["label"] == "neg"
    missing = sorted(set(train.loc[is_neg & train["response_ids"].isna(), "prompt_id"]))
    if missing:
        problem = f"{len(missing)} negative prompt(s) have no teacher row, e.g. {missing[:5]}: rerun the teacher"
        raise ConfigError([problem], str(run))
    for c in TEACHER_COLS:  # positives get empty lists (not NaN) so Arrow keeps one list type per column
        train[c] = [v if n else [] for v, n in zip(train[c], is_neg, strict=True)]
    train = train.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # interleave orders from the start
    if "draw" not in train:  # tables written before sampler.draws: one draw
        train["draw"] = 0
    val_df = ex[ex["split"] == "val"] if "split" in ex else ex.iloc[:0]
    parts = [g.sample(min(len(g), val_examples // 2), random_state=seed) for _, g in val_df.groupby("label")]
    val = [
        {"prompt": r.prompt, "active": list(r.active), "label": r.label, "order": len(r.active)}
        for p in parts
        for r in p.itertuples()
    ]
    if len(val_df) and "source" in val_df:
        top = val_df[(val_df["source"] == "general") & (val_df["order"] == val_df["order"].max())].drop_duplicates("prompt_id")
        top = top.merge(teacher, on="prompt_id").head(val_examples)
        val += [
            {
                "prompt": r.prompt,
                "active": list(r.active),
                "label": "fidelity",
                "order": len(r.active),
                "answer_ids": [int(t) for t in r.response_ids],
            }
            for r in top.itertuples()
        ]
    return train, val


def draw_dataset(d: int) -> str:
    """The Ray dataset name of the sampler's draw d (epoch e trains on draw e mod draws)."""
    return "train" if d == 0 else f"train_{d}"
