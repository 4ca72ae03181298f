"""The fully automatic stage on a Ray actor pool: 1 worker against 2 on the same images, and
the orchestration overhead, against the same generator run in-process (the reference) in the
same run; and the stage's generator before and after ``engine/generate.py`` was deleted.

    python bench/engine.py                       # 8 generated scenes, the shipped model
    python bench/engine.py --images 12 --points-per-side 16 --checkpoint model.pt

Printed per setting: wall time of the stage (actor start, model loads, image reads, shard
writes, finish), the actors' own time on the images and their start-up (a Ray worker process
importing torch and loading the model, once per stage), the speed-up of 2 workers over 1 (goal
>= 1.8x), and the orchestration overhead: the share of the stage's wall time that is not
generation, i.e. ``1 - (worker seconds / workers) / wall`` (goal <= 10 %), over the whole stage
and after the actors' start.

Before / after: until issue 10 the stages ran ``MaskGenerator`` with ``pred_iou_thresh=0`` and
filtered its records afterwards (``engine/generate.py``, a workaround for an empty-batch bug
fixed since), so every candidate mask was upsampled; now the generator's own filter runs before
upsampling. Both are timed in-process on the same images, one thread, with the model's ``auto``
preset; they must keep the same masks. Without a shipped model the weights are random and the
thresholds 0 (random weights predict low IoUs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from maskmill.engine.plan import make_plan, model_bytes
from maskmill.engine.ray_pool import init_ray
from maskmill.engine.stages import STAGE_GENERATOR, fully_automatic, stage_generator
from maskmill.engine.training.synthetic import write_coco
from maskmill.model import MaskGenerator, build_model, load_model
from maskmill.storage import Store, import_coco
from maskmill.storage.images import load_image


def generate_all(generator, images, post_filter: float | None = None) -> tuple[float, list]:
    """Seconds and records of ``generator`` over ``images``; ``post_filter``: keep records with
    predicted IoU above it afterwards (the old engine/generate.py way)."""
    started = time.perf_counter()
    out = []
    with torch.inference_mode():
        for image in images:
            records = generator.generate(image)
            if post_filter is not None:
                records = [r for r in records if r["predicted_iou"] > post_filter]
            out.append(records)
    return time.perf_counter() - started, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8, help="generated scenes (default 8)")
    parser.add_argument("--size", type=int, default=256, help="scene side in pixels")
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--checkpoint", help="model file (default: the shipped model)")
    args = parser.parse_args(argv)

    try:
        model, name = load_model(args.checkpoint)
        options: dict = {"points_per_side": args.points_per_side}
    except FileNotFoundError:
        model, name = build_model("tiny", seed=0), "random tiny (no default shipped)"
        options = {
            "points_per_side": args.points_per_side,
            "pred_iou_thresh": 0.0,
            "stability_score_thresh": 0.0,
        }
    generator = stage_generator(model, "auto", options)

    work = Path(tempfile.mkdtemp(prefix="maskmill-bench-engine-"))
    annotations = write_coco(
        work / "scenes", args.images, seed=0, height=args.size, width=args.size, parts=False
    )
    print(
        f"model: {name}; {args.images} scenes {args.size}x{args.size}; "
        f"{args.points_per_side}x{args.points_per_side} points; predicted IoU > "
        f"{generator.pred_iou_thresh}, stability >= {generator.stability_score_thresh}; "
        f"{torch.get_num_threads()} torch threads in-process, 1 per actor"
    )
    images = [
        load_image(str(p), exif_transpose=False)
        for p in sorted((work / "scenes" / "images").iterdir())
    ]

    # In-process, one thread (what one actor does): the generator before and after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    before_options = {**STAGE_GENERATOR, **options, "pred_iou_thresh": 0.0}
    before_options["stability_score_thresh"] = generator.stability_score_thresh
    before = MaskGenerator(model, **before_options)
    before_seconds, before_records = generate_all(before, images, generator.pred_iou_thresh)
    reference, after_records = generate_all(generator, images)
    torch.set_num_threads(threads)
    masks = sum(map(len, after_records))
    same = [len(a) for a in before_records] == [len(a) for a in after_records]
    print(
        f"in-process, before (threshold 0, filter afterwards): {before_seconds:.1f} s; after "
        f"(the generator's own filter): {reference:.1f} s for {len(images)} images, {masks} "
        f"masks ({reference / len(images):.2f} s/image); after / before x"
        f"{reference / before_seconds:.2f}; same masks per image: {same}"
    )

    init_ray(num_cpus=2)
    results = {}
    for workers in (1, 2):
        store = Store(str(work / f"workers-{workers}"))
        import_coco(str(annotations), str(work / "scenes" / "images"), store)
        store.write_model(1, model_bytes(model, model.metadata), {"round": 0, "metrics": {}})
        meta = store.model_metas()[-1]
        plan = make_plan(store, 0, 0, True, seed=0, holdout=0.0)
        t0 = time.perf_counter()
        row = fully_automatic(store, 1, plan, plan.auto, meta, workers, options)
        wall = time.perf_counter() - t0
        metrics = json.loads(row["metrics"])
        results[workers] = (wall, wall - metrics["pool_start_seconds"], metrics["masks"])
        overhead = 1 - (metrics["worker_seconds"] / workers) / wall
        start = metrics["pool_start_seconds"]
        steady = 1 - (metrics["worker_seconds"] / workers) / (wall - start)
        print(
            f"{workers} worker(s): {wall:.1f} s wall, {metrics['worker_seconds']:.1f} s in "
            f"actors, {metrics['masks']} masks; actors started in {start:.1f} s; orchestration "
            f"overhead {overhead:.0%} of the wall time, {steady:.0%} after the start; in-process "
            f"reference / wall x{reference / wall:.2f}"
        )
    speedup = results[1][0] / results[2][0]
    steady_speedup = results[1][1] / results[2][1]
    print(
        f"speed-up 2 workers / 1: x{speedup:.2f} in wall time, x{steady_speedup:.2f} after the "
        "actors' start (goal >= 1.8)"
    )
    if results[1][2] != results[2][2]:
        print(f"warning: mask counts differ: {results[1][2]} vs {results[2][2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
