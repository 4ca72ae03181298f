"""Numeric parity with segment-anything, the reference implementation.

Both implementations get one random state dict (every weight non-zero and at a trained model's
scale) and the same photo-like image; the low-resolution logits must agree within 1e-3 and the
predicted IoUs within 1e-4 for every prompt kind.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from bench.reference import build_reference, randomize_
from maskmill.engine.training.synthetic import photo_like
from maskmill.model import Predictor, build_model, get_config, load_checkpoint

LOGIT_TOLERANCE = 1e-3
IOU_TOLERANCE = 1e-4


def _pair_from_state_dict(config_name: str):
    reference = build_reference(get_config(config_name))
    state = randomize_(reference, seed=7)
    ours = build_model(config_name)
    ours.load_state_dict(state, strict=True)
    return reference, ours


def _pair_from_checkpoint_file(config_name: str, tmp_path_factory):
    """The reference's state dict saved as an official .pth file and read by load_checkpoint."""
    reference = build_reference(get_config(config_name))
    state = randomize_(reference, seed=11)
    path = tmp_path_factory.mktemp("ckpt") / f"sam_{config_name}_random.pth"
    torch.save(state, path)
    ours = load_checkpoint(str(path))
    assert ours.config == get_config(config_name)
    assert ours.config.name == config_name
    return reference, ours


@pytest.fixture(scope="module", params=["tiny", "vit_b"])
def predictors(request, tmp_path_factory):
    # vit_b goes through an official-format file, which also proves load_checkpoint's parity.
    if request.param == "vit_b":
        reference, ours = _pair_from_checkpoint_file("vit_b", tmp_path_factory)
    else:
        reference, ours = _pair_from_state_dict("tiny")
    image = photo_like(480, 640, seed=1)
    reference_predictor = SamPredictor(reference)
    reference_predictor.set_image(image)
    our_predictor = Predictor(ours)
    our_predictor.set_image(image)
    return request.param, reference_predictor, our_predictor


PROMPTS = {
    "one point": dict(point_coords=np.array([[320.0, 240.0]]), point_labels=np.array([1])),
    "several points": dict(
        point_coords=np.array([[320.0, 240.0], [100.0, 90.0], [500.0, 400.0], [40.0, 420.0]]),
        point_labels=np.array([1, 0, 1, 0]),
    ),
    "box": dict(box=np.array([100.0, 80.0, 400.0, 300.0])),
    "point and box": dict(
        point_coords=np.array([[200.0, 200.0]]),
        point_labels=np.array([1]),
        box=np.array([100.0, 80.0, 400.0, 300.0]),
    ),
}


def _assert_close(name, reference_out, our_out):
    ref_masks, ref_iou, ref_low = reference_out
    masks, iou, low = our_out
    assert masks.shape == ref_masks.shape and masks.dtype == ref_masks.dtype == bool
    assert low.shape == ref_low.shape
    assert np.abs(low - ref_low).max() <= LOGIT_TOLERANCE, name
    assert np.abs(iou - ref_iou).max() <= IOU_TOLERANCE, name
    # Thresholded masks can only differ where a logit sits within the tolerance of 0.
    assert (masks != ref_masks).mean() < 1e-4, name
    # The comparison means something only if the outputs are not degenerate.
    assert np.abs(ref_low).mean() > 0.05 and 0.0 < ref_masks.mean() < 1.0


def test_image_embedding_parity(predictors):
    _, reference, ours = predictors
    difference = (reference.features - ours.get_image_embedding()).abs().max().item()
    assert difference < 1e-3
    assert reference.original_size == ours.original_size
    assert tuple(reference.input_size) == ours.input_size


@pytest.mark.parametrize("multimask_output", [True, False])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_prompt_parity(predictors, prompt, multimask_output):
    config_name, reference, ours = predictors
    kwargs = dict(PROMPTS[prompt], multimask_output=multimask_output)
    reference_out = reference.predict(**kwargs)
    our_out = ours.predict(**kwargs)
    assert our_out[0].shape[0] == (3 if multimask_output else 1)
    _assert_close(f"{config_name} {prompt}", reference_out, our_out)

    # The mask prompt: feed the best low-res logits back, as interactive annotation does.
    best = reference_out[2][np.argmax(reference_out[1])][None]
    kwargs["mask_input"] = best
    _assert_close(
        f"{config_name} {prompt} + mask", reference.predict(**kwargs), ours.predict(**kwargs)
    )


def test_mask_prompt_alone_parity(predictors):
    config_name, reference, ours = predictors
    first = reference.predict(**PROMPTS["one point"], multimask_output=False)
    kwargs = dict(mask_input=first[2], multimask_output=True)
    _assert_close(f"{config_name} mask only", reference.predict(**kwargs), ours.predict(**kwargs))
