"""Does the data-engine loop learn? One `maskmill run` on a domain, then the issue's yardsticks
measured on its store, with the learning curves drawn.

    # fruit photos (real, not tuned on): 3 manual rounds, 1 semi round, the automatic pass
    python bench/loop.py --images ../shared/data/fruits_nuts/images \\
        --annotations ../shared/data/fruits_nuts/trainval.json --store out/loop/fruits
    # a second domain of our own making: fluorescence-like nuclei (bench/cells.py)
    python bench/loop.py --domain cells --store out/loop/cells

Printed: the rounds table (cost per mask, model IoU before correction, held-out quality of the
model each round used and produced), then each yardstick with its value and goal:

- coverage: the share of ground-truth objects of >= 64 px on the annotated images (manual and
  semi rounds) that have a mask of those rounds matching them at IoU >= 0.5 (and >= 0.9);
  goal >= 95 %;
- seconds per mask in the last manual round / in the first; goal <= 0.75;
- the last model's held-out 1-click mIoU minus the starting model's; goal >= +0.08;
- semi-round masks per image / manual-round masks per image; goal >= 1;
- and, with no goal, the same annotator's seconds per mask on the held-out images with the last
  model / with the first: the model's part of the cost, free of the rounds' different images.

The reference for every ratio is measured in the same run (round 1, model v1).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from maskmill.engine.annotators import SimulatedAnnotator
from maskmill.engine.plan import heldout_samples, make_plan, model_for_round
from maskmill.engine.report import format_rounds, rounds_table
from maskmill.model import Predictor, load_checkpoint
from maskmill.storage import Catalog, Store, rle
from maskmill.storage.plots import plot_learning_curves
from maskmill.storage.queries import existing_masks, ground_truth, images_done, learning_curves

MIN_OBJECT_AREA = 64


def coverage(store: Store, rows: list[dict]) -> dict[str, float]:
    """Share of ground-truth objects (>= 64 px) of the annotated images with a matching mask."""
    annotated = [r for r in rows if r["stage"] in ("manual", "semi")]
    if not annotated:
        return {}
    images = sorted({i for r in annotated for i in images_done(store, r["round"], r["stage"])})
    last = max(r["round"] for r in annotated)
    drawn = existing_masks(store, images, last + 1)
    truth = ground_truth(store)
    best = []
    for image_id in images:
        objects = truth.get(image_id, [])
        objects = [
            o for o, a in zip(objects, rle.areas(objects), strict=True) if a >= MIN_OBJECT_AREA
        ]
        if not objects:
            continue
        masks = drawn.get(image_id, [])
        if not masks:
            best += [0.0] * len(objects)
            continue
        ious = rle.ious(masks, objects)
        best += list(ious.max(axis=0))
    best_array = np.asarray(best)
    return {
        "objects": len(best),
        "covered_50": float((best_array >= 0.5).mean()) if len(best) else 0.0,
        "covered_90": float((best_array >= 0.9).mean()) if len(best) else 0.0,
    }


def heldout_seconds(store: Store, manual_rounds: int, semi_rounds: int) -> dict[str, float]:
    """Seconds per mask of the engine's simulated annotator (default settings) drawing every
    object of the held-out images from scratch, with the first model and with the one the
    engine would use next: the same images and objects for both."""
    metas = store.model_metas()
    if not metas:
        return {}
    plan = make_plan(store, manual_rounds, semi_rounds)
    samples = list(heldout_samples(store, plan))
    newest = model_for_round(store, max(int(m.get("round") or 0) for m in metas) + 1)
    out: dict[str, float] = {}
    for name, meta in (("first", metas[0]), ("last", newest)):
        predictor = Predictor(load_checkpoint(meta["uri"]))
        seconds, masks = 0.0, 0
        for index, (image, objects) in enumerate(samples):
            annotator = SimulatedAnnotator(lambda _id, objects=objects: objects)
            with torch.inference_mode():
                predictor.set_image(image)
                drawn = annotator.annotate(str(index), image, predictor, []).masks
            seconds += sum(mask.seconds for mask in drawn)
            masks += len(drawn)
        if masks:
            out[f"heldout_seconds_{name}"] = seconds / masks
    if len(out) == 2:
        out["heldout_seconds_ratio"] = out["heldout_seconds_last"] / out["heldout_seconds_first"]
    return out


def yardsticks(store: Store) -> dict[str, float | None]:
    rows = learning_curves(store)
    manual = [r for r in rows if r["stage"] == "manual"]
    semi = [r for r in rows if r["stage"] == "semi"]
    metas = store.model_metas()
    first = (metas[0].get("metrics") or {}).get("heldout_miou") if metas else None
    # The model the engine would use next: the newest promoted version (the stages' choice).
    last = None
    if metas:
        newest = model_for_round(store, max(int(m.get("round") or 0) for m in metas) + 1)
        last = (newest.get("metrics") or {}).get("heldout_miou")
    out: dict[str, float | None] = dict(coverage(store, rows))
    if len(manual) >= 2 and manual[0]["seconds_per_mask"]:
        out["seconds_ratio"] = manual[-1]["seconds_per_mask"] / manual[0]["seconds_per_mask"]
    out["miou_first"], out["miou_last"] = first, last
    if first is not None and last is not None:
        out["miou_gain"] = last - first
    manual_mpi = [r["masks_per_image"] for r in manual if r["masks_per_image"] is not None]
    semi_mpi = [r["masks_per_image"] for r in semi if r["masks_per_image"] is not None]
    if manual_mpi and semi_mpi:
        out["semi_over_manual"] = float(np.mean(semi_mpi) / max(np.mean(manual_mpi), 1e-9))
    return out


GOALS = [
    ("covered_50", "objects >= 64 px with a mask (IoU >= 0.5)", ">=", 0.95, "{:.1%}"),
    ("covered_90", "... with a mask at IoU >= 0.9", None, None, "{:.1%}"),
    ("seconds_ratio", "seconds per mask, last manual round / first", "<=", 0.75, "{:.2f}"),
    ("miou_gain", "held-out 1-click mIoU, last model - first", ">=", 0.08, "{:+.3f}"),
    ("semi_over_manual", "masks per image, semi / manual", ">=", 1.0, "{:.2f}"),
    ("heldout_seconds_first", "held-out seconds per mask, first model", None, None, "{:.1f}"),
    ("heldout_seconds_last", "held-out seconds per mask, last model", None, None, "{:.1f}"),
    ("heldout_seconds_ratio", "... last / first (same images)", None, None, "{:.2f}"),
]


def report(values: dict[str, float | None]) -> str:
    lines = []
    for key, title, op, goal, fmt in GOALS:
        value = values.get(key)
        shown = "-" if value is None else fmt.format(value)
        verdict = ""
        if op and value is not None:
            ok = value >= goal if op == ">=" else value <= goal
            verdict = f"goal {op} {fmt.format(goal)}: {'met' if ok else 'NOT met'}"
        lines.append(f"{title:48s} {shown:>8s}   {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", help="image folder (with --annotations)")
    parser.add_argument("--annotations", help="COCO instances JSON of --images")
    parser.add_argument("--domain", choices=("cells",), help="generate a domain instead")
    parser.add_argument("--count", type=int, default=18, help="images of a generated domain")
    parser.add_argument("--store", required=True, help="store of the run (reused: resumes)")
    parser.add_argument("--manual-rounds", type=int, default=3)
    parser.add_argument("--semi-rounds", type=int, default=1)
    parser.add_argument("run_args", nargs="*", help="more `maskmill run` options, after --")
    args = parser.parse_args(argv)
    if args.domain == "cells":
        from cells import write_cells

        folder = Path(args.store).parent / "cells-data"
        annotations = folder / "instances.json"
        if not annotations.exists():
            write_cells(folder, args.count, seed=1000)
        images, annotations = str(folder / "images"), str(annotations)
    elif args.images and args.annotations:
        images, annotations = args.images, args.annotations
    else:
        parser.error("give --images and --annotations, or --domain")
    command = [
        sys.executable,
        "-m",
        "maskmill.flows.cli",
        "run",
        "--images",
        images,
        "--annotations",
        annotations,
        "--store",
        args.store,
        "--manual-rounds",
        str(args.manual_rounds),
        "--semi-rounds",
        str(args.semi_rounds),
        *args.run_args,
    ]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    if subprocess.run(command).returncode != 0:
        return 1
    print(f"run: {time.perf_counter() - started:.0f} s")
    store = Store(args.store)
    print(format_rounds(rounds_table(store)))
    values = yardsticks(store)
    values.update(heldout_seconds(store, args.manual_rounds, args.semi_rounds))
    print(report(values))
    with Catalog(store) as catalog:
        print("learning curves:", plot_learning_curves(catalog, str(Path(args.store).parent)))
    print(json.dumps(values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
