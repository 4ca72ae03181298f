"""``maskmill pretrain`` and ``maskmill eval``: the command-line side of
engine/training/pretrain.py and engine/evaluate.py."""

from __future__ import annotations

import argparse
import json
import shlex

from maskmill.flows.cli_engine import add_encoder_precision_argument
from maskmill.flows.cli_text import add_clip_arguments, load_clip


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_pretrain(subparsers)
    _register_eval(subparsers)
    _register_scenes(subparsers)


# ----------------------------------------------------------------------------------- scenes


def _register_scenes(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "scenes",
        help="write generated photo-like scenes with exact masks as a COCO dataset",
        description=(
            "Write N generated scenes (the pre-training data) as OUT/images/*.png and "
            "OUT/instances.json: whole objects (category 1) and their parts (category 2). "
            "--held-out starts at the seed range pre-training never draws from."
        ),
    )
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--count", type=int, default=20, help="scenes (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first scene")
    parser.add_argument(
        "--held-out", action="store_true", help="offset the seeds past every training scene"
    )
    parser.add_argument("--size", type=int, default=512, help="scene side in pixels (512)")
    parser.add_argument("--no-parts", action="store_true", help="whole objects only")
    parser.add_argument(
        "--kinds",
        action="store_true",
        help="categorise objects by kind (blob, ellipse, rect, polygon, fruit, stack, target, "
        "mug), each painted in its kind's colour: named concepts to learn",
    )
    parser.set_defaults(handler=run_scenes)


def run_scenes(args: argparse.Namespace) -> int:
    from maskmill.engine.training.pretrain import HELD_OUT_SEED
    from maskmill.engine.training.synthetic import write_coco

    if args.count < 1 or args.size < 32:
        raise ValueError("--count must be >= 1 and --size >= 32")
    seed = args.seed + (HELD_OUT_SEED if args.held_out else 0)
    path = write_coco(
        args.out,
        args.count,
        seed=seed,
        height=args.size,
        width=args.size,
        parts=not args.no_parts,
        kinds=args.kinds,
    )
    print(f"wrote {args.count} scenes (seeds {seed}..{seed + args.count - 1}) and {path}")
    return 0


# --------------------------------------------------------------------------------- pretrain


def _register_pretrain(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="train a model by prompt simulation on generated scenes",
        description=(
            "Train a SAM-architecture model (tiny, from scratch, by default) by SAM's prompt "
            "simulation on generated photo-like scenes. Saves a resumable training state and a "
            "float16 checkpoint periodically and at the end."
        ),
    )
    parser.add_argument("--config", default="tiny", help="model config (default: tiny)")
    parser.add_argument("--checkpoint", help="start from these weights instead of random ones")
    parser.add_argument("--resume", help="training-state file to continue from")
    parser.add_argument(
        "--steps",
        type=int,
        help="schedule length in images (default 2000; with --resume: the saved one unless given)",
    )
    parser.add_argument("--minutes", type=float, help="wall-clock budget of this run")
    parser.add_argument(
        "--stop-at", type=int, help="stop after this step (the schedule keeps --steps)"
    )
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    parser.add_argument("--masks-per-image", type=int, default=6)
    parser.add_argument("--point-iterations", type=int, default=8, help="SAM: 8")
    parser.add_argument("--no-point-iterations", type=int, default=2, help="SAM: 2")
    parser.add_argument("--freeze-image-encoder", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and prompt seed")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the first scene")
    parser.add_argument("--state", default="out/pretrain/state.pt", help="training-state file")
    parser.add_argument("--out", default="out/pretrain/model.pt", help="checkpoint to write")
    parser.add_argument("--save-every", type=float, default=5.0, help="minutes between saves")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    import torch

    from maskmill.engine.training.pretrain import TrainConfig, pretrain, save_pretrained

    if args.threads:
        torch.set_num_threads(args.threads)
    command = _command_line(args)
    config = TrainConfig(
        config=args.config,
        init_checkpoint=args.checkpoint,
        steps=args.steps or 2000,
        lr=args.lr,
        warmup=args.warmup,
        masks_per_image=args.masks_per_image,
        freeze_image_encoder=args.freeze_image_encoder,
        seed=args.seed,
        data_seed=args.data_seed,
        point_iterations=args.point_iterations,
        no_point_iterations=args.no_point_iterations,
    )
    model, state = pretrain(
        config,
        resume=args.resume,
        steps=args.steps,
        stop_at=args.stop_at,
        state_path=args.state,
        minutes=args.minutes,
        save_every_minutes=args.save_every,
        on_save=lambda m, s: save_pretrained(m, args.out, s, command),
        progress=not args.no_progress,
    )
    last = state.history[-1] if state.history else {}
    print(
        f"trained {state.step}/{state.config.steps} steps in {state.seconds / 60:.1f} min; "
        f"last loss {last.get('loss', float('nan')):.4f}, first-pass IoU "
        f"{last.get('first_iou', float('nan')):.3f}, last-pass IoU "
        f"{last.get('last_iou', float('nan')):.3f}"
    )
    print(f"wrote {args.out} and training state {args.state}")
    return 0


def _command_line(args: argparse.Namespace) -> str:
    """The pretrain command with every option that shapes the run spelled out, for metadata."""
    words = ["maskmill", "pretrain"]
    for name, value in sorted(vars(args).items()):
        if name in ("handler", "command", "no_progress") or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)


