"""mosaic_core: composable safety modules (learned control tokens) for a frozen chat LLM.

Pure library: torch + transformers + safetensors. Ray, MLflow, FastAPI and DeepSpeed are never imported here.
"""

from mosaic_core.bank import Bank, ControlTokenBank, DeepTokenBank
from mosaic_core.config import DEFAULT_REFUSAL, BankConfig, LossConfig, SamplerConfig
from mosaic_core.errors import (
    ArtifactError,
    BackboneError,
    ConfigError,
    DuplicateCategoryError,
    IncompatibleBackboneError,
    IntegrityError,
    MosaicError,
    UnknownCategoryError,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_REFUSAL",
    "ArtifactError",
    "BackboneError",
    "BankConfig",
    "ConfigError",
    "Bank",
    "ControlTokenBank",
    "DeepTokenBank",
    "DuplicateCategoryError",
    "IncompatibleBackboneError",
    "IntegrityError",
    "LossConfig",
    "MosaicError",
    "SamplerConfig",
    "UnknownCategoryError",
    "__version__",
]
