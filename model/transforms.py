"""Image and coordinate transforms between the user's image and the model input.

The model sees the image resized so that its longest side equals the model's ``image_size``
(aspect ratio kept, PIL bilinear as in segment-anything), then padded bottom-right to a square.
Sizes are (H, W); coordinates are XY pixels.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(H, W) of an image of (height, width) resized so that its longest side is ``long_side``."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def to_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Return an (H, W, 3) uint8 RGB array for a grey (H, W) / (H, W, 1), RGB or RGBA image.

    uint16 images are scaled to 8 bits; alpha is dropped (the pixels are kept as they are).

    Raises:
        ValueError: naming ``name``, for other shapes, dtypes or an empty image.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"{name} must be H x W (grey), H x W x 3 (RGB) or H x W x 4 (RGBA), got shape "
            f"{image.shape}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {image.shape}")
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8 (or uint16, bool), got {image.dtype}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    return np.ascontiguousarray(image)


def resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image so its longest side is ``long_side``.

    PIL bilinear (antialiased when shrinking), as segment-anything, so embeddings match it.
    """
    new_h, new_w = preprocess_shape(image.shape[0], image.shape[1], long_side)
    if (new_h, new_w) == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def scale_coords(
    coords: torch.Tensor, original_size: tuple[int, int], long_side: int
) -> torch.Tensor:
    """Map (..., 2) XY pixel coordinates of the original (H, W) image into the resized image.

    Boxes go through as (..., 2, 2) corner pairs.
    """
    old_h, old_w = original_size
    new_h, new_w = preprocess_shape(old_h, old_w, long_side)
    scale = coords.new_tensor([new_w / old_w, new_h / old_h])
    return coords * scale