# ------------------------------------------------------------------------------------- eval


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="interactive and automatic segmentation metrics on a COCO dataset",
        description=(
            "1-click mIoU (best of 3 and IoU-head top-1), NoC@85/90, box mIoU, box-prompt "
            "mask AP / AP50 / AP75 overall and per category (ground-truth boxes as the "
            "detector, scored by their predicted IoU; pycocotools segm) and the automatic "
            "generator's AR@100/AR@1000 (pycocotools, class-agnostic) on a COCO dataset."
        ),
    )
    parser.add_argument("--annotations", required=True, help="COCO instances JSON")
    parser.add_argument("--images", required=True, help="folder of the images it names")
    parser.add_argument("--checkpoint", help="model to evaluate (default: the shipped default)")
    parser.add_argument("--max-images", type=int, help="evaluate the first N images only")
    parser.add_argument(
        "--points-per-side", type=int, default=32, help="automatic generator grid (default: 32)"
    )
    parser.add_argument(
        "--concepts",
        action="store_true",
        help="also concept-prompt mask AP / AP50 per category (the model's concept head; "
        "categories matched by name; with --clip-model, every category as a CLIP phrase)",
    )
    add_clip_arguments(parser)
    parser.add_argument(
        "--store",
        help="evaluate this store's model (its concept model); the images' embeddings are "
        "kept in its embedding cache",
    )
    parser.add_argument(
        "--no-embedding-cache",
        dest="embedding_cache",
        action="store_false",
        help="with --store: encode every image instead of using the store's embedding cache",
    )
    add_encoder_precision_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from maskmill.engine.evaluate import evaluate_coco, evaluate_concepts, format_table
    from maskmill.model import load_model

    if args.store and args.checkpoint:
        raise ValueError("give --store or --checkpoint, not both")
    checkpoint = args.checkpoint
    if args.store:
        from maskmill.engine.plan import concept_model, current_model

        if args.concepts:
            checkpoint = concept_model(args.store, clip=bool(args.clip_model))["uri"]
        else:
            checkpoint = current_model(args.store)["uri"]
    model, _ = load_model(checkpoint)
    clip = load_clip(args, device=model.device)
    if clip is not None and not args.concepts:
        raise ValueError("--clip-model is used by --concepts")
    if args.concepts:  # no concept (or text) head: an error before the long part
        from maskmill.model.concepts import require_concept_head, require_text_head

        if clip is not None:
            require_text_head(model, clip)
        else:
            require_concept_head(model)
    # A bad name is refused by evaluate_coco's Predictor, before the long part.
    precision = args.encoder_precision or "fp32"
    cache = None
    if args.store and args.embedding_cache:
        from maskmill.engine.embeddings import open_embedding_cache
        from maskmill.storage import Store

        cache = open_embedding_cache(Store(args.store), model)
    metrics = evaluate_coco(
        model,
        args.annotations,
        args.images,
        max_images=args.max_images,
        points_per_side=args.points_per_side,
        progress=not args.no_progress and not args.json,
        embedding_cache=cache,
        encoder_precision=precision,
    )
    if args.concepts:
        metrics.update(
            evaluate_concepts(
                model,
                args.annotations,
                args.images,
                max_images=args.max_images,
                progress=not args.no_progress and not args.json,
                text_encoder=clip,
                encoder_precision=precision,
            )
        )
    if args.json:
        print(json.dumps(metrics))
    else:
        print(format_table(metrics))
    return 0
