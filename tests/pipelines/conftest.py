import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the pipeline tests (docs/architecture.md); always `address="local"`."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            num_gpus=0,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=300 * 1024**2,
        )
    yield ray
    ray.shutdown()


def write_tiny_dataset(out: Path, cats=("alcohol", "betting", "horror"), per=(4, 2, 0)) -> Path:
    """A slice of MOSAIC-bench: `per` = (train, val, test) rows of each category x kind, plus general."""
    from mosaic_core.dataset import load_jsonl

    rows = load_jsonl([ROOT / "data" / "mosaic-bench"])
    keep = []
    for cat in (*cats, None):
        for kind in ("target", "lookalike", "general"):
            for split, n in zip(("train", "val", "test"), per):
                keep += [r for r in rows if r["category"] == cat and r["kind"] == kind and r["split"] == split][:n]
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    return out


def write_tiny_mmlu(path: Path, n: int = 2) -> Path:
    path.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "subject": "x", "question": f"Q{i}?", "choices": list("abcd"), "answer": 1}) + "\n"
            for i in range(n)
        )
    )
    return path


def write_tiny_recipe(path: Path, backbone: Path, dataset: Path, **sections) -> Path:
    import yaml

    rec = {
        "name": "tiny",
        "backbone": str(backbone),
        "dataset": str(dataset),
        "bank": {"categories": ["alcohol", "betting", "horror"], "m": 2},
        "sampler": {"per_subset": 4, "max_order": 2},
        "teacher": {"max_new_tokens": 4, "batch_size": 8},
        "loss": {"topk": 4, "decision": {"weight": 1.0}, "max_answer_tokens": 3},
        "train": {"phases": [{"epochs": 1, "lr": 0.01}], "batch_size": 4, "num_workers": 2},
    }
    for k, v in sections.items():
        rec[k] = {**rec.get(k, {}), **v} if isinstance(v, dict) else v
    if isinstance(rec.get("eval"), dict):  # an evaluation budget of its own: a file beside the recipe
        budget = path.with_name(f"{path.stem}-budget.yaml")
        budget.write_text(yaml.safe_dump(rec["eval"]))
        rec["eval"] = str(budget)
    path.write_text(yaml.safe_dump(rec))
    return path
