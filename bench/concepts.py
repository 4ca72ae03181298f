"""Concept prompts and box prompts on photos the model has not seen, in one run.

    python bench/concepts.py --annotations ../shared/data/fruits_nuts/trainval.json \
        --images ../shared/data/fruits_nuts/images --train-images 12 --steps 200

The first ``--train-images`` images of the COCO file (file order) are imported into a fresh
store as ground truth with their categories; the engine's retrain
(``engine.training.retrain.retrain``: Ray Train, prompt simulation, then the concept head on the
categories) fine-tunes the shipped default on them. On the other images it reports, by
pycocotools COCOeval (segm):

- concept-prompt mask AP / AP50 per category (``maskmill eval --concepts``): every instance
  ``Predictor.predict_concept`` finds, for the fine-tuned model and, as a reference, for the
  shipped default with a concept head trained on the same images (no fine-tuning);
- box-prompt mask AP with the ground-truth boxes as the detector (the SAM paper's protocol,
  ``maskmill eval``), for the shipped default and the fine-tuned model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from finetune import split_coco  # bench/ is the script's folder: sys.path[0]

from maskmill.engine.evaluate import evaluate_coco, evaluate_concepts
from maskmill.engine.plan import ensure_initial_model, make_plan
from maskmill.engine.ray_pool import init_ray
from maskmill.engine.training.retrain import RetrainConfig, fit_concepts, retrain
from maskmill.model import load_checkpoint, load_model
from maskmill.storage import Store, import_coco
from maskmill.storage.queries import training_set


def _per_category(metrics: dict, prefix: str) -> str:
    per = metrics.get(f"{prefix}_ap_per_category") or {}
    return ", ".join(f"{name} {v['ap50']:.3f}" for name, v in per.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", required=True, help="COCO instances JSON")
    parser.add_argument("--images", required=True, help="folder of its images")
    parser.add_argument("--train-images", type=int, default=12)
    parser.add_argument("--steps", type=int, default=200, help="retrain optimiser steps")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    base, _ = load_model(None)
    with tempfile.TemporaryDirectory(prefix="maskmill-concepts-") as folder:
        train_json, test_json = split_coco(args.annotations, args.train_images, folder)
        store = Store(os.path.join(folder, "store"))
        import_coco(train_json, args.images, store)
        plan = make_plan(store, manual_rounds=0, semi_rounds=0, auto=False, holdout=0.0)
        base_meta = ensure_initial_model(store, plan)
        init_ray()
        config = RetrainConfig(
            steps=args.steps,
            workers=args.workers,
            lr=args.lr,
            encoder_blocks=0,
            stages=("gt",),
            seed=args.seed,
        )
        train_started = time.perf_counter()
        meta = retrain(store, 1, plan, base_meta, config)
        train_seconds = time.perf_counter() - train_started
        tuned = load_checkpoint(meta["uri"])
        # The reference: the shipped default's own features, with a head on the same masks.
        head_only = load_model(None)[0]
        samples = training_set(store, ("gt",), 1)
        fit_concepts(head_only, samples, config)

        rows = {
            "default + concept head": evaluate_concepts(head_only, test_json, args.images),
            "fine-tuned (retrain)": evaluate_concepts(tuned, test_json, args.images),
        }
        boxes = {
            name: evaluate_coco(model, test_json, args.images, points_per_side=16)
            for name, model in (("shipped default", base), ("fine-tuned", tuned))
        }
    metrics = meta["metrics"]
    print(
        f"retrain: {metrics['train_images']} images ({metrics['train_masks']} masks), "
        f"{args.steps} steps, encoder frozen, {train_seconds:.0f} s; concept head on "
        f"{metrics.get('concept_images')} images ({metrics.get('concept_examples')} examples), "
        f"concepts {meta.get('concepts')}; evaluated on {rows['fine-tuned (retrain)']['images']} "
        "other images"
    )
    print(f"{'concept prompts':26}{'AP':>8}{'AP50':>8}{'AP75':>8}   AP50 per category")
    for name, row in rows.items():
        print(
            f"{name:26}{row['concept_ap']:>8.3f}{row['concept_ap50']:>8.3f}"
            f"{row['concept_ap75']:>8.3f}   {_per_category(row, 'concept')}"
        )
    print(f"{'GT boxes as prompts':26}{'AP':>8}{'AP50':>8}{'AP75':>8}   AP50 per category")
    for name, row in boxes.items():
        print(
            f"{name:26}{row['box_prompt_ap']:>8.3f}{row['box_prompt_ap50']:>8.3f}"
            f"{row['box_prompt_ap75']:>8.3f}   {_per_category(row, 'box_prompt')}"
        )
    print(f"total {time.perf_counter() - started:.0f} s")
    print(
        json.dumps(
            {"concepts": rows, "boxes": boxes, "train_seconds": train_seconds, "meta": metrics},
            default=str,
        )
    )


if __name__ == "__main__":
    main()
