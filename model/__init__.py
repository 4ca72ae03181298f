"""maskmill's promptable segmentation model: SAM architecture, predictor, checkpoints.

Knows nothing of Prefect, Ray or storage.
"""

from .build import build_model
from .checkpoint import CheckpointError, has_default, load_checkpoint, load_default, save_checkpoint
from .config import CONFIGS, SamConfig, get_config
from .mask_generator import MaskGenerator
from .predictor import ImageEmbedding, Predictor
from .sam import Sam

__all__ = [
    "CONFIGS",
    "CheckpointError",
    "ImageEmbedding",
    "MaskGenerator",
    "Predictor",
    "Sam",
    "SamConfig",
    "build_model",
    "get_config",
    "has_default",
    "load_checkpoint",
    "load_default",
    "save_checkpoint",
]
