"""``maskmill run``: the data engine as a Prefect flow run, ending with the per-round table."""

from __future__ import annotations

import argparse
import os
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the data engine: annotation rounds, retraining, the automatic pass",
        description=(
            "Run the data engine as a Prefect flow: assisted-manual rounds (retraining after "
            "each), semi-automatic rounds (retraining after each), then one fully automatic "
            "pass over every image, ending with the per-round table. With no arguments: "
            "generated scenes with ground truth, the shipped model, a store in out/engine. "
            "Rerun the same command to resume a killed run. Prefect uses a temporary local "
            "server unless PREFECT_API_URL is set."
        ),
    )
    parser.add_argument("--images", help="image folder or fsspec URL (default: generated scenes)")
    parser.add_argument(
        "--annotations",
        help="COCO instances JSON of --images: ground truth for the simulated annotator and "
        "the held-out evaluation",
    )
    parser.add_argument("--store", help="store URL (default: out/engine/store)")
    parser.add_argument("--checkpoint", help="starting model (default: the shipped model)")
    parser.add_argument(
        "--manual-rounds", type=int, default=2, metavar="N", help="assisted-manual rounds (2)"
    )
    parser.add_argument(
        "--semi-rounds", type=int, default=1, metavar="N", help="semi-automatic rounds (1)"
    )
    parser.add_argument(
        "--no-auto", dest="auto", action="store_false", help="skip the fully automatic pass"
    )
    parser.add_argument("--seed", type=int, default=0, help="same seed, same masks (default 0)")
    parser.add_argument(
        "--workers", type=int, default=2, help="Ray actors / Ray Train workers (default 2)"
    )
    parser.add_argument("--ray-address", help="join this Ray cluster (default: a local one)")
    parser.add_argument(
        "--retrain-steps",
        type=int,
        default=10,
        metavar="N",
        help="optimiser steps per retrain; 0 turns retraining off (default 10)",
    )
    parser.add_argument(
        "--include-auto", action="store_true", help="retrain on automatic masks too"
    )
    parser.add_argument(
        "--holdout", type=float, default=0.25, help="share of ground-truth images held out"
    )
    parser.add_argument(
        "--scenes", type=int, default=14, help="generated scenes without --images (default 14)"
    )
    parser.add_argument(
        "--points-per-side", type=int, default=16, help="generator grid side (default 16)"
    )
    parser.add_argument(
        "--pred-iou-thresh",
        type=float,
        help="generators' predicted-IoU threshold (default: auto 0.88, semi 0.92)",
    )
    parser.add_argument(
        "--stability-score-thresh",
        type=float,
        help="generators' stability threshold (default: auto 0.95, semi 0.97)",
    )
    parser.add_argument(
        "--accept-iou", type=float, default=0.9, help="simulated annotator's acceptance IoU"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_engine)


def run_engine(args: argparse.Namespace) -> int:
    # Prefect's temporary server waits 20 s for itself by default; on a busy 2-core machine it
    # takes longer, so allow 2 minutes unless the user set it.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The temporary server's telemetry heartbeat races the flow's own writes on its SQLite file
    # ("database is locked" tracebacks); it reports nothing a local run needs.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from maskmill.engine.report import format_rounds
    from maskmill.flows.data_engine import data_engine

    if args.images and not args.store:
        print("error: --images needs --store (where its masks go)", file=sys.stderr)
        return 2
    generator_options = {
        name: value
        for name, value in (
            ("pred_iou_thresh", args.pred_iou_thresh),
            ("stability_score_thresh", args.stability_score_thresh),
        )
        if value is not None
    }
    started = time.perf_counter()
    try:
        rows = data_engine(
            store=args.store,
            images=args.images,
            annotations=args.annotations,
            checkpoint=args.checkpoint,
            manual_rounds=args.manual_rounds,
            semi_rounds=args.semi_rounds,
            auto=args.auto,
            seed=args.seed,
            workers=args.workers,
            ray_address=args.ray_address,
            retrain_steps=args.retrain_steps,
            options={
                "include_auto": args.include_auto,
                "holdout": args.holdout,
                "scenes": args.scenes,
                "points_per_side": args.points_per_side,
                "accept_iou": args.accept_iou,
                "generator_options": generator_options,
                "progress": not args.quiet,
            },
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_rounds(rows))
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0
