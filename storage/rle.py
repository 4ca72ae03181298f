"""COCO run-length encoding through pycocotools, and deterministic mask ids.

Every RLE the storage layer stores or exports is pycocotools' compressed form with ``counts`` as
a ``str``; nothing here encodes or decodes runs by hand.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from maskmill.storage.errors import MaskSizeError

# pycocotools' area() stores the number of masks in a uint8 (2.0.11 with numpy 2), so it fails
# for more than 255 masks at once; batches below that work.
_AREA_BATCH = 255


def mask_id(image_id: str, round_: int, stage: str, index: int) -> str:
    """Deterministic id of the ``index``-th mask of an image in a round and stage.

    A hex string (64-bit BLAKE2b digest) rather than an integer: it survives JSON and JavaScript
    without losing precision, and a rerun of the same unit of work gets the same ids.
    """
    key = f"{image_id}\x1f{round_}\x1f{stage}\x1f{index}".encode()
    return hashlib.blake2b(key, digest_size=8).hexdigest()


def encode(mask: np.ndarray) -> dict[str, Any]:
    """Compressed RLE of one H×W boolean mask: ``{"size": [h, w], "counts": str}``."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode()}


def decode(rle: dict[str, Any]) -> np.ndarray:
    """H×W boolean mask of one compressed RLE."""
    with warnings.catch_warnings():
        # pycocotools 2.0.11's own numpy-2 copy= deprecation; nothing a caller can change
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(_c(rle)).astype(bool)


def areas(rles: Sequence[dict[str, Any]]) -> np.ndarray:
    """Foreground pixel count of each RLE (int64)."""
    out = [
        mask_utils.area([_c(r) for r in rles[i : i + _AREA_BATCH]])
        for i in range(0, len(rles), _AREA_BATCH)
    ]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def ious(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> np.ndarray:
    """(len(a), len(b)) IoU of compressed RLEs, by pycocotools (no crowd semantics)."""
    if not a or not b:
        return np.zeros((len(a), len(b)), np.float64)
    matrix = mask_utils.iou([_c(r) for r in a], [_c(r) for r in b], [0] * len(b))
    return np.asarray(matrix, np.float64).reshape(len(a), len(b))


def bboxes(rles: Sequence[dict[str, Any]]) -> np.ndarray:
    """XYWH box of each RLE (float32, N×4)."""
    if not rles:
        return np.zeros((0, 4), np.float32)
    return mask_utils.toBbox([_c(r) for r in rles]).astype(np.float32).reshape(-1, 4)


def from_coco(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """Canonical compressed RLE of a COCO ``segmentation`` on an image of ``height``×``width``.

    Accepts polygons (a list of flat ``[x0, y0, x1, y1, ...]`` lists), uncompressed RLE
    (``counts`` a list of ints) and compressed RLE (``counts`` a str or bytes). Raises
    :class:`ValueError` saying what is malformed, and :class:`MaskSizeError` when an RLE's
    ``size`` is not the image's.
    """
    if isinstance(segmentation, list):
        if not segmentation:
            raise ValueError("segmentation is an empty polygon list")
        for j, poly in enumerate(segmentation):
            if not isinstance(poly, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly
            ):
                raise ValueError(f"polygon {j} is not a flat list of numbers")
            if len(poly) < 6 or len(poly) % 2:
                raise ValueError(
                    f"polygon {j} has {len(poly)} coordinates; needs an even number, at least 6"
                )
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles) if len(rles) > 1 else rles[0]
        return {"size": [height, width], "counts": rle["counts"].decode()}

    if (
        not isinstance(segmentation, dict)
        or "counts" not in segmentation
        or ("size" not in segmentation)
    ):
        raise ValueError("segmentation is neither a polygon list nor an RLE with size and counts")
    size = segmentation["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise ValueError(f"RLE size {size!r} is not [height, width]")
    if size != [height, width]:
        raise MaskSizeError(
            f"RLE size {size[0]}x{size[1]} (h x w) does not match the image's {height}x{width}"
        )
    counts = segmentation["counts"]
    if isinstance(counts, list):
        if not all(isinstance(v, int) and v >= 0 for v in counts):
            raise ValueError("uncompressed RLE counts are not all non-negative integers")
        if sum(counts) != height * width:
            raise ValueError(
                f"uncompressed RLE counts add up to {sum(counts)} pixels, not {height}x{width}"
            )
        rle = mask_utils.frPyObjects(segmentation, height, width)
        return {"size": [height, width], "counts": rle["counts"].decode()}
    if isinstance(counts, (str, bytes)):
        text = counts.decode() if isinstance(counts, bytes) else counts
        rle = {"size": [height, width], "counts": text}
        # decode -> encode must give the same string back: this catches counts that do not
        # cover exactly height*width pixels (pycocotools leaves such masks partly undefined).
        try:
            again = encode(decode(rle))["counts"]
        except ValueError as error:
            raise ValueError(f"compressed RLE counts do not decode: {error}") from None
        if again != text:
            raise ValueError(
                f"compressed RLE counts do not describe a {height}x{width} mask "
                "(decode -> encode gives different counts)"
            )
        return rle
    raise ValueError(f"RLE counts is a {type(counts).__name__}, not a list, str or bytes")


def _c(rle: dict[str, Any]) -> dict[str, Any]:
    """The RLE as pycocotools' C code wants it (counts as bytes)."""
    counts = rle["counts"]
    return {"size": rle["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
