"""What the engine costs as it scales, one section per question; each prints figures against a
reference measured in the same run.

    python bench/scale.py                          # every section, defaults
    python bench/scale.py --sections cache --images 4 --size 1024 --points-per-side 4

Sections:

``cache`` (the embedding cache, ``engine.embeddings``): the fully automatic stage over the same
images twice in one store: round 1 with a ``vit_b`` model of random weights (cold cache: every
image encoded and its float16 embedding written), then round 2 with a copy of that model whose
mask decoder changed, as a retrain with the encoder frozen leaves it (same encoder digest, so
every embedding is read back). Printed: both stages' wall times (actor start and model load
included, Ray's own start not), the actors' time on the images, the ratio second / first (goal
<= 0.2), the cache's entries and bytes, and whether round 2 wrote no entry (all hits).
Generated scenes (``engine.training.synthetic.write_coco``) at ``--size`` px longest side
(4:3); the generator grid is small (``--points-per-side``), as the cost to save is the encoder's.

Other sections are added as ``def bench_<name>(args) -> dict`` and listed in :data:`SECTIONS`.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from maskmill.engine.plan import make_plan, model_bytes
from maskmill.engine.ray_pool import init_ray
from maskmill.engine.stages import fully_automatic
from maskmill.engine.training.synthetic import write_coco
from maskmill.model import build_model
from maskmill.model.sam import encoder_digest
from maskmill.storage import Store, cache_size, import_coco

CACHE_GOAL = 0.2  # second stage / first stage, at most


def bench_cache(args: argparse.Namespace) -> dict[str, Any]:
    """The ``cache`` section (module doc): two automatic stages, cold then warm cache."""
    options = {
        "points_per_side": args.points_per_side,
        # Random weights predict low IoUs: keep every mask so the decoder does real work.
        "pred_iou_thresh": 0.0,
        "stability_score_thresh": 0.0,
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        height = args.size * 3 // 4
        annotations = write_coco(
            work / "scenes", args.images, seed=args.seed, height=height, width=args.size
        )
        store = Store(str(work / "store"))
        import_coco(str(annotations), str(work / "scenes" / "images"), store)
        plan = make_plan(store, 0, 0, True, seed=args.seed, holdout=0.0)

        model = build_model(args.model, seed=args.seed)
        # The frozen-encoder retrain: only the mask decoder's weights move.
        retrained = copy.deepcopy(model)
        with torch.no_grad():
            for parameter in retrained.mask_decoder.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
        assert encoder_digest(retrained) == encoder_digest(model)
        store.write_model(1, model_bytes(model, {}), {"round": 0, "metrics": {}})
        store.write_model(2, model_bytes(retrained, {}), {"round": 1, "metrics": {}})
        metas = store.model_metas()

        init_ray(num_cpus=args.workers)
        timings = []
        for round_, meta in ((1, metas[0]), (2, metas[1])):
            before = cache_size(store)
            started = time.perf_counter()
            row = fully_automatic(store, round_, plan, plan.auto, meta, args.workers, options)
            wall = time.perf_counter() - started
            metrics = _metrics(row)
            after = cache_size(store)
            timings.append(
                {
                    "wall_s": wall,
                    "worker_s": metrics["worker_seconds"],
                    "pool_start_s": metrics["pool_start_seconds"],
                    "masks": row["masks"],
                    "entries_written": after.entries - before.entries,
                }
            )
        size = cache_size(store)
    first, second = timings
    return {
        "model": args.model,
        "images": args.images,
        "size": f"{args.size}x{height}",
        "first_wall_s": first["wall_s"],
        "second_wall_s": second["wall_s"],
        "ratio_wall": second["wall_s"] / first["wall_s"],
        "first_worker_s": first["worker_s"],
        "second_worker_s": second["worker_s"],
        "ratio_worker": second["worker_s"] / first["worker_s"],
        "pool_start_s": f"{first['pool_start_s']:.1f} / {second['pool_start_s']:.1f}",
        "masks": f"{first['masks']} / {second['masks']}",
        "cache_entries": size.entries,
        "cache_mb": size.bytes / 2**20,
        "second_all_hits": second["entries_written"] == 0,
        "goal": f"ratio_wall <= {CACHE_GOAL}",
        "goal_met": second["wall_s"] / first["wall_s"] <= CACHE_GOAL,
    }


def _metrics(row: dict[str, Any]) -> dict[str, Any]:
    import json

    metrics = row["metrics"]
    return json.loads(metrics) if isinstance(metrics, str) else dict(metrics or {})


SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {"cache": bench_cache}


def format_table(section: str, figures: dict[str, Any]) -> str:
    """A section's figures as an aligned two-column table."""
    width = max(len(name) for name in figures)
    lines = [f"[{section}]"]
    for name, value in figures.items():
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"  {name:<{width}}  {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=sorted(SECTIONS),
        default=sorted(SECTIONS),
        help="sections to run (default: all)",
    )
    parser.add_argument("--images", type=int, default=4, help="generated scenes (default 4)")
    parser.add_argument(
        "--size", type=int, default=1024, help="longest side of the scenes, px (default 1024)"
    )
    parser.add_argument(
        "--model", default="vit_b", help="config of the random-weight model (default vit_b)"
    )
    parser.add_argument(
        "--points-per-side", type=int, default=4, help="generator grid side (default 4)"
    )
    parser.add_argument("--workers", type=int, default=1, help="Ray actors (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    failed = False
    for section in args.sections:
        figures = SECTIONS[section](args)
        print(format_table(section, figures), flush=True)
        failed |= figures.get("goal_met") is False
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
