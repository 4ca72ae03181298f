"""The images table: content-addressed image rows read from files on any fsspec URL."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from dataclasses import dataclass

import fsspec
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from maskmill.storage.errors import MissingImageError, StorageError
from maskmill.storage.schema import IMAGES


@dataclass(frozen=True)
class ImageInfo:
    """What the images table keeps about one image file."""

    image_id: str
    uri: str
    width: int
    height: int
    sha256: str


def image_id_of(sha256: str) -> str:
    """Image id: the first 16 hex digits of the file's SHA-256.

    Content addressing makes re-imports idempotent wherever the files are moved to.
    """
    return sha256[:16]


def read_image_info(uri: str) -> ImageInfo:
    """Width, height and SHA-256 of the image file at ``uri`` (any fsspec URL).

    Raises :class:`MissingImageError` if there is no such file and :class:`StorageError` if it
    is not an image.
    """
    try:
        with fsspec.open(uri, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise MissingImageError(f"image file not found: {uri}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # the stored pixel grid, as COCO counts it (no EXIF turn)
    except (UnidentifiedImageError, OSError) as error:
        raise StorageError(f"not a readable image: {uri} ({error})") from None
    digest = hashlib.sha256(data).hexdigest()
    return ImageInfo(image_id_of(digest), uri, width, height, digest)


def images_table(infos: list[ImageInfo], added_at: dt.datetime) -> pa.Table:
    """Arrow table (``IMAGES`` schema) of image infos."""
    return pa.Table.from_pylist(
        [{**info.__dict__, "added_at": added_at} for info in infos], schema=IMAGES
    )
