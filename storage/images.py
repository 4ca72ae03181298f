"""Image files: the one reader and validator of the package, and the images table's rows.

Every image anything reads goes through :func:`decode_image` (:func:`load_image` for a URI):
ingest (:func:`read_image_info`, so a file the stages would refuse never enters the images
table), the stages, the Ray workers, retraining and the annotation page. A file that cannot be
turned into a sensible (H, W, 3) uint8 RGB array raises :class:`BadImageError`, whose ``reason``
is a short code (``missing``, ``empty``, ``not_an_image``, ``truncated``, ``too_small``,
``decompression_bomb``, ``unsupported_mode``; ``size_changed`` from :func:`load_stored_image`)
and whose message names the file; ingest and the stages write that message to the failures
table and go on with the next image.

What is converted rather than refused:

- grey (``L``, ``1``), palette (``P``) and CMYK images -> RGB;
- RGBA / LA / palette with transparency -> composited over white (what viewers show; dropping
  alpha would expose whatever colour the transparent pixels happen to hold);
- 16-bit grey (``I;16``) and 32-bit integer / float images -> 8 bit by scaling, not clipping
  (``convert("RGB")`` clips every value above 255 to white);
- animated GIF / PNG / WebP -> the first frame;
- a wrong file extension -> ignored, the format is read from the content;
- EXIF orientation -> applied only when ``exif_transpose=True``. The images table records the
  stored pixel grid (``exif_transpose=False``): that is the grid COCO annotations refer to, so
  masks line up with it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import pyarrow as pa
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from maskmill.storage.errors import BadImageError, MissingImageError
from maskmill.storage.schema import IMAGES

__all__ = [
    "MAX_PIXELS",
    "MIN_SIDE",
    "BadImageError",
    "ImageInfo",
    "MissingImageError",
    "decode_image",
    "image_id_of",
    "images_table",
    "load_image",
    "load_stored_image",
    "read_image_info",
]


@dataclass(frozen=True)
class ImageInfo:
    """An image of the store, as the images table keeps it.

    Attributes:
        image_id: :func:`image_id_of` the file's SHA-256.
        uri: the file (local path or fsspec URL).
        height, width: the stored pixel grid, (H, W) as numpy shapes it (no EXIF turn).
        sha256: hex SHA-256 of the file's bytes.
    """

    image_id: str
    uri: str
    height: int
    width: int
    sha256: str


def image_id_of(sha256: str) -> str:
    """Image id: the first 16 hex digits of the file's SHA-256.

    Content addressing makes re-imports idempotent wherever the files are moved to.
    """
    return sha256[:16]


# A side shorter than this is not worth segmenting (a 1x1 "image" is a tracking pixel).
MIN_SIDE = 8
# Refuse images above this many pixels before decoding them: a decompression bomb is a small
# file that expands to gigabytes. 2**28 px is a 16k x 16k photo, bigger than any camera's.
MAX_PIXELS = 2**28


def load_image(
    uri: str,
    exif_transpose: bool = True,
    min_side: int = MIN_SIDE,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Read an image file (local path or fsspec URL) as (H, W, 3) uint8 RGB.

    Args:
        uri: path or fsspec URL.
        exif_transpose: turn the image upright by its EXIF orientation (what viewers show).
            Store images are read with False, so masks stay on the stored pixel grid (see
            :func:`load_stored_image` and the module doc).
        min_side: refuse images with a side shorter than this many pixels.
        max_pixels: refuse images with more pixels than this, before decoding them.

    Raises:
        BadImageError: naming the file and the reason, when it is missing or unusable.
    """
    return decode_image(_read_bytes(uri), uri, exif_transpose, min_side, max_pixels)


def load_image_and_id(uri: str) -> tuple[np.ndarray, str | None]:
    """:func:`load_image` (turned upright by its EXIF orientation) from one read of the file,
    and the store's image id of the file (:func:`image_id_of`) when the turn changed nothing,
    else None: only then are the pixels the stored grid's, so what a store keys by the id (a
    cached embedding) applies to them."""
    data = _read_bytes(uri)
    image = decode_image(data, uri)
    if not _upright_as_stored(data):
        unturned = decode_image(data, uri, exif_transpose=False)
        if image.shape != unturned.shape or not np.array_equal(image, unturned):
            return image, None
    return image, image_id_of(hashlib.sha256(data).hexdigest())


def _upright_as_stored(data: bytes) -> bool:
    """Whether an image file's EXIF orientation is none or 1 (what exif_transpose leaves as
    it is); read from the header, without decoding the pixels."""
    with Image.open(io.BytesIO(data)) as image:
        return image.getexif().get(ExifTags.Base.Orientation, 1) == 1


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
                f"{width}x{height} pixels; maskmill needs at least {min_side}x{min_side}",
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


def _read_bytes(uri: str) -> bytes:
    """The bytes of the file at ``uri``; a file system error is a BadImageError naming it."""
    try:
        with fsspec.open(uri, "rb") as file:
            return file.read()
    except FileNotFoundError:
        raise MissingImageError(uri) from None
    except OSError as error:  # permissions, a folder, a broken mount: named, not a traceback
        raise BadImageError(uri, "unreadable", f"{type(error).__name__}: {error}") from None


def read_image_info(uri: str) -> ImageInfo:
    """The images-table row of the image file at ``uri`` (any fsspec URL).

    The file is decoded whole, with the same checks as :func:`load_image`, so what enters the
    images table is an image every stage can read.

    Raises:
        BadImageError: naming the file and the reason (:class:`MissingImageError` when there is
            no such file).
    """
    data = _read_bytes(uri)
    height, width = decode_image(data, uri, exif_transpose=False).shape[:2]
    digest = hashlib.sha256(data).hexdigest()
    return ImageInfo(
        image_id=image_id_of(digest), uri=uri, height=height, width=width, sha256=digest
    )


def load_stored_image(info: ImageInfo) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an images-table image, on its stored pixel grid (no EXIF turn:
    masks live on that grid).

    Raises:
        BadImageError: the file is missing or unusable now, or (reason ``size_changed``) it no
            longer decodes to the (H, W) the images table recorded.
    """
    image = load_image(info.uri, exif_transpose=False)
    if image.shape[:2] != (info.height, info.width):
        raise BadImageError(
            info.uri,
            "size_changed",
            f"decodes to {image.shape[1]}x{image.shape[0]} (w x h) but the images table says "
            f"{info.width}x{info.height}",
        )
    return image


def images_table(infos: Iterable[ImageInfo], added_at: dt.datetime) -> pa.Table:
    """Arrow table (``IMAGES`` schema) of image infos."""
    return pa.Table.from_pylist(
        [{**asdict(info), "added_at": added_at} for info in infos], schema=IMAGES
    )
