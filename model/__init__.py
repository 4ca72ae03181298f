"""maskmill's promptable segmentation model: SAM architecture, predictor, checkpoints.

Knows nothing of Prefect, Ray or storage.
"""

from .build import build_model
from .checkpoint import (
    CheckpointError,
    has_default,
    load_checkpoint,
    load_default,
    load_model,
    save_checkpoint,
)
from .config import CONFIGS, SamConfig, get_config
from .mask_generator import MaskGenerator
from .predictor import (
    ENCODER_PRECISIONS,
    EncoderPrecision,
    ImageEmbedding,
    Predictor,
    encoder_autocast_dtype,
)
from .presets import PRESET_NAMES, SAM_PRESETS, check_presets, generator_presets
from .sam import Sam

__all__ = [
    "CONFIGS",
    "CheckpointError",
    "ENCODER_PRECISIONS",
    "EncoderPrecision",
    "ImageEmbedding",
    "MaskGenerator",
    "PRESET_NAMES",
    "SAM_PRESETS",
    "Predictor",
    "Sam",
    "SamConfig",
    "build_model",
    "check_presets",
    "encoder_autocast_dtype",
    "generator_presets",
    "get_config",
    "has_default",
    "load_checkpoint",
    "load_default",
    "load_model",
    "save_checkpoint",
]
