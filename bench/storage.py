"""Storage benchmark: write and read one million generated masks.

Prints masks/s written (StageWriter: records -> committed Parquet shards) against writing the
same masks as SA-1B per-image JSON files in the same run, bytes per mask against that SA-1B
JSON (goal <= 0.5x), masks/s read back through DuckDB, and the time of the full ``stats``
query (goal <= 1 s).

    .venv/bin/python bench/storage.py [--masks 1000000] [--store DIR] [--keep]

Masks are random star-shaped polygons rasterised by pycocotools on 1500 x 2250 images (the
size SA-1B's released images have), 100 per image, with the fields ``MaskGenerator`` returns.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import fsspec
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from maskmill.storage import Catalog, StageWriter, Store, compute_stats
from maskmill.storage.coco import sa1b_annotation
from maskmill.storage.writer import masks_table

HEIGHT, WIDTH = 1500, 2250
MASKS_PER_IMAGE = 100
IMAGES_PER_SHARD = 100


def generate(image: int, rng: np.random.Generator) -> list[dict]:
    """MASKS_PER_IMAGE SA-1B-style records of one image: star-shaped polygons, log-uniform
    sizes from a few pixels to most of the image."""
    polygons = []
    for _ in range(MASKS_PER_IMAGE):
        n = int(rng.integers(8, 48))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radius = np.exp(rng.uniform(np.log(4), np.log(700))) * rng.uniform(0.55, 1.0, n)
        cx, cy = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
        xs = np.clip(cx + radius * np.cos(angles), 0, WIDTH)
        ys = np.clip(cy + radius * np.sin(angles), 0, HEIGHT)
        polygons.append(np.stack([xs, ys], 1).ravel().tolist())
    rles = mask_utils.frPyObjects(polygons, HEIGHT, WIDTH)
    ious = rng.uniform(0.88, 1.0, MASKS_PER_IMAGE)
    stabilities = rng.uniform(0.95, 1.0, MASKS_PER_IMAGE)
    points = rng.uniform(0, 1, (MASKS_PER_IMAGE, 2)) * (WIDTH, HEIGHT)
    image_id = f"{image:016x}"
    return [
        {
            "image_id": image_id,
            "segmentation": {"size": [HEIGHT, WIDTH], "counts": r["counts"].decode()},
            "predicted_iou": float(ious[i]),
            "stability_score": float(stabilities[i]),
            "point_coords": [[float(points[i, 0]), float(points[i, 1])]],
            "crop_box": [0.0, 0.0, float(WIDTH), float(HEIGHT)],
        }
        for i, r in enumerate(rles)
    ]


def sa1b_json(image: int, table) -> bytes:
    """The SA-1B per-image JSON file of one image's masks (the reference format)."""
    rows = table.to_pylist()
    doc = {
        "image": {
            "image_id": image,
            "width": WIDTH,
            "height": HEIGHT,
            "file_name": f"sa_{image}.jpg",
        },
        "annotations": [sa1b_annotation(row) for row in rows],
    }
    return json.dumps(doc).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--masks", type=int, default=1_000_000)
    parser.add_argument("--store", help="local folder for the store (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    args = parser.parse_args()

    images = max(1, args.masks // MASKS_PER_IMAGE)
    root = args.store or tempfile.mkdtemp(prefix="maskmill-bench-")
    store = Store(root)
    rng = np.random.default_rng(0)
    reference = fsspec.filesystem("memory")
    ref_root = f"/bench-sa1b-{time.time_ns()}"

    print(
        f"generating {images * MASKS_PER_IMAGE} masks on {images} images ({HEIGHT}x{WIDTH}) ...",
        flush=True,
    )
    shards = []
    for start in tqdm(range(0, images, IMAGES_PER_SHARD), unit="shard", desc="generating"):
        records = [
            r for i in range(start, min(images, start + IMAGES_PER_SHARD)) for r in generate(i, rng)
        ]
        shards.append((start, records))
    total = sum(len(r) for _, r in shards)

    # Write: records -> Arrow (area, bbox by pycocotools; mask ids) -> Parquet -> commit.
    write_s = 0.0
    with StageWriter(store, 1, "auto", owner="bench") as writer:
        for start, records in tqdm(shards, unit="shard", desc="writing parquet"):
            t0 = time.perf_counter()
            writer.write_masks(f"images-{start:07d}", records, model_version=1)
            write_s += time.perf_counter() - t0
        writer.finish(model_version=1, metrics={"miou": 0.0})

    # Reference: the same masks as SA-1B JSON files (same fields, from the same rows).
    json_s = 0.0
    json_bytes = 0
    for start, records in tqdm(shards, unit="shard", desc="writing sa1b json"):
        t0 = time.perf_counter()
        table = masks_table(records, 1, "auto", model_version=1)
        for image in range(start, min(images, start + IMAGES_PER_SHARD)):
            part = table.slice((image - start) * MASKS_PER_IMAGE, MASKS_PER_IMAGE)
            data = sa1b_json(image, part)
            reference.pipe_file(f"{ref_root}/sa_{image}.json", data)
            json_bytes += len(data)
        json_s += time.perf_counter() - t0
    reference.rm(ref_root, recursive=True)
    del shards

    parquet_bytes = sum(store.fs.size(p) for p in store.shards("masks"))

    # Read every mask back (all columns) through DuckDB.
    t0 = time.perf_counter()
    with Catalog(store) as catalog:
        table = catalog.sql("SELECT * FROM masks").to_arrow_table()
    read_s = time.perf_counter() - t0
    assert table.num_rows == total, (table.num_rows, total)
    del table

    # The full stats query: open the catalog and compute every statistic.
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        with Catalog(store) as catalog:
            stats = compute_stats(catalog)
        times.append(time.perf_counter() - t0)
    assert stats["masks"] == total

    print()
    print(f"masks                     {total}")
    print(f"write parquet             {total / write_s:12,.0f} masks/s  ({write_s:.1f} s)")
    print(
        f"write SA-1B JSON (ref)    {total / json_s:12,.0f} masks/s  ({json_s:.1f} s)"
        f"  -> parquet/json speed {json_s / write_s:.2f}x"
    )
    print(f"bytes per mask, parquet   {parquet_bytes / total:12,.1f}")
    print(
        f"bytes per mask, SA-1B JSON{json_bytes / total:12,.1f}"
        f"  -> parquet/json size {parquet_bytes / json_bytes:.3f}x (goal <= 0.5x)"
    )
    print(f"read all columns (DuckDB) {total / read_s:12,.0f} masks/s  ({read_s:.2f} s)")
    print(
        f"full stats query          {min(times):12.3f} s best of 3 (first {times[0]:.3f} s;"
        " goal <= 1 s)"
    )
    if not args.keep and not args.store:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
