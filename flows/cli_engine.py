"""``maskmill run``: the data engine as a Prefect flow run, ending with the per-round table."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from maskmill.flows.cli_text import add_clip_arguments

if TYPE_CHECKING:
    from pydantic import ValidationError

# ``maskmill run`` options that are ``EngineSettings`` fields of the same name.
SETTINGS_OPTIONS = (
    "store",
    "images",
    "annotations",
    "checkpoint",
    "manual_rounds",
    "semi_rounds",
    "auto",
    "seed",
    "workers",
    "ray_address",
    "retrain_steps",
    "include_auto",
    "holdout",
    "scenes",
    "points_per_side",
    "accept_iou",
    "embedding_cache",
    "encoder_precision",
    "clip_model",
    "clip_weights",
    "prefill_concepts",
)
# Options that go into ``EngineSettings.generator_options`` (MaskGenerator parameters).
GENERATOR_OPTIONS = ("pred_iou_thresh", "stability_score_thresh")


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
    parser.add_argument("--manual-rounds", type=int, metavar="N", help="assisted-manual rounds (2)")
    parser.add_argument("--semi-rounds", type=int, metavar="N", help="semi-automatic rounds (1)")
    parser.add_argument(
        "--no-auto",
        dest="auto",
        action="store_false",
        default=None,
        help="skip the fully automatic pass",
    )
    parser.add_argument("--seed", type=int, help="same seed, same masks (default 0)")
    parser.add_argument("--workers", type=int, help="Ray actors / Ray Train workers (default 2)")
    parser.add_argument("--ray-address", help="join this Ray cluster (default: a local one)")
    parser.add_argument(
        "--retrain-steps",
        type=int,
        metavar="N",
        help="optimiser steps per retrain; 0 turns retraining off (default: from the round's "
        "new masks, 10 to 200)",
    )
    parser.add_argument(
        "--include-auto", action="store_true", default=None, help="retrain on automatic masks too"
    )
    parser.add_argument(
        "--holdout", type=float, help="share of ground-truth images held out (default 0.25)"
    )
    parser.add_argument("--scenes", type=int, help="generated scenes without --images (default 14)")
    parser.add_argument("--points-per-side", type=int, help="generator grid side (default 16)")
    # The defaults named here are the shipped model's and SAM's presets
    # (tests/test_cli_errors.py checks them against the model's metadata and SAM_PRESETS).
    parser.add_argument(
        "--pred-iou-thresh",
        type=float,
        help="keep generated masks whose predicted IoU is at least this, in the semi-automatic "
        "pre-fill and the automatic pass alike (default: the presets stored with each round's "
        "model: the shipped model's 0.3 automatic / 0.4 pre-fill, an official SAM file's "
        "0.88 / 0.92; re-calibrated at each retrain)",
    )
    parser.add_argument(
        "--stability-score-thresh",
        type=float,
        help="keep generated masks whose stability score is at least this, in the pre-fill and "
        "the automatic pass alike (default: the presets stored with each round's model: the "
        "shipped model's 0.6 automatic / 0.7 pre-fill, an official SAM file's 0.95 / 0.97)",
    )
    parser.add_argument(
        "--accept-iou", type=float, help="simulated annotator's acceptance IoU (default 0.9)"
    )
    parser.add_argument(
        "--no-embedding-cache",
        dest="embedding_cache",
        action="store_false",
        default=None,
        help="encode every image in every stage instead of keeping its embedding in the store "
        "(default: kept, float16, per image encoder; `maskmill stats` shows its size)",
    )
    add_encoder_precision_argument(parser)
    parser.add_argument(
        "--prefill-concept",
        dest="prefill_concepts",
        action="append",
        metavar="NAME",
        help="semi stage: pre-fill every instance of this concept (repeatable; the model's "
        "concept head, learned from the store's categories) instead of the generator's "
        "confident masks, so a team labels one category at a time",
    )
    add_clip_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_engine)


def add_encoder_precision_argument(parser: argparse.ArgumentParser) -> None:
    """``--encoder-precision`` (fp32, bf16, fp16: checked by ``maskmill.model``'s
    ``EncoderPrecision``, the one list, when the command runs)."""
    parser.add_argument(
        "--encoder-precision",
        metavar="{fp32,bf16,fp16}",
        help="what the image encoder, most of the cost, computes in: fp32 (default), or bf16 / "
        "fp16 under torch.autocast for GPUs (masks at IoU >= 0.98 with fp32; their embeddings "
        "are cached apart)",
    )


def run_engine(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from maskmill.engine.run import EngineSettings
    from maskmill.storage import Store

    if args.images and not args.store:
        raise ValueError("--images needs --store (where its masks go)")
    try:
        settings = EngineSettings.model_validate(settings_values(args))
    except ValidationError as error:
        for line in validation_lines(error):
            print(line, file=sys.stderr)
        return 2
    Store(settings.store).require(create=True)  # before Prefect and Ray start
    # Prefect's temporary server waits 20 s for itself by default; on a busy 2-core machine it
    # takes longer, so allow 2 minutes unless the user set it.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The temporary server's telemetry heartbeat races the flow's own writes on its SQLite file
    # ("database is locked" tracebacks); it reports nothing a local run needs.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from maskmill.engine.report import auto_stage_warning, format_rounds
    from maskmill.flows.data_engine import data_engine
    from maskmill.flows.processes import start_prefect_server, stop_on_sigterm

    started = time.perf_counter()
    with stop_on_sigterm("run"):
        start_prefect_server()  # unless PREFECT_API_URL is set: one that dies with this process
        rows = data_engine(settings)
    print(format_rounds(rows))
    warning = auto_stage_warning(rows)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


def settings_values(args: argparse.Namespace) -> dict[str, Any]:
    """The ``EngineSettings`` fields the command line sets; an option not given (None) is left
    out, so the settings' own default applies (the one place defaults live)."""
    values = {name: getattr(args, name) for name in SETTINGS_OPTIONS}
    values["generator_options"] = {
        name: getattr(args, name) for name in GENERATOR_OPTIONS if getattr(args, name) is not None
    } or None
    values["progress"] = False if args.quiet else None
    return {name: value for name, value in values.items() if value is not None}


def validation_lines(error: ValidationError) -> list[str]:
    """One ``maskmill run: <field>: <message>`` line per problem of invalid settings (no field
    for a rule between fields, whose message names them)."""
    lines = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"])
        lines.append(f"maskmill run: {field + ': ' if field else ''}{problem['msg']}")
    return lines
