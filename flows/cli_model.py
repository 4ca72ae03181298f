"""``maskmill segment``: one prompt on one image (points, a box, or a concept's name), the masks
written as a PNG overlay."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from maskmill.flows.cli_text import add_clip_arguments, load_clip


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment an image from point / box / text prompts and write a PNG overlay",
        description=(
            "Segment an image from point and box prompts, or find every instance of a concept "
            "with --text (a category the model's concept head learned from a store, or any "
            "phrase with --clip-model, through text prompts trained by fit-text). With no "
            "arguments: a generated photo-like image, a click at its centre, the shipped "
            "default model."
        ),
    )
    parser.add_argument("--image", help="image path or fsspec URL (default: a generated scene)")
    parser.add_argument(
        "--point",
        nargs=2,
        type=float,
        action="append",
        metavar=("X", "Y"),
        help="foreground click in pixels (repeatable; default: the image centre)",
    )
    parser.add_argument(
        "--background-point",
        nargs=2,
        type=float,
        action="append",
        metavar=("X", "Y"),
        help="background click in pixels (repeatable)",
    )
    parser.add_argument(
        "--box",
        nargs=4,
        type=float,
        metavar=("X0", "Y0", "X1", "Y1"),
        help="box prompt, XYXY pixels",
    )
    parser.add_argument(
        "--text",
        action="append",
        metavar="CONCEPT",
        help="find every instance of this concept (repeatable); needs a model with a concept "
        "head: --store (its current model) or --checkpoint",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        help="lowest concept score reported with --text (default: the concept head's own)",
    )
    add_clip_arguments(parser)
    parser.add_argument("--store", help="use this store's current model (newest promoted)")
    parser.add_argument("--checkpoint", help="official SAM .pth or maskmill checkpoint (path/URL)")
    parser.add_argument(
        "--config",
        default="tiny",
        help="config for random weights when no model is shipped (default: tiny)",
    )
    parser.add_argument(
        "--single-mask",
        action="store_true",
        help="one mask instead of the three ambiguity-aware ones",
    )
    parser.add_argument("--out", default="out/segment.png", help="overlay PNG to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated image")
    parser.set_defaults(handler=run_segment)


def run_segment(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from maskmill.engine.overlay import render_overlay
    from maskmill.engine.training.synthetic import photo_like
    from maskmill.model import Predictor, build_model, has_default, load_model
    from maskmill.storage.images import load_image

    if args.store and args.checkpoint:
        raise ValueError("give --store or --checkpoint, not both")
    if args.text and (args.point or args.background_point or args.box):
        raise ValueError("--text finds instances by itself: it takes no --point or --box")
    # The image first: a bad file is refused before the model is loaded.
    image = load_image(args.image) if args.image else photo_like(480, 640, seed=args.seed)
    if args.store:
        from maskmill.engine.plan import concept_model, current_model

        if args.text:
            meta = concept_model(args.store, clip=bool(args.clip_model))
        else:
            meta = current_model(args.store)
        model, model_name = load_model(meta["uri"])
        model_name = f"{args.store} v{meta['version']}"
    elif args.checkpoint or has_default():
        model, model_name = load_model(args.checkpoint)
    else:
        model, model_name = build_model(args.config, seed=0), f"random-weight {args.config}"
        print(
            f"warning: no default model is shipped in this build; using {model_name} "
            "(masks are meaningless; pass --checkpoint)",
            file=sys.stderr,
        )
    height, width = image.shape[:2]
    if args.text:
        return _segment_concepts(args, image, model, model_name)
    points = [(x, y, 1) for x, y in args.point or []]
    points += [(x, y, 0) for x, y in args.background_point or []]
    if not points and args.box is None:
        points = [(width / 2, height / 2, 1)]
    coords = np.array([p[:2] for p in points], dtype=np.float32) if points else None
    labels = np.array([p[2] for p in points]) if points else None
    box = np.array(args.box, dtype=np.float32) if args.box else None

    predictor = Predictor(model)
    with torch.inference_mode():
        predictor.set_image(image)
        masks, scores, _ = predictor.predict(
            coords, labels, box, multimask_output=not args.single_mask
        )
    order = np.argsort(-scores)
    panels = [
        render_overlay(
            image,
            masks[i],
            coords,
            labels,
            box,
            colour_index=rank,
            title=f"mask {i}: predicted IoU {scores[i]:.3f}",
        )
        for rank, i in enumerate(order)
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(panels, axis=1)).save(out)
    print(f"model: {model_name} ({model.config.name})")
    print(f"image: {args.image or 'generated scene'} ({width}x{height})")
    for i in order:
        print(f"mask {i}: predicted IoU {scores[i]:.3f}, area {int(masks[i].sum())} px")
    print(f"wrote {out} (masks left to right by predicted IoU)")
    return 0


def _segment_concepts(args: argparse.Namespace, image: np.ndarray, model, model_name: str) -> int:
    """``segment --text``: every instance of the concepts, drawn on one panel."""
    import torch
    from PIL import Image

    from maskmill.engine.overlay import render_overlay
    from maskmill.model import Predictor
    from maskmill.model.concepts import require_concept_head, require_text_head

    clip = load_clip(args, device=model.device)
    if clip is not None:  # any phrase, through the model's CLIP text prompts
        require_text_head(model, clip)
        vocabulary = f"CLIP {clip.name}"
    else:
        head = require_concept_head(model)
        for name in args.text:
            head.index(name)  # an unknown concept is an error before any work
        vocabulary = f"concepts: {', '.join(head.names)}"
    predictor = Predictor(model)
    with torch.inference_mode():
        predictor.set_image(image)
        found = predictor.predict_concept(args.text, threshold=args.threshold, text_encoder=clip)
    from pycocotools import mask as mask_utils

    panel = image
    for rank, record in enumerate(found):
        mask = mask_utils.decode(record["segmentation"]).astype(bool)
        panel = render_overlay(panel, mask, colour_index=rank)
    title = f"{', '.join(args.text)}: {len(found)} found"
    panel = render_overlay(panel, np.zeros(image.shape[:2], bool), title=title)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(panel).save(out)
    height, width = image.shape[:2]
    print(f"model: {model_name} ({model.config.name}; {vocabulary})")
    print(f"image: {args.image or 'generated scene'} ({width}x{height})")
    for record in found:
        x, y, w, h = record["bbox"]
        print(
            f"{record['category']}: score {record['score']:.3f}, area {record['area']} px, "
            f"box XYWH {x:.0f} {y:.0f} {w:.0f} {h:.0f}"
        )
    print(f"{len(found)} instances; wrote {out}")
    return 0
