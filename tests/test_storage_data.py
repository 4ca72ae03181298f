"""Test data for the storage tests, made in tmp dirs: small generated images and a COCO file,
generated mask records, and empty local and ``memory://`` stores."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from maskmill.storage import Store, rle

# (file name, width, height) of the generated images; sizes differ so size checks bite.
IMAGES = [("a.png", 64, 48), ("b.png", 80, 60), ("sub/c.png", 50, 50), ("d.png", 40, 30)]


def make_coco(root: Path, seed: int = 0) -> tuple[Path, Path, dict[str, Any]]:
    """Write images under ``root/images`` and ``root/coco.json``; return (json, images, data).

    Image ``a``: two polygons (one of them in two parts) and a compressed RLE; ``b``: an
    uncompressed-RLE crowd mask and a polygon; ``c`` (in a sub-folder): one polygon; ``d``: none.
    """
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images = []
    for i, (name, w, h) in enumerate(IMAGES, start=1):
        path = images_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        images.append({"id": i, "file_name": name, "width": w, "height": h})

    crowd = np.zeros((60, 80), np.uint8)
    crowd[10:30, 5:25] = 1
    crowd[40:55, 60:78] = 1
    compressed = np.zeros((48, 64), np.uint8)
    compressed[5:20, 30:60] = 1
    annotations = [
        {
            "id": 11,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": [[2, 2, 20, 3, 18, 25, 4, 20]],
        },
        {
            "id": 12,
            "image_id": 1,
            "category_id": 2,
            "iscrowd": 0,
            "segmentation": [[30, 30, 40, 30, 40, 40, 30, 40], [50, 35, 60, 35, 55, 45]],
        },
        {
            "id": 13,
            "image_id": 1,
            "category_id": 2,
            "iscrowd": 0,
            "segmentation": _compressed(compressed),
        },
        {
            "id": 21,
            "image_id": 2,
            "category_id": 1,
            "iscrowd": 1,
            "segmentation": _uncompressed(crowd),
        },
        {
            "id": 22,
            "image_id": 2,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": [[10.5, 40.5, 70.25, 42.0, 60.0, 58.75, 12.0, 55.0]],
        },
        {
            "id": 31,
            "image_id": 3,
            "category_id": 2,
            "iscrowd": 0,
            "segmentation": [[5, 5, 45, 8, 40, 45, 8, 40]],
        },
    ]
    for ann in annotations:  # area and bbox as COCO files carry them (ignored by the import)
        ann["area"], ann["bbox"] = 0, [0, 0, 0, 0]
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "nut"}, {"id": 2, "name": "fig"}],
    }
    json_path = root / "coco.json"
    json_path.write_text(json.dumps(data))
    return json_path, images_dir, data


def _compressed(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def _uncompressed(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE: run lengths (column-major), starting with a 0-run."""
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0, *runs]
    return {"size": list(mask.shape), "counts": runs}


def records(n: int, image: str = "img0") -> list[dict[str, Any]]:
    """``n`` generated masks of one image, as a model's mask generator returns them."""
    out = []
    for i in range(n):
        mask = np.zeros((32, 48), bool)
        mask[i % 20 : i % 20 + 8, 2 + i % 30 : 12 + i % 30] = True
        out.append(
            {
                "image_id": image,
                "segmentation": rle.encode(mask),
                "predicted_iou": 0.9,
                "stability_score": 0.95,
                "point_coords": [[5.0, 5.0]],
                "crop_box": [0, 0, 48, 32],
            }
        )
    return out


def snapshot(store: Store) -> dict[str, bytes]:
    """Every file under a store with its bytes: equal snapshots mean nothing changed."""
    store.fs.invalidate_cache()
    if not store.fs.exists(store.root):
        return {}
    return {p: store.fs.cat_file(p) for p in store.fs.find(store.root)}


STORE_KINDS = ["local", "memory"]


def empty_store(kind: str, tmp_path: Path) -> Iterator[Store]:
    """An empty store on a local folder or on ``memory://`` (removed afterwards); test modules
    wrap it in their ``store`` fixture, parametrized over STORE_KINDS."""
    if kind == "local":
        yield Store(str(tmp_path / "store"))
        return
    url = f"memory://maskmill-test-{uuid.uuid4().hex}"
    yield Store(url)
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def test_uncompressed_helper_matches_pycocotools(tmp_path):
    """The test's own uncompressed RLE helper agrees with pycocotools (so fixtures are valid)."""
    mask = np.zeros((7, 5), np.uint8)
    mask[0, 0] = mask[3:6, 1:4] = 1
    compressed = mask_utils.frPyObjects(_uncompressed(mask), 7, 5)
    assert (rle.decode(compressed) == mask).all()


def test_shards_written_before_a_column_existed_still_read(tmp_path):
    """A store written by an earlier maskmill (masks without strokes, stroke_seconds and
    model_iou) reads beside new shards: the missing columns are null, nothing is lost."""
    import pyarrow.parquet as pq

    from maskmill.storage import Catalog, StageWriter
    from maskmill.storage.writer import masks_table

    store = Store(str(tmp_path / "store"))
    with StageWriter(store, 1, "manual") as writer:
        new = records(2, image="new")
        for r in new:
            r.update(strokes=3, stroke_seconds=4.5, model_iou=0.8)
        writer.write_masks("new", new)
    old = masks_table(records(3, image="old"), 1, "manual")
    old = old.drop_columns(["strokes", "stroke_seconds", "model_iou"])
    path = store.shard_path("masks", "old", 1, "manual")
    with store.fs.open(path, "wb") as handle:
        pq.write_table(old, handle)
    with Catalog(store) as catalog:
        rows = catalog.con.execute(
            "SELECT image_id, strokes, stroke_seconds, model_iou FROM masks ORDER BY image_id"
        ).fetchall()
    assert [r[0] for r in rows] == ["new", "new", "old", "old", "old"]
    assert rows[0][1:3] == (3, 4.5) and abs(rows[0][3] - 0.8) < 1e-6
    assert all(r[1:] == (None, None, None) for r in rows[2:])
