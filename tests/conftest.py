import os

# Before anything imports ray: keep every Ray socket on loopback (docs/architecture.md), no usage stats, no hub.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import pytest
import torch

from mosaic_core.testing import save_tiny, tiny_model, tiny_tokenizer

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_backbone(tiny_tok):
    from mosaic_core.backbone import from_model

    return from_model(tiny_model(len(tiny_tok)), tiny_tok, "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm():
    """The real embedded backbone (behaviour tier)."""
    from mosaic_core.backbone import load_backbone

    return load_backbone()
