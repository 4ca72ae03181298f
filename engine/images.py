"""Reading images from any fsspec URL into RGB arrays."""

from __future__ import annotations

import io

import fsspec
import numpy as np
from PIL import Image, ImageOps


def load_image(uri: str) -> np.ndarray:
    """Read an image file (local path or fsspec URL) as (H, W, 3) uint8 RGB.

    EXIF orientation is applied, so the array is upright as viewers show it; grey, palette,
    CMYK and RGBA images are converted to RGB.

    Raises:
        ValueError: naming the file, when it is missing or not a readable image.
    """
    try:
        with fsspec.open(uri, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise ValueError(f"{uri}: no such image file") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = ImageOps.exif_transpose(image)
            return np.asarray(image.convert("RGB"))
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as error:
        raise ValueError(f"{uri}: not a readable image: {error}") from None
