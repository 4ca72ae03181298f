"""The fully automatic stage on a Ray actor pool: 1 worker against 2 on the same images, and
the orchestration overhead, against the same generator run in-process (the reference) in the
same run.

    python bench/engine.py                       # 8 generated scenes, the shipped model
    python bench/engine.py --images 12 --points-per-side 16 --checkpoint model.pt

Printed per setting: wall time of the stage (actor start, model loads, image reads, shard
writes, finish), the actors' own time on the images and their start-up (a Ray worker process
importing torch and loading the model, once per stage), the speed-up of 2 workers over 1 (goal
>= 1.8x), and the orchestration overhead: the share of the stage's wall time that is not
generation, i.e. ``1 - (worker seconds / workers) / wall`` (goal <= 10 %), over the whole stage
and after the actors' start. Without a shipped
model the weights are random and the thresholds 0 (random weights predict low IoUs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from maskmill.engine.generate import Generator
from maskmill.engine.images import load_image
from maskmill.engine.plan import image_rows, make_plan, model_bytes
from maskmill.engine.ray_pool import init_ray
from maskmill.engine.stages import AUTO_GENERATOR, DEFAULT_MODEL_AUTO, fully_automatic
from maskmill.engine.training.synthetic import write_coco
from maskmill.model import build_model, has_default, load_checkpoint, load_default
from maskmill.storage import Store, import_coco


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8, help="generated scenes (default 8)")
    parser.add_argument("--size", type=int, default=256, help="scene side in pixels")
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--checkpoint", help="model file (default: the shipped model)")
    args = parser.parse_args(argv)

    if args.checkpoint:
        model, name = load_checkpoint(args.checkpoint), args.checkpoint
    elif has_default():
        model, name = load_default(), "shipped default"
    else:
        model, name = build_model("tiny", seed=0), "random tiny (no default shipped)"
    kwargs = {**AUTO_GENERATOR, "points_per_side": args.points_per_side}
    if name == "shipped default":  # the engine's thresholds for the shipped model
        kwargs.update(DEFAULT_MODEL_AUTO)
    if "random" in name:
        kwargs.update(pred_iou_thresh=0.0, stability_score_thresh=0.0)

    work = Path(tempfile.mkdtemp(prefix="maskmill-bench-engine-"))
    annotations = write_coco(
        work / "scenes", args.images, seed=0, height=args.size, width=args.size, parts=False
    )
    print(
        f"model: {name}; {args.images} scenes {args.size}x{args.size}; "
        f"{args.points_per_side}x{args.points_per_side} points; {torch.get_num_threads()} "
        "torch threads in-process, 1 per actor"
    )

    # Reference: the same generator in this process, one thread (what one actor does).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    generator = Generator(model, **kwargs)
    store0 = Store(str(work / "reference"))
    import_coco(str(annotations), str(work / "scenes" / "images"), store0)
    rows = image_rows(store0)
    masks = 0
    generate_started = time.perf_counter()
    with torch.inference_mode():
        for row in rows.values():
            masks += len(generator.generate(load_image(row.uri, exif_transpose=False)))
    reference = time.perf_counter() - generate_started
    torch.set_num_threads(threads)
    print(
        f"in-process reference: {reference:.1f} s for {len(rows)} images, {masks} masks "
        f"({reference / len(rows):.2f} s/image)"
    )

    init_ray(num_cpus=2)
    results = {}
    for workers in (1, 2):
        store = Store(str(work / f"workers-{workers}"))
        import_coco(str(annotations), str(work / "scenes" / "images"), store)
        store.write_model(1, model_bytes(model, {}), {"round": 0, "metrics": {}})
        meta = store.model_metas()[-1]
        plan = make_plan(store, 0, 0, True, seed=0, holdout=0.0)
        t0 = time.perf_counter()
        row = fully_automatic(store, 1, plan, plan.auto, meta, workers, kwargs)
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
