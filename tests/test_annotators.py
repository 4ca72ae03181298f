"""The simulated annotator finishes objects: clicks while they help, then brush and eraser
strokes under its documented time model; its skip rule; its verdicts on a semi stage's
pre-fill. Scripted predictors make the click loop exact; a random-weight tiny model shows that
even a useless model ends in correct masks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from maskmill.engine.annotators import SimulatedAnnotator
from maskmill.model import Predictor, load_default
from maskmill.storage import rle

H, W = 64, 80


def _square(top: int, left: int, size: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[top : top + size, left : left + size] = True
    return mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


class ScriptedPredictor:
    """Returns ``masks[k]`` at its k-th call (the last one again after that); records calls."""

    def __init__(self, masks: list[np.ndarray]) -> None:
        self.masks, self.calls = masks, []

    def predict(self, point_coords, point_labels, mask_input=None, multimask_output=True):
        self.calls.append((np.array(point_coords), np.array(point_labels)))
        mask = self.masks[min(len(self.calls), len(self.masks)) - 1]
        n = 3 if multimask_output else 1
        return np.stack([mask] * n), np.linspace(0.9, 0.5, n), np.zeros((n, 8, 8), np.float32)


class OraclePredictor:
    """The ground-truth object under the first click: a perfect model."""

    def __init__(self, objects: list[np.ndarray]) -> None:
        self.objects, self.calls = objects, 0

    def predict(self, point_coords, point_labels, mask_input=None, multimask_output=True):
        self.calls += 1
        x, y = point_coords[0]
        mask = next((o for o in self.objects if o[int(y), int(x)]), np.zeros((H, W), bool))
        n = 3 if multimask_output else 1
        return np.stack([mask] * n), np.linspace(0.9, 0.5, n), np.zeros((n, 8, 8), np.float32)


def _annotator(objects: list[np.ndarray], **options) -> SimulatedAnnotator:
    return SimulatedAnnotator(lambda _: [rle.encode(o) for o in objects], **options)


IMAGE = np.zeros((H, W, 3), np.uint8)

# ------------------------------------------------------------------------------ the time model


def test_a_stroke_costs_base_plus_k_sqrt_pixels():
    annotator = SimulatedAnnotator(
        lambda _: [], stroke_seconds_base=1.0, stroke_seconds_per_sqrt_px=0.05
    )
    assert annotator.stroke_seconds(0) == 1.0
    assert annotator.stroke_seconds(100) == pytest.approx(1.5)
    assert annotator.stroke_seconds(10_000) == pytest.approx(6.0)


def test_strokes_fix_the_largest_error_region_first_and_cost_as_documented():
    target = _square(10, 10, 40)  # 1600 px
    model = target.copy()
    model[10:20, 10:20] = False  # a missed 10x10 corner (100 px)
    model[55:60, 60:65] = True  # a spurious 5x5 blob (25 px)
    annotator = SimulatedAnnotator(lambda _: [])
    fixed = annotator.correct(model, target)
    # IoU 1500/1625 = 0.923; the brush over the corner alone gives 1600/1625 = 0.985 >= 0.95
    assert fixed.stroke_pixels == [100] and not fixed.cleared
    assert fixed.seconds == pytest.approx(1.0 + 0.05 * 10)
    np.testing.assert_array_equal(fixed.mask, target | _square(55, 60, 5))
    # To IoU 1 the eraser takes the blob too: one more stroke of 1 + 0.05 x 5 s
    exact = SimulatedAnnotator(lambda _: [], correct_iou=1.0).correct(model, target)
    assert exact.stroke_pixels == [100, 25]
    assert exact.seconds == pytest.approx(1.5 + 1.25)
    np.testing.assert_array_equal(exact.mask, target)


def test_a_speckled_mask_is_cleared_and_painted_anew_when_that_is_quicker():
    target = _square(10, 10, 20)  # 400 px
    model = target.copy()
    model[40:62:2, 40:78:2] = True  # 11 x 19 = 209 isolated spurious pixels
    annotator = SimulatedAnnotator(lambda _: [])
    fixed = annotator.correct(model, target)
    # Erasing them one by one to IoU 0.95 takes 188 strokes (> 188 s); clearing (1 s) and
    # painting the square (1 + 0.05 x 20 s) takes 3 s.
    assert fixed.cleared and fixed.stroke_pixels == [0, 400] and fixed.strokes == 2
    assert fixed.seconds == pytest.approx(3.0)
    np.testing.assert_array_equal(fixed.mask, target)


def test_an_accepted_mask_records_clicks_strokes_seconds_and_model_iou():
    target = _square(10, 10, 40)
    model = target.copy()
    model[10:20, 10:20] = False  # IoU 0.9375: accepted at the first click, then one stroke
    annotator = _annotator([target])
    result = annotator.annotate("img", IMAGE, ScriptedPredictor([model]), [])
    (mask,) = result.masks
    stroke = 1.0 + 0.05 * 10
    assert (len(mask.clicks), mask.strokes) == (1, 1)
    assert mask.stroke_seconds == pytest.approx(stroke)
    assert mask.seconds == pytest.approx(3.0 + 1.5 * 1 + stroke)
    assert mask.model_iou == pytest.approx(1500 / 1600)
    np.testing.assert_array_equal(rle.decode(mask.segmentation), target)
    record = result.records("simulated")[0]
    assert (record["strokes"], record["model_iou"]) == (1, mask.model_iou)
    assert record["stroke_seconds"] == mask.stroke_seconds


# ----------------------------------------------------------------------------------- clicking


def test_patience_stops_clicks_that_do_not_help_and_the_best_mask_is_kept():
    target = _square(10, 10, 40)
    masks = []
    for rows in (20, 30, 31, 30, 31, 35):  # IoU 0.5, 0.75, 0.775, 0.75, 0.775, 0.875
        mask = np.zeros((H, W), bool)
        mask[10 : 10 + rows, 10:50] = True
        masks.append(mask)
    predictor = ScriptedPredictor(masks)
    result = _annotator([target], patience=3, min_gain=0.05).annotate("img", IMAGE, predictor, [])
    # clicks 3, 4 and 5 each gained < 0.05 over the best (0.75): the fifth click is the last
    assert len(predictor.calls) == 5
    (mask,) = result.masks
    assert len(mask.clicks) == 5
    # the best mask seen (0.775, click 3) was corrected: one brush stroke of 9 x 40 px
    assert mask.model_iou == pytest.approx(31 / 40)
    assert mask.strokes == 1 and mask.stroke_seconds == pytest.approx(1 + 0.05 * math.sqrt(360))
    np.testing.assert_array_equal(rle.decode(mask.segmentation), target)


def test_the_click_budget_ends_clicking_and_strokes_finish_the_object():
    target = _square(10, 10, 20)
    predictor = ScriptedPredictor([np.zeros((H, W), bool)])  # a useless model
    result = _annotator([target], max_clicks=5, patience=100).annotate("img", IMAGE, predictor, [])
    assert len(predictor.calls) == 5
    # the prediction is empty, so every corrective click is a positive one inside the object
    coords, labels = predictor.calls[-1]
    assert coords.shape == (5, 2) and (labels == 1).all()
    assert all(target[int(y), int(x)] for x, y in coords)
    (mask,) = result.masks
    assert result.abandoned == 0 and mask.model_iou == 0.0 and mask.strokes == 1
    assert mask.seconds == pytest.approx(3.0 + 1.5 * 5 + 1.0 + 0.05 * 20)
    np.testing.assert_array_equal(rle.decode(mask.segmentation), target)


# ----------------------------------------------------------------------------- what is skipped


def test_objects_below_min_object_area_are_skipped_and_counted():
    big, at_limit = _square(0, 0, 30), _square(40, 40, 8)  # 900 and 64 px
    below = np.zeros((H, W), bool)
    below[40:47, 60:69] = True  # 63 px
    covered = _square(50, 0, 7)  # 49 px, but an earlier round has it: covered, not skipped
    objects = [below, big, at_limit, covered]
    result = _annotator(objects).annotate(
        "img", IMAGE, OraclePredictor(objects), [rle.encode(covered)]
    )
    assert result.skipped_small == 1 and result.skipped_budget == 0
    drawn = [rle.decode(m.segmentation) for m in result.masks]
    assert len(drawn) == 2
    np.testing.assert_array_equal(drawn[0], big)
    np.testing.assert_array_equal(drawn[1], at_limit)


def test_the_image_time_budget_stops_starting_objects():
    objects = [_square(0, 0, 20), _square(0, 30, 15), _square(40, 40, 10)]
    # a perfect model: 3 + 1.5 s an object; the third starts at 9 s >= 8 s
    result = _annotator(objects, image_seconds_budget=8.0).annotate(
        "img", IMAGE, OraclePredictor(objects), []
    )
    assert len(result.masks) == 2 and result.skipped_budget == 1


def test_bad_settings_and_prefill_of_another_size_are_refused():
    with pytest.raises(ValueError, match="correct_iou must be in"):
        SimulatedAnnotator(lambda _: [], correct_iou=1.5)
    with pytest.raises(ValueError, match="patience"):
        SimulatedAnnotator(lambda _: [], patience=0)
    with pytest.raises(ValueError, match="stroke_seconds_base must be >= 0"):
        SimulatedAnnotator(lambda _: [], stroke_seconds_base=-1)
    annotator = _annotator([_square(0, 0, 10)])
    other = rle.encode(np.zeros((10, 10), bool))
    with pytest.raises(ValueError, match="pre-filled mask 0 is 10x10"):
        annotator.annotate("img", IMAGE, OraclePredictor([]), [], prefill=[other])


# ------------------------------------------------------------------------------------ pre-fill


def test_prefill_verdicts_kept_corrected_deleted():
    a, b = _square(5, 5, 30), _square(5, 45, 20)  # 900 and 400 px
    c, d = _square(45, 5, 12), _square(45, 60, 15)  # c missing; d drawn in an earlier round
    near_a = a.copy()
    near_a[5:8] = False  # IoU 0.9 with a: right, but the perfect one is better
    shifted_b = _square(5, 48, 20)  # IoU 340/460 = 0.74 with b: worth correcting
    background = _square(40, 30, 10)  # on no object
    prefill = [near_a, a, shifted_b, background, d]
    objects = [a, b, c, d]
    predictor = OraclePredictor(objects)
    result = _annotator(objects).annotate(
        "img", IMAGE, predictor, [rle.encode(d)], prefill=[rle.encode(m) for m in prefill]
    )
    # a: the perfect pre-fill is kept, its near twin is a duplicate; d's pre-fill duplicates
    # an earlier round's mask
    assert result.kept_prefill == [1]
    assert (result.prefill_kept, result.prefill_corrected, result.prefill_deleted) == (1, 1, 3)
    corrected, drawn = result.masks
    np.testing.assert_array_equal(rle.decode(corrected.segmentation), b)
    assert corrected.clicks == [] and corrected.strokes == 2
    assert corrected.model_iou == pytest.approx(_iou(shifted_b, b))
    strokes = 2 * (1 + 0.05 * math.sqrt(60))  # a missed and a spurious 20 x 3 band
    assert corrected.stroke_seconds == pytest.approx(strokes)
    assert corrected.seconds == pytest.approx(3.0 + strokes)  # no clicks
    # only c, missing from pre-fill and earlier rounds, was clicked
    np.testing.assert_array_equal(rle.decode(drawn.segmentation), c)
    assert len(drawn.clicks) == 1 and predictor.calls == 1


# ----------------------------------------------------------------- a real (useless) model


def _scene() -> tuple[np.ndarray, list[np.ndarray]]:
    ys, xs = np.mgrid[:96, :128]
    disc = (ys - 40) ** 2 + (xs - 40) ** 2 < 18**2
    l_shape = np.zeros((96, 128), bool)
    l_shape[10:80, 80:92] = True
    l_shape[68:80, 80:120] = True
    ring = ((ys - 60) ** 2 + (xs - 40) ** 2 < 22**2) & ((ys - 60) ** 2 + (xs - 40) ** 2 >= 12**2)
    ring &= ~disc
    speck = np.zeros((96, 128), bool)
    speck[2:8, 2:8] = True  # 36 px: below the minimum area
    objects = [disc, l_shape, ring, speck]
    image = np.full((96, 128, 3), 90, np.uint8)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (220, 220, 0)]
    for obj, colour in zip(objects, colours, strict=True):
        image[obj] = colour
    return image, objects


@pytest.fixture(scope="module")
def random_model_annotation(tiny_model):
    image, objects = _scene()
    predictor = Predictor(tiny_model)
    predictor.set_image(image)
    annotator = _annotator(objects)
    return annotator, image, objects, annotator.annotate("img", image, predictor, [])


def test_a_random_weight_model_still_ends_in_correct_masks(random_model_annotation):
    annotator, _, objects, result = random_model_annotation
    assert result.skipped_small == 1 and result.abandoned == 0 and len(result.masks) == 3
    gt = [rle.encode(o) for o in objects[:3]]
    ious = rle.ious([m.segmentation for m in result.masks], gt)
    assert (ious.max(axis=1) >= 0.95).all() and sorted(ious.argmax(axis=1)) == [0, 1, 2]
    for mask in result.masks:
        assert mask.strokes >= 1 and mask.model_iou < 0.95  # the model's masks needed strokes
        assert 1 <= len(mask.clicks) <= annotator.max_clicks
        assert mask.seconds == pytest.approx(
            annotator.object_seconds
            + annotator.click_seconds * len(mask.clicks)
            + mask.stroke_seconds
        )


def test_reruns_give_the_same_masks(random_model_annotation, tiny_model):
    annotator, image, _, first = random_model_annotation
    predictor = Predictor(tiny_model)
    predictor.set_image(image)
    again = annotator.annotate("img", image, predictor, [])
    assert again.records("simulated") == first.records("simulated")


def test_the_simulated_annotator_labels_what_it_draws():
    """Given the objects' categories, each mask it draws carries its object's category (as a
    person's does from the page's category field), so retrains learn the store's concepts."""
    image, objects = _scene()
    names = [f"kind{i}" for i in range(len(objects))]
    annotator = SimulatedAnnotator(
        lambda _: [rle.encode(o) for o in objects], categories=lambda _: names
    )
    predictor = Predictor(load_default())
    predictor.set_image(image)
    annotation = annotator.annotate("img", image, predictor, [])
    assert annotation.masks
    for mask in annotation.masks:
        decoded = rle.decode(mask.segmentation)
        best = int(np.argmax([(decoded & o).sum() / (decoded | o).sum() for o in objects]))
        assert mask.category == names[best]
    records = annotation.records("simulated")
    assert [r["category"] for r in records] == [m.category for m in annotation.masks]
