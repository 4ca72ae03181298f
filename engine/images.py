"""Reading images from any fsspec URL into RGB arrays, with a named reason for every bad file.

Every image the engine sees goes through :func:`load_image`. A file that cannot be turned into a
sensible (H, W, 3) uint8 RGB array raises :class:`BadImageError`, whose ``reason`` is a short
code (``missing``, ``empty``, ``not_an_image``, ``truncated``, ``too_small``,
``decompression_bomb``, ``unsupported_mode``) and whose message names the file; the stages write
that message to the failures table and go on with the next image.

What is converted rather than refused:

- grey (``L``, ``1``), palette (``P``) and CMYK images -> RGB;
- RGBA / LA / palette with transparency -> composited over white (what viewers show; dropping
  alpha would expose whatever colour the transparent pixels happen to hold);
- 16-bit grey (``I;16``) and 32-bit integer / float images -> 8 bit by scaling, not clipping
  (``convert("RGB")`` clips every value above 255 to white);
- animated GIF / PNG / WebP -> the first frame;
- a wrong file extension -> ignored, the format is read from the content;
- EXIF orientation -> applied only when ``exif_transpose=True``. The engine keeps the stored
  pixel grid (``exif_transpose=False``): that is the grid the images table records (see
  ``storage.images.read_image_info``) and COCO annotations refer to, so masks line up with them.
"""

from __future__ import annotations

import io
import warnings

import fsspec
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A side shorter than this is not worth segmenting (a 1x1 "image" is a tracking pixel).
MIN_SIDE = 8
# Refuse images above this many pixels before decoding them: a decompression bomb is a small
# file that expands to gigabytes. 2**28 px is a 16k x 16k photo, bigger than any camera's.
MAX_PIXELS = 2**28


class BadImageError(ValueError):
    """An image file the engine cannot use; ``reason`` is a short code, the message says why."""

    def __init__(self, uri: str, reason: str, detail: str) -> None:
        super().__init__(f"{uri}: {reason}: {detail}")
        self.uri = uri
        self.reason = reason
        self.detail = detail


def load_image(
    uri: str,
    exif_transpose: bool = True,
    min_side: int = MIN_SIDE,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Read an image file (local path or fsspec URL) as (H, W, 3) uint8 RGB.

    Args:
        uri: path or fsspec URL.
        exif_transpose: turn the image upright by its EXIF orientation (what viewers show). The
            engine passes False so that masks stay on the stored pixel grid (see module doc).
        min_side: refuse images with a side shorter than this many pixels.
        max_pixels: refuse images with more pixels than this, before decoding them.

    Raises:
        BadImageError: naming the file and the reason, when it is missing or unusable.
    """
    try:
        with fsspec.open(uri, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise BadImageError(uri, "missing", "no such image file") from None
    return decode_image(data, uri, exif_transpose, min_side, max_pixels)


def decode_image(
    data: bytes,
    uri: str = "<bytes>",
    exif_transpose: bool = True,
    min_side: int = MIN_SIDE,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """:func:`load_image` on the bytes of a file; ``uri`` only names it in errors."""
    if not data:
        raise BadImageError(uri, "empty", "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; our own limit decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise BadImageError(uri, "decompression_bomb", str(error)) from None
    except UnidentifiedImageError:
        raise BadImageError(
            uri, "not_an_image", f"no image format recognised in its {len(data)} bytes"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImageError(uri, "not_an_image", f"{type(error).__name__}: {error}") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise BadImageError(
                uri,
                "decompression_bomb",
                f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels}",
            )
        if min(width, height) < min_side:
            raise BadImageError(
                uri,
                "too_small",
                f"{width}x{height} pixels; the engine needs at least {min_side}x{min_side}",
            )
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)  # animated: the first frame stands for the file
        # Decode now, so a truncated file fails here with its own reason (PIL is lazy).
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise BadImageError(
                uri, "truncated", f"the image data is cut short or corrupt: {error}"
            ) from None
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
        if exif_transpose:
            image = ImageOps.exif_transpose(image)
        return _to_rgb(image, uri)


def _to_rgb(image: Image.Image, uri: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a decoded PIL image of any mode (see module doc)."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and values.min() >= 0 and values.max() < 2**16):
            grey = values / 257.0  # 65535 -> 255: scale the 16-bit range, never clip it
        else:  # 32-bit int or float: no fixed range, stretch what is there
            low, high = float(values.min()), float(values.max())
            grey = (values - low) * (255.0 / (high - low)) if high > low else values * 0.0
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB")).copy()
    try:
        rgb = image.convert("RGB")
    except (OSError, ValueError) as error:
        raise BadImageError(
            uri, "unsupported_mode", f"mode {mode} has no RGB conversion: {error}"
        ) from None
    return np.asarray(rgb).copy()
