"""``maskmill fit-text``: train a model's CLIP text prompts on a store's masks, with CLIP weights
the user has (engine/training/text_prompts.py); and the ``--clip-model`` / ``--clip-weights``
options the commands that take text share."""

from __future__ import annotations

import argparse
import sys


def add_clip_arguments(parser: argparse.ArgumentParser) -> None:
    """``--clip-model`` and ``--clip-weights`` (never downloaded)."""
    parser.add_argument(
        "--clip-model",
        metavar="NAME",
        help="open_clip model for free-text prompts (pip install 'maskmill[clip]'): a name "
        "such as ViT-B-32 with --clip-weights, or local-dir:/folder holding "
        "open_clip_config.json and its weights (e.g. a huggingface-cli download); the model "
        "must have been trained with it (maskmill fit-text)",
    )
    parser.add_argument(
        "--clip-weights", metavar="FILE", help="weights file of a named --clip-model"
    )


def load_clip(args: argparse.Namespace, device: object = "cpu"):
    """The ``ClipEncoder`` the arguments name, or None when ``--clip-model`` is not given."""
    if not args.clip_model:
        if args.clip_weights:
            raise ValueError("--clip-weights needs --clip-model")
        return None
    from maskmill.model.text_encoder import ClipEncoder

    return ClipEncoder.load(args.clip_model, args.clip_weights, device=device)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fit-text",
        help="train a model's CLIP text prompts on a store's masks",
        description=(
            "Train the text prompts of a model (its text head; the model's own weights do not "
            "change) on a store's masks, as the SAM paper did: CLIP image embeddings of the "
            "masks' crops during training, CLIP text embeddings of phrases at inference. "
            "Writes a checkpoint that `maskmill segment --text ... --clip-model ...` and "
            "`maskmill eval --concepts --clip-model ...` use."
        ),
    )
    parser.add_argument("--store", required=True, help="store whose masks to learn from")
    parser.add_argument(
        "--checkpoint",
        help="model to add text prompts to (default: the store's current model, or the "
        "shipped one when the store has none)",
    )
    add_clip_arguments(parser)
    parser.add_argument("--out", required=True, help="checkpoint to write (path or fsspec URL)")
    parser.add_argument(
        "--stages",
        default="gt,manual,semi",
        help="mask stages to learn from, comma-separated (default: gt,manual,semi)",
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument(
        "--max-images", type=int, default=64, help="images used at most (default 64)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_fit_text)


def run_fit_text(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from maskmill.engine.plan import current_model
    from maskmill.engine.training.retrain import RetrainConfig, fit_text_prompts
    from maskmill.engine.training.text_prompts import TextPromptTrainingConfig
    from maskmill.model import load_model
    from maskmill.model.checkpoint import save_checkpoint
    from maskmill.storage import Store
    from maskmill.storage.queries import training_set

    if not args.clip_model:
        raise ValueError("fit-text needs --clip-model (and --clip-weights for a named model)")
    config = TextPromptTrainingConfig(steps=args.steps, max_images=args.max_images, seed=args.seed)
    store = Store(args.store).require()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    checkpoint = args.checkpoint
    if checkpoint is None and store.model_metas():
        checkpoint = current_model(store)["uri"]
    model, model_name = load_model(checkpoint)  # None: the shipped default
    clip = load_clip(args, device=model.device)
    samples = training_set(store, stages, 1 << 30)
    if not any(s["masks"] for s in samples):
        raise ValueError(f"{args.store}: no masks of stages {', '.join(stages)} to learn from")
    with tqdm(unit="img", disable=args.no_progress) as bar:

        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        figures = fit_text_prompts(
            model, samples, RetrainConfig(seed=args.seed), config, clip=clip, progress=advance
        )
    if not figures:
        raise ValueError(
            f"{args.store}: no mask at least {config.min_side} px on a side to learn text "
            "prompts from"
        )
    metadata = dict(getattr(model, "metadata", {}) or {})
    metadata["text_prompts"] = {"clip": clip.name, **figures}
    save_checkpoint(model, args.out, metadata=metadata)
    print(f"model: {model_name}; CLIP: {clip.name}", file=sys.stderr)
    masks = figures["text_masks"]
    print(
        f"learned text prompts from {masks} masks on {figures['text_images']} images "
        f"({figures['text_examples'] - masks} background candidates); loss "
        f"{figures['text_loss_first']:.3f} -> {figures['text_loss_last']:.3f}"
    )
    print(f"wrote {args.out}")
    return 0
