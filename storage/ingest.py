"""Folder ingest: every image file under a folder (any fsspec URL) into the images table.

The images without ground truth counterpart of :func:`storage.coco.import_coco`: the same reader
and validator (:func:`~storage.images.read_image_info` decodes each file whole) and the same
writer (:meth:`StageWriter.write_images`). A file no stage could read goes to the failures
table (round 0, stage ``ingest``) with the reason the stages would give, and never enters the
images table.
"""

from __future__ import annotations

import hashlib
import posixpath

import fsspec
from tqdm import tqdm

from maskmill.storage.errors import BadImageError
from maskmill.storage.images import ImageInfo, read_image_info
from maskmill.storage.store import Store
from maskmill.storage.writer import StageWriter

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
)
INGEST_ROUND, INGEST_STAGE = 0, "ingest"


def ingest_folder(store: Store | str, images: str, progress: bool = False) -> dict[str, int]:
    """Register every image file under ``images`` (folder path or fsspec URL) in the images
    table; files that are no usable image go to the failures table (round 0, stage
    ``ingest``) with the reason. Idempotent: the same folder with the same files gives the same
    shards, and a rerun skips it.

    Returns:
        ``{"images": registered, "failures": refused}``, or ``{"skipped": 1}`` when this
        folder, with the same files, was registered before.

    Raises:
        FileNotFoundError: ``images`` is no folder, or holds no file with an image extension.
    """
    store = store if isinstance(store, Store) else Store(store)
    fs, root = fsspec.core.url_to_fs(images)
    if not fs.isdir(root):
        raise FileNotFoundError(f"--images {images}: no such folder")
    paths = sorted(
        p
        for p in fs.find(root)
        if p.lower().endswith(IMAGE_EXTENSIONS) and not posixpath.basename(p).startswith(".")
    )
    if not paths:
        raise FileNotFoundError(
            f"--images {images}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it"
        )
    # The key names the folder and its file list: a rerun on the same folder finds its shard.
    listing = "\n".join([root, *paths]).encode()
    key = "folder-" + hashlib.blake2b(listing, digest_size=8).hexdigest()
    if store.has_shard("images", key):
        return {"skipped": 1}
    local = fs.protocol in ("file", ("file", "local"))
    infos: dict[str, ImageInfo] = {}
    failures = []
    for path in tqdm(paths, desc="reading images", unit="image", disable=not progress):
        uri = path if local else fs.unstrip_protocol(path)
        try:
            info = read_image_info(uri)
        except BadImageError as error:
            failures.append({"uri": uri, "error": str(error)})
            continue
        infos.setdefault(info.image_id, info)  # the same content twice is one image
    with StageWriter(store, INGEST_ROUND, INGEST_STAGE, owner=f"ingest {images}") as writer:
        if failures:  # failures first: the images shard marks the folder as done
            writer.write_failures(key, failures)
        if infos:
            writer.write_images(key, [infos[i] for i in sorted(infos)])
    return {"images": len(infos), "failures": len(failures)}
