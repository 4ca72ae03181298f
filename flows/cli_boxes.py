"""``maskmill prompt-boxes``: a detector's boxes -> instance masks (engine/boxes.py)."""

from __future__ import annotations

import argparse
import json
import shlex

from maskmill.flows.cli_engine import add_encoder_precision_argument

# Failure rows printed (the rest are in the store's failures table).
SHOWN_FAILURES = 5


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prompt-boxes",
        help="prompt the model with a detector's boxes: one mask per detection (stage boxes)",
        description=(
            "Read a COCO results file of detections (a JSON list of {image_id or file_name, "
            "bbox [x, y, w, h] pixels, category_id, score, optional category_name}), prompt "
            "the model with each box and store one mask per detection as stage 'boxes', with "
            "the detection's category and score. Bad rows (unknown image or category, a box "
            "that is not finite, has no area or lies wholly outside its image, a missing "
            "field) go to the failures table; boxes reaching past the image are clipped. "
            "Rerun the same command to resume: images done are skipped."
        ),
    )
    parser.add_argument("--detections", required=True, help="COCO results JSON (any fsspec URL)")
    parser.add_argument("--store", required=True, help="the store (it must exist)")
    parser.add_argument(
        "--annotations",
        help="the COCO file whose integer image ids the detections use (the imported instances "
        "file, or a maskmill export); not needed when they name images by file_name",
    )
    parser.add_argument(
        "--round",
        type=int,
        help="round to write (default: that of an earlier run of the same detections, else a "
        "new one after every round of the store)",
    )
    parser.add_argument(
        "--checkpoint",
        help="model (default: the store's newest model, else the shipped default)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="Ray actors (default 1: no Ray, one model here)"
    )
    parser.add_argument("--ray-address", help="join this Ray cluster (default: a local one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-embedding-cache",
        dest="embedding_cache",
        action="store_false",
        help="encode every image instead of reading its embedding from the store's embedding "
        "cache (and writing it there)",
    )
    add_encoder_precision_argument(parser)
    parser.set_defaults(handler=run_prompt_boxes)


def run_prompt_boxes(args: argparse.Namespace) -> int:
    from maskmill.engine.boxes import prompt_boxes
    from maskmill.storage import Store

    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.round is not None and args.round < 1:
        raise ValueError(f"--round must be at least 1 (round 0 is ground truth), got {args.round}")
    store = Store(args.store).require()
    use_ray = args.workers > 1 or bool(args.ray_address)
    if use_ray:
        from maskmill.engine.ray_pool import init_ray

        init_ray(args.ray_address)
    row = prompt_boxes(
        store,
        args.detections,
        round_=args.round,
        checkpoint=args.checkpoint,
        workers=args.workers,
        progress=not args.no_progress,
        annotations=args.annotations,
        use_ray=use_ray,
        embedding_cache=args.embedding_cache,
        encoder_precision=args.encoder_precision or "fp32",
    )
    metrics = json.loads(row["metrics"] or "{}")
    clipped = metrics.get("boxes_clipped", 0)
    print(
        f"stored {row['masks']} masks of {row['images']} images in round {row['round']} "
        f"(stage boxes) of {args.store}; {metrics.get('detections', 0)} detections, "
        f"{clipped} box(es) clipped to their image"
    )
    errors = row["errors"]
    if errors:
        print(f"{len(errors)} failure(s):")
        for error in errors[:SHOWN_FAILURES]:
            print(f"  {error}")
        if len(errors) > SHOWN_FAILURES:
            sql = f"SELECT error FROM failures WHERE round = {row['round']} AND stage = 'boxes'"
            print(
                f"  ... and {len(errors) - SHOWN_FAILURES} more: maskmill query --store "
                f"{shlex.quote(args.store)} {shlex.quote(sql)}"
            )
    return 0
