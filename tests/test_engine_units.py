"""Data engine pieces without Prefect or Ray: the simulated annotator's clicks and decisions
(its corrections, time model and pre-fill verdicts: tests/test_annotators.py). Image reading is
storage's: tests/test_storage_images.py."""

from __future__ import annotations

import numpy as np
import pytest

from maskmill.engine.annotators import SimulatedAnnotator
from maskmill.storage import rle

# ---------------------------------------------------------------------------------- annotator


class OraclePredictor:
    """Returns, for any clicks, the ground-truth object under the first positive click (a
    perfect model), or an empty mask (a useless one) with ``useless=True``; records clicks."""

    def __init__(self, objects: list[np.ndarray], useless: bool = False) -> None:
        self.objects, self.useless, self.calls = objects, useless, []

    def predict(self, point_coords, point_labels, mask_input=None, multimask_output=True):
        self.calls.append((np.array(point_coords), np.array(point_labels), mask_input))
        x, y = point_coords[0]
        shape = self.objects[0].shape
        mask = np.zeros(shape, bool)
        if not self.useless:
            for obj in self.objects:
                if obj[int(y), int(x)]:
                    mask = obj
        n = 3 if multimask_output else 1
        masks = np.stack([mask] * n)
        return masks, np.linspace(0.9, 0.5, n), np.zeros((n, 256, 256), np.float32)


def _objects() -> list[np.ndarray]:
    big = np.zeros((64, 80), bool)
    big[5:45, 5:45] = True
    small = np.zeros((64, 80), bool)
    small[50:60, 60:75] = True
    medium = np.zeros((64, 80), bool)
    medium[10:30, 55:78] = True
    return [small, big, medium]


def test_annotator_takes_largest_first_and_clicks_the_centre():
    objects = _objects()
    annotator = SimulatedAnnotator(lambda _: [rle.encode(o) for o in objects])
    predictor = OraclePredictor(objects)
    image = np.zeros((64, 80, 3), np.uint8)
    result = annotator.annotate("img", image, predictor, existing=[])
    assert len(result.masks) == 3 and result.abandoned == 0
    drawn = [rle.decode(m.segmentation) for m in result.masks]
    # largest (big, 1600 px), then medium (460), then small (150)
    for mask, expected in zip(drawn, [objects[1], objects[2], objects[0]], strict=True):
        np.testing.assert_array_equal(mask, expected)
    # one click each, at the point farthest from the boundary: the square's centre
    assert [len(m.clicks) for m in result.masks] == [1, 1, 1]
    x, y, label = result.masks[0].clicks[0]
    assert label == 1 and 24 <= x <= 25 and 24 <= y <= 25
    assert result.masks[0].seconds == pytest.approx(3.0 + 1.5)


def test_annotator_skips_covered_objects():
    objects = _objects()
    annotator = SimulatedAnnotator(lambda _: [rle.encode(o) for o in objects])
    covering = objects[1].copy()
    covering[5:10] = False  # IoU 0.875 with the big object: covered
    result = annotator.annotate(
        "img", np.zeros((64, 80, 3), np.uint8), OraclePredictor(objects), [rle.encode(covering)]
    )
    assert len(result.masks) == 2
    assert rle.ious([m.segmentation for m in result.masks], [rle.encode(objects[1])]).max() < 0.5


def test_annotator_never_gives_up_on_a_useless_model():
    """Defaults: clicking stops after 1 + patience (3) clicks that gain nothing; one brush
    stroke paints the object (see tests/test_annotators.py for the rules one by one)."""
    objects = _objects()[:1]
    annotator = SimulatedAnnotator(lambda _: [rle.encode(o) for o in objects])
    predictor = OraclePredictor(objects, useless=True)
    result = annotator.annotate("img", np.zeros((64, 80, 3), np.uint8), predictor, [])
    assert result.abandoned == 0 and len(predictor.calls) == 4
    (mask,) = result.masks
    np.testing.assert_array_equal(rle.decode(mask.segmentation), objects[0])
    assert (len(mask.clicks), mask.strokes, mask.model_iou) == (4, 1, 0.0)
    # after the first call every call refines: all clicks so far and the previous logits
    coords, labels, mask_input = predictor.calls[-1]
    assert coords.shape == (4, 2) and mask_input is not None
    # the prediction is empty, so every corrective click is a positive one inside the object
    assert (labels == 1).all()
    assert all(objects[0][int(y), int(x)] for x, y in coords)


def test_annotator_checks_ground_truth_size():
    objects = _objects()
    annotator = SimulatedAnnotator(lambda _: [rle.encode(o) for o in objects])
    with pytest.raises(ValueError, match="ground-truth mask 0 is 64x80"):
        annotator.annotate("img", np.zeros((10, 10, 3), np.uint8), OraclePredictor(objects), [])


def test_rle_ious_by_pycocotools():
    a, b = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    a[:5], b[:, :5] = True, True
    assert rle.ious([rle.encode(a)], [rle.encode(b), rle.encode(a)]).tolist() == [
        [pytest.approx(25 / 75), 1.0]
    ]
