"""The embedding cache: image embeddings kept in the store, so an image is encoded once per
image encoder rather than once per stage, evaluation and retrain.

Layout::

    <store>/embeddings/<encoder digest>/<image_id>/<view key>.npz

- ``encoder digest``: ``model.sam.encoder_digest`` (64 hex digits) of the encoder that made the
  embeddings; a retrain that leaves the encoder frozen keeps it (its stages hit the cache), one
  that trains the encoder gets a folder of its own.
- ``image_id``: the images table's id (the first 16 hex digits of the file's SHA-256).
- ``view key`` (:func:`view_key`): what part of the image was encoded, at what model input
  side and, when not the model's own float32, at what encoder precision: ``full-1024`` for the
  whole image, ``x0-y0-x1-y1-1024`` for a crop (XYXY pixels of the stored image, exclusive
  right/bottom), ``full-1024-bf16`` for the whole image encoded under bf16 autocast (so a run
  at float32 never reads a bf16 embedding, nor the other way round).

An entry is an uncompressed NumPy ``.npz`` (readable by anyone with NumPy; its zip members
carry CRC-32s, so corruption is detected on read) holding ``features`` (1, C, h, w) float16,
``original_size`` (H, W) of the encoded view and ``input_size`` (H, W) of the view resized
inside the model input. It is written whole by ``Store.write_bytes`` (temp + rename on local
disks, one PUT on object stores), so a reader sees a complete entry or none, and read through
the store's fsspec filesystem, so every Ray worker that can open the store can read it. A
missing, truncated or corrupt entry, or one of another shape, is a miss (:meth:`get` returns
None and the caller encodes and writes it again), never a crash.

Two writers of the same entry write the same numbers (same encoder, same pixels): the last
rename wins and nothing is lost. Nothing here knows a model: the engine
(``engine.embeddings``) decides what to encode and hands arrays in and out.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass

import numpy as np

from maskmill.storage.store import Store, check_key

EMBEDDINGS_DIR = "embeddings"
ENTRY_SUFFIX = ".npz"
_DIGEST = re.compile(r"^[0-9a-f]{16,128}$")


@dataclass(frozen=True)
class CachedEmbedding:
    """One cache entry.

    Attributes:
        features: (1, C, h, w) float16 image embedding.
        original_size: (H, W) of the encoded view (the image, or the crop).
        input_size: (H, W) of the view resized inside the padded model input.
    """

    features: np.ndarray
    original_size: tuple[int, int]
    input_size: tuple[int, int]


@dataclass(frozen=True)
class CacheSize:
    """What the cache holds: ``entries`` files, ``bytes`` in all, over ``encoders`` digests."""

    entries: int
    bytes: int
    encoders: int


def view_key(
    crop_box: list[int] | tuple[int, ...] | None, input_side: int, precision: str = "fp32"
) -> str:
    """The file name (without suffix) of a view: ``full-<side>`` for the whole image (``crop_box``
    None), else ``x0-y0-x1-y1-<side>`` (XYXY integer pixels, exclusive right/bottom); a
    ``precision`` other than ``fp32`` (the encoder's autocast dtype, e.g. ``bf16``) is appended
    as ``-<precision>``."""
    if int(input_side) < 1:
        raise ValueError(f"input side must be a positive number of pixels, got {input_side}")
    if not re.fullmatch(r"[a-z0-9]+", precision):
        raise ValueError(f"precision must be a lowercase name such as bf16, got {precision!r}")
    suffix = "" if precision == "fp32" else f"-{precision}"
    if crop_box is None:
        return f"full-{int(input_side)}{suffix}"
    if len(crop_box) != 4 or any(int(v) != v or v < 0 for v in crop_box):
        raise ValueError(f"crop box must be 4 non-negative integer pixels XYXY, got {crop_box}")
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"crop box must be XYXY with x0 < x1 and y0 < y1, got {crop_box}")
    return f"{x0}-{y0}-{x1}-{y1}-{int(input_side)}{suffix}"


class EmbeddingCache:
    """The cache entries of one image encoder (``digest``) in ``store``.

    Picklable (a store URL and its fsspec filesystem), so it can be handed to Ray actors.
    """

    def __init__(self, store: Store, digest: str) -> None:
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise ValueError(f"encoder digest must be 16-128 lowercase hex digits, got {digest!r}")
        self.store = store
        self.digest = digest

    def __repr__(self) -> str:
        return f"EmbeddingCache({self.store.url!r}, {self.digest[:12]}...)"

    def path(self, image_id: str, view: str) -> str:
        """The filesystem path of an entry (``view`` from :func:`view_key`)."""
        return self.store.path(
            EMBEDDINGS_DIR,
            self.digest,
            check_key(image_id, "image id"),
            check_key(view, "view key") + ENTRY_SUFFIX,
        )

    def get(self, image_id: str, view: str) -> CachedEmbedding | None:
        """The entry of ``image_id``'s ``view``, or None: missing, or unreadable (truncated,
        corrupt, not an embedding) — a miss, which the next :meth:`put` overwrites."""
        try:
            data = self.store.fs.cat_file(self.path(image_id, view))
        except FileNotFoundError:
            return None
        return decode_entry(data)

    def put(self, image_id: str, view: str, entry: CachedEmbedding) -> str:
        """Write ``entry`` whole (float16) under ``image_id``/``view``, replacing any older one;
        return its path."""
        path = self.path(image_id, view)
        self.store.write_bytes(path, encode_entry(entry))
        return path


def encode_entry(entry: CachedEmbedding) -> bytes:
    """The bytes of an entry: an uncompressed ``.npz`` (embeddings barely compress)."""
    features = np.asarray(entry.features)
    if features.ndim != 4 or features.shape[0] != 1:
        raise ValueError(f"features must be (1, C, h, w), got shape {features.shape}")
    buffer = io.BytesIO()
    np.savez(
        buffer,
        features=features.astype(np.float16, copy=False),
        original_size=np.asarray(entry.original_size, dtype=np.int64),
        input_size=np.asarray(entry.input_size, dtype=np.int64),
    )
    return buffer.getvalue()


def decode_entry(data: bytes) -> CachedEmbedding | None:
    """An entry from its bytes; None when they are not a complete, intact entry."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            # Reading each member whole checks its CRC-32.
            features = npz["features"]
            original_size = npz["original_size"]
            input_size = npz["input_size"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if (
        features.dtype != np.float16
        or features.ndim != 4
        or features.shape[0] != 1
        or original_size.shape != (2,)
        or input_size.shape != (2,)
        or not np.isfinite(features).all()
    ):
        return None
    return CachedEmbedding(
        features=features,
        original_size=(int(original_size[0]), int(original_size[1])),
        input_size=(int(input_size[0]), int(input_size[1])),
    )


def cache_size(store: Store) -> CacheSize:
    """Entries and bytes of every encoder's cache in ``store`` (a listing through its
    filesystem; temp files of writers in progress are not counted)."""
    fs = store.fs
    fs.invalidate_cache()
    root = store.path(EMBEDDINGS_DIR)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        found = {}
    entries = size = 0
    digests: set[str] = set()
    prefix = root.rstrip("/") + "/"
    for path, info in found.items():
        name = path.rsplit("/", 1)[-1]
        if info.get("type") != "file" or not name.endswith(ENTRY_SUFFIX) or name.startswith("."):
            continue
        entries += 1
        size += int(info.get("size") or 0)
        digests.add(path[len(prefix) :].split("/", 1)[0] if path.startswith(prefix) else "")
    return CacheSize(entries=entries, bytes=size, encoders=len(digests))
