"""Fine-tune a model on part of a COCO dataset and evaluate it against the model it started from
on the rest, in one run.

    python bench/finetune.py --annotations ../shared/data/fruits_nuts/trainval.json \
        --images ../shared/data/fruits_nuts/images --train-images 12 --steps 200

The first ``--train-images`` images of the file (in file order) are imported into a fresh store
as ground truth; the engine's retrain (``engine.training.retrain.retrain``: Ray Train
``TorchTrainer``, prompt simulation, SAM's losses) trains the starting model on them; both
models are then evaluated with ``maskmill eval``'s metrics on the other images.
Prints the two rows and the change.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from maskmill.engine.evaluate import evaluate_coco
from maskmill.engine.plan import ensure_initial_model, make_plan
from maskmill.engine.ray_pool import init_ray
from maskmill.engine.training.retrain import RetrainConfig, retrain
from maskmill.model import load_checkpoint, load_model
from maskmill.storage import Store, import_coco

KEYS = (
    "one_click_miou_best",
    "one_click_miou_top1",
    "noc85",
    "noc90",
    "box_miou",
    "box_prompt_ap",
    "ar100",
)


def split_coco(annotations: str, train_images: int, folder: str) -> tuple[str, str]:
    """Write the first ``train_images`` images (file order) and the rest as two COCO files."""
    with open(annotations) as f:
        data = json.load(f)
    if not 0 < train_images < len(data["images"]):
        raise SystemExit(
            f"--train-images must be between 1 and {len(data['images']) - 1}, got {train_images}"
        )
    paths = []
    for name, images in (
        ("train", data["images"][:train_images]),
        ("test", data["images"][train_images:]),
    ):
        ids = {image["id"] for image in images}
        subset = {
            **data,
            "images": images,
            "annotations": [a for a in data["annotations"] if a["image_id"] in ids],
        }
        path = os.path.join(folder, f"{name}.json")
        with open(path, "w") as f:
            json.dump(subset, f)
        paths.append(path)
    return paths[0], paths[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", required=True, help="COCO instances JSON")
    parser.add_argument("--images", required=True, help="folder of its images")
    parser.add_argument("--train-images", type=int, default=12)
    parser.add_argument("--checkpoint", help="starting model (default: the shipped default)")
    parser.add_argument("--steps", type=int, default=200, help="retrain optimiser steps")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument(
        "--train-encoder", action="store_true", help="train the image encoder too (slow on CPU)"
    )
    parser.add_argument("--points-per-side", type=int, default=16, help="AR generator grid")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    base, _ = load_model(args.checkpoint)
    with tempfile.TemporaryDirectory(prefix="maskmill-finetune-") as folder:
        train_json, test_json = split_coco(args.annotations, args.train_images, folder)
        store = Store(os.path.join(folder, "store"))
        import_coco(train_json, args.images, store)
        plan = make_plan(store, manual_rounds=0, semi_rounds=0, auto=False, holdout=0.0)
        base_meta = ensure_initial_model(store, plan, args.checkpoint)
        init_ray()
        started = time.perf_counter()
        config = RetrainConfig(
            steps=args.steps,
            workers=args.workers,
            lr=args.lr,
            encoder_blocks=None if args.train_encoder else 0,
            stages=("gt",),
            seed=args.seed,
        )
        meta = retrain(store, 1, plan, base_meta, config)
        train_seconds = time.perf_counter() - started
        tuned = load_checkpoint(meta["uri"])
        rows = {}
        for name, model in (("starting model", base), ("fine-tuned", tuned)):
            rows[name] = evaluate_coco(
                model, test_json, args.images, points_per_side=args.points_per_side
            )
    train_images = meta["metrics"]["train_images"]
    train_masks = meta["metrics"]["train_masks"]
    print(
        f"fine-tuned on {train_images} images ({train_masks} masks), {args.steps} steps, "
        f"{args.workers} Ray Train workers, encoder {'trained' if args.train_encoder else 'frozen'}"
        f", {train_seconds:.0f} s; evaluated on {rows['fine-tuned']['images']} other images "
        f"({rows['fine-tuned']['masks']} masks)"
    )
    print(f"{'':16}" + "".join(f"{k:>22}" for k in KEYS))
    for name, metrics in rows.items():
        print(f"{name:16}" + "".join(f"{metrics[k]:>22.3f}" for k in KEYS))
    change = {k: rows["fine-tuned"][k] - rows["starting model"][k] for k in KEYS}
    print(f"{'change':16}" + "".join(f"{change[k]:>+22.3f}" for k in KEYS))
    print(json.dumps({"rows": rows, "train_seconds": train_seconds, "steps": args.steps}))


if __name__ == "__main__":
    main()
