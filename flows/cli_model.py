"""``maskmill segment``: one prompt on one image, the mask written as a PNG overlay."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment an image from point / box prompts and write the masks as a PNG overlay",
        description=(
            "Segment an image from point and box prompts. With no arguments: a generated "
            "photo-like image, a click at its centre, the shipped default model."
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

    # The image first: a bad file is refused before the model is loaded.
    image = load_image(args.image) if args.image else photo_like(480, 640, seed=args.seed)
    if args.checkpoint or has_default():
        model, model_name = load_model(args.checkpoint)
    else:
        model, model_name = build_model(args.config, seed=0), f"random-weight {args.config}"
        print(
            f"warning: no default model is shipped in this build; using {model_name} "
            "(masks are meaningless; pass --checkpoint)",
            file=sys.stderr,
        )
    height, width = image.shape[:2]
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
