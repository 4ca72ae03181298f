"""The model shipped inside the package: present, small, reproducible from its recorded command,
and good enough to segment held-out generated scenes from one click."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskmill.engine.evaluate import evaluate_interactive, interior_point
from maskmill.engine.training.pretrain import HELD_OUT_SEED
from maskmill.engine.training.synthetic import scene
from maskmill.model import Predictor, has_default, load_default
from maskmill.model.checkpoint import DEFAULT_CHECKPOINT


def test_default_model_is_shipped_small_and_documented():
    assert has_default(), f"{DEFAULT_CHECKPOINT} is missing"
    assert DEFAULT_CHECKPOINT.stat().st_size <= 20 * 2**20
    model = load_default()
    assert model.config.name == "tiny"
    assert not model.training
    command = model.metadata["command"]
    assert command.startswith("maskmill pretrain ") and "--steps" in command


def test_default_model_segments_held_out_scenes_from_one_click():
    """1-click mIoU (best of 3) on whole objects of scenes pre-training never saw."""
    predictor = Predictor(load_default())
    ious = []
    with torch.inference_mode():
        for seed in range(HELD_OUT_SEED + 500, HELD_OUT_SEED + 504):
            generated = scene(512, 512, seed=seed)
            masks = np.stack([m for m in generated.instances if m.sum() >= 400])
            predictor.set_image(generated.image)
            result = evaluate_interactive(predictor, masks, max_clicks=1)
            ious.append(result.one_click_best)
    miou = float(np.concatenate(ious).mean())
    # A random-weight tiny model scores 0.04 here.
    assert miou >= 0.5, f"1-click mIoU {miou:.3f}"


@pytest.mark.parametrize("multimask", [True, False])
def test_default_model_masks_contain_the_click(multimask):
    generated = scene(384, 512, seed=HELD_OUT_SEED + 7)
    largest = max(generated.instances, key=lambda m: m.sum())
    point = np.array([interior_point(largest)], np.float32)
    predictor = Predictor(load_default())
    predictor.set_image(generated.image)
    masks, scores, _ = predictor.predict(point, np.array([1]), multimask_output=multimask)
    best = masks[int(np.argmax(scores))]
    assert best[int(point[0, 1]), int(point[0, 0])]
    assert (best & largest).sum() / (best | largest).sum() >= 0.5
