"""``maskmill eval``'s metrics: click placement, oracle sanity checks, COCOeval AR, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from maskmill.engine.evaluate import (
    METRIC_KEYS,
    average_recall,
    evaluate_coco,
    evaluate_interactive,
    format_table,
    interior_point,
    load_coco,
    mask_ious,
    next_click,
)
from maskmill.engine.training.synthetic import write_coco
from maskmill.flows.cli import main
from maskmill.model import SamConfig, build_model, save_checkpoint


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rect(shape, y0, y1, x0, x1):
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_interior_point_is_the_centre_of_a_rectangle():
    assert interior_point(_rect((50, 60), 10, 31, 20, 41)) == (30.0, 20.0)
    # The image border counts as boundary: a mask filling the image clicks at its centre.
    assert interior_point(np.ones((11, 21), dtype=bool)) == (10.0, 5.0)
    with pytest.raises(ValueError, match="empty"):
        interior_point(np.zeros((4, 4), dtype=bool))


def test_next_click_goes_to_the_largest_error_region():
    target = _rect((100, 100), 10, 90, 10, 90)
    # Missed: a 20-row band (1600 px); spurious: a 10 x 10 square outside.
    predicted = _rect((100, 100), 30, 90, 10, 90) | _rect((100, 100), 0, 10, 0, 10)
    x, y, label = next_click(predicted, target)
    assert label == 1 and 10 <= y < 30 and target[int(y), int(x)] and not predicted[int(y), int(x)]
    # Now the spurious region is the larger one: a background click inside it.
    predicted = target | _rect((100, 100), 90, 100, 0, 100)
    x, y, label = next_click(predicted, target)
    assert label == 0 and y >= 90
    # Nothing wrong: a foreground click at the target's centre.
    x, y, label = next_click(target, target)
    assert label == 1 and {x, y} <= {49.0, 50.0}


def test_mask_ious_known_values():
    a = _rect((10, 10), 0, 10, 0, 5)
    b = _rect((10, 10), 0, 10, 0, 10)
    np.testing.assert_allclose(mask_ious(np.stack([a, b]), b), [0.5, 1.0])


class _OraclePredictor:
    """Answers every prompt with a ground-truth mask: the one under the first click (or the one
    whose box was given); optionally only its left half on the first click."""

    def __init__(self, masks: np.ndarray, half_first: bool = False):
        self.masks = masks
        self.original_size = masks.shape[1:]
        self.half_first = half_first

    def _find(self, x: float, y: float) -> np.ndarray:
        hits = [m for m in self.masks if m[int(y), int(x)]]
        return min(hits, key=lambda m: m.sum())

    def predict_batch(
        self,
        point_coords=None,
        point_labels=None,
        boxes=None,
        mask_input=None,
        multimask_output=True,
    ):
        out = []
        if boxes is not None:
            for box in np.asarray(boxes):
                out.append(next(m for m in self.masks if _box_of(m) == tuple(box)))
        else:
            for coords in np.asarray(point_coords):
                mask = self._find(*coords[0]).copy()
                if self.half_first and len(coords) == 1:
                    cols = np.flatnonzero(mask.any(axis=0))
                    mask[:, (cols[0] + cols[-1] + 1) // 2 :] = False
                out.append(mask)
        masks = torch.as_tensor(np.stack(out))[:, None]
        count = 3 if multimask_output else 1
        masks = masks.expand(-1, count, -1, -1)
        scores = torch.linspace(0.9, 0.5, count).expand(len(out), -1)
        return masks, scores, torch.zeros(len(out), count, 8, 8)


def _box_of(mask):
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def test_oracle_scores_perfectly():
    masks = np.stack([_rect((80, 90), 5, 30, 5, 40), _rect((80, 90), 40, 75, 50, 85)])
    result = evaluate_interactive(_OraclePredictor(masks), masks)
    np.testing.assert_array_equal(result.one_click_best, [1.0, 1.0])
    np.testing.assert_array_equal(result.one_click_top1, [1.0, 1.0])
    np.testing.assert_array_equal(result.noc[0.85], [1, 1])
    np.testing.assert_array_equal(result.noc[0.9], [1, 1])
    np.testing.assert_array_equal(result.box, [1.0, 1.0])


def test_half_mask_on_the_first_click_needs_a_second():
    masks = _rect((80, 90), 10, 60, 10, 70)[None]
    result = evaluate_interactive(_OraclePredictor(masks, half_first=True), masks)
    assert result.one_click_best[0] == pytest.approx(0.5)
    assert result.noc[0.85].tolist() == [2] and result.noc[0.9].tolist() == [2]


def test_average_recall_of_ground_truth_is_one(tmp_path):
    path = write_coco(tmp_path / "ds", count=2, seed=3, height=96, width=96, min_area=20)
    gt, ids = load_coco(path)
    detections = [
        {"image_id": a["image_id"], "segmentation": a["segmentation"], "score": 1.0}
        for a in gt.dataset["annotations"]
    ]
    assert average_recall(gt, detections, ids) == {"ar100": 1.0, "ar1000": 1.0}
    # Half of the masks found: AR 0.5 (every mask is either matched exactly or missed).
    by_image = {i: [d for d in detections if d["image_id"] == i] for i in ids}
    half = [d for i in ids for d in by_image[i][: len(by_image[i]) // 2]]
    expected = len(half) / len(detections)
    assert average_recall(gt, half, ids)["ar100"] == pytest.approx(expected)
    assert average_recall(gt, [], ids) == {"ar100": 0.0, "ar1000": 0.0}


def test_load_coco_errors_and_max_images(tmp_path):
    path = write_coco(tmp_path / "ds", count=3, seed=0, height=64, width=64, min_area=10)
    gt, ids = load_coco(path, max_images=2)
    assert ids == [0, 1] and {a["image_id"] for a in gt.dataset["annotations"]} <= {0, 1}
    with pytest.raises(ValueError, match="no such annotations"):
        load_coco(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        load_coco(tmp_path / "bad.json")


MICRO = SamConfig(
    encoder_embed_dim=32,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1,),
    image_size=128,
    window_size=4,
    prompt_embed_dim=32,
    decoder_mlp_dim=64,
    iou_head_hidden_dim=32,
    name="micro",
)


def test_eval_end_to_end_and_cli(tmp_path, capsys):
    folder = tmp_path / "ds"
    path = write_coco(folder, count=2, seed=5, height=96, width=128, min_area=30)
    model = build_model(MICRO, seed=0)
    metrics = evaluate_coco(model, path, folder / "images", max_images=1, points_per_side=4)
    assert set(METRIC_KEYS) <= set(metrics) and metrics["images"] == 1
    assert metrics["masks"] == sum(
        1 for a in json.loads(path.read_text())["annotations"] if a["image_id"] == 0
    )
    for key in ("one_click_miou_best", "one_click_miou_top1", "box_miou", "ar100", "ar1000"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["one_click_miou_best"] >= metrics["one_click_miou_top1"]
    assert 1.0 <= metrics["noc85"] <= metrics["noc90"] <= 20.0
    assert "NoC@90" in format_table(metrics)

    checkpoint = tmp_path / "micro.pt"
    save_checkpoint(model, str(checkpoint))
    argv = [
        "eval",
        "--annotations",
        str(path),
        "--images",
        str(folder / "images"),
        "--checkpoint",
        str(checkpoint),
        "--max-images",
        "1",
        "--points-per-side",
        "4",
    ]
    assert main([*argv, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # pytest.approx compares flat mappings: the per-category AP dict on its own.
    flat = dict(metrics)
    per_category = flat.pop("box_prompt_ap_per_category")
    assert printed.pop("box_prompt_ap_per_category") == {
        name: pytest.approx(values) for name, values in per_category.items()
    }
    assert printed == pytest.approx(flat)
    assert (
        main(
            [
                "eval",
                "--annotations",
                str(tmp_path / "none.json"),
                "--images",
                "x",
                "--checkpoint",
                str(checkpoint),
            ]
        )
        == 2
    )
