"""Storage benchmark: write and read one million generated masks.

Prints masks/s written (StageWriter: records -> committed Parquet shards) against writing the
same masks as SA-1B per-image JSON files in the same run, bytes per mask against that SA-1B
JSON (goal <= 0.5x), masks/s read back through DuckDB, and the time of the full ``stats``
query (goal <= 1 s).

    .venv/bin/python bench/storage.py [--masks 1000000] [--store DIR] [--keep]
    .venv/bin/python bench/storage.py --synthetic --masks 10000000   # stats at 10 M (<= 2 s)

Masks are random star-shaped polygons rasterised by pycocotools on 1500 x 2250 images (the
size SA-1B's released images have), 100 per image, with the fields ``MaskGenerator`` returns.
``--synthetic`` writes the rows straight as Arrow columns instead (short RLE strings, areas,
boxes and scores drawn at random) and times only ``stats``: 10 M rows in about a minute.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import tempfile
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pycocotools import mask as mask_utils
from tqdm import tqdm

from maskmill.storage import Catalog, StageWriter, Store, compute_stats
from maskmill.storage.coco import sa1b_annotation
from maskmill.storage.schema import MASKS
from maskmill.storage.writer import masks_table

HEIGHT, WIDTH = 1500, 2250
MASKS_PER_IMAGE = 100
IMAGES_PER_SHARD = 100
SYNTHETIC_GOAL_S = 2.0  # the full stats over 10 M synthetic rows, at most


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


def synthetic_table(first_image: int, images: int, rng: np.random.Generator) -> pa.Table:
    """``MASKS_PER_IMAGE`` rows of each of ``images`` images, built column by column with
    numpy and Arrow (no polygons rasterised): a short RLE string, log-uniform areas with
    boxes and scores to match, ``source`` model; what ``stats`` reads, at 10 M rows in a
    minute (the ``--synthetic`` path)."""
    n = images * MASKS_PER_IMAGE
    per_image = np.arange(first_image, first_image + images)
    image_ids = pa.array([f"{i:016x}" for i in per_image]).take(
        pa.array(np.repeat(np.arange(images), MASKS_PER_IMAGE))
    )
    indexes = pa.array([f"-{i:03d}" for i in range(MASKS_PER_IMAGE)]).take(
        pa.array(np.tile(np.arange(MASKS_PER_IMAGE), images))
    )
    area = np.exp(rng.uniform(np.log(16), np.log(HEIGHT * WIDTH * 0.9), n)).astype(np.int64)
    side = np.sqrt(area).astype(np.float32)
    xy = rng.uniform(0, 1, (n, 2)).astype(np.float32) * (WIDTH, HEIGHT)
    bbox = np.stack([xy[:, 0], xy[:, 1], side, side], 1).reshape(-1)
    point = (xy + side[:, None] / 2).reshape(-1)
    crop = np.tile(np.array([0, 0, WIDTH, HEIGHT], np.float32), n)
    nulls = {f.name: pa.nulls(n, f.type) for f in MASKS}
    columns = {
        **nulls,
        "mask_id": pc.binary_join_element_wise(image_ids, indexes, ""),
        "image_id": image_ids,
        "round": pa.array(np.ones(n, np.int32)),
        "stage": pa.array(["auto"] * n),
        "model_version": pa.array(np.ones(n, np.int32)),
        "source": pa.array(["model"] * n),
        # A real mask's counts are ~100 B; stats never decode them, so one short string does.
        "segmentation": pa.array(["PPYo1"] * n),
        "height": pa.array(np.full(n, HEIGHT, np.int32)),
        "width": pa.array(np.full(n, WIDTH, np.int32)),
        "area": pa.array(area),
        "bbox": pa.FixedSizeListArray.from_arrays(pa.array(bbox), 4),
        "predicted_iou": pa.array(rng.uniform(0.88, 1.0, n).astype(np.float32)),
        "stability_score": pa.array(rng.uniform(0.95, 1.0, n).astype(np.float32)),
        "point_coords": pa.ListArray.from_arrays(
            pa.array(np.arange(n + 1, dtype=np.int32)),
            pa.FixedSizeListArray.from_arrays(pa.array(point), 2),
        ),
        "crop_box": pa.FixedSizeListArray.from_arrays(pa.array(crop), 4),
        "iscrowd": pa.array(np.zeros(n, bool)),
        "created_at": pa.array(
            np.full(n, np.datetime64(dt.datetime.now(dt.timezone.utc).replace(tzinfo=None))),
            MASKS.field("created_at").type,
        ),
    }
    return pa.Table.from_arrays([columns[f.name] for f in MASKS], schema=MASKS)


def bench_synthetic(masks: int, root: str | None, keep: bool) -> dict[str, float]:
    """``--synthetic``: ``masks`` rows written straight as Arrow tables (one shard per
    ``IMAGES_PER_SHARD * 10`` images), then the full ``stats`` timed (goal <= 2 s at 10 M);
    prints and returns the figures (``bench/scale.py``'s ``stats`` section calls it)."""
    images = max(1, masks // MASKS_PER_IMAGE)
    temporary = root is None
    root = root or tempfile.mkdtemp(prefix="maskmill-bench-")
    store = Store(root)
    rng = np.random.default_rng(0)
    per_shard = IMAGES_PER_SHARD * 10
    t0 = time.perf_counter()
    with StageWriter(store, 1, "auto", owner="bench") as writer:
        for start in tqdm(range(0, images, per_shard), unit="shard", desc="writing synthetic"):
            table = synthetic_table(start, min(per_shard, images - start), rng)
            writer.write_masks(f"images-{start:08d}", table)
        writer.finish(model_version=1, metrics={"miou": 0.0})
    write_s = time.perf_counter() - t0
    total = images * MASKS_PER_IMAGE
    parquet_bytes = sum(store.fs.size(p) for p in store.shards("masks"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        with Catalog(store) as catalog:
            stats = compute_stats(catalog)
        times.append(time.perf_counter() - t0)
    assert stats["masks"] == total, (stats["masks"], total)
    assert stats["images_with_masks"] == images
    print()
    print(f"masks (synthetic rows)    {total}")
    print(f"write parquet             {total / write_s:12,.0f} masks/s  ({write_s:.1f} s)")
    print(f"parquet bytes             {parquet_bytes:12,d}")
    print(
        f"full stats query          {min(times):12.3f} s best of 3 (first {times[0]:.3f} s;"
        f" goal <= {SYNTHETIC_GOAL_S:g} s at 10 M)"
    )
    if temporary and not keep:
        shutil.rmtree(root)
    return {
        "masks": total,
        "write_masks_per_s": total / write_s,
        "stats_s_best_of_3": min(times),
        "stats_s_first": times[0],
    }


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
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="write rows straight with Arrow (no rasterising; 10 M in about a minute) and "
        "time only stats",
    )
    args = parser.parse_args()
    if args.synthetic:
        bench_synthetic(args.masks, args.store, args.keep)
        return

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
