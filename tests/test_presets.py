"""Generator presets travel with the weights: the shipped model's, SAM's for official files, the
one reader every generator user goes through, and their re-calibration after a retrain."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from maskmill.engine.evaluate import calibrate_presets, proposal_quality
from maskmill.engine.stages import STAGE_GENERATOR, stage_generator
from maskmill.engine.training.synthetic import scene
from maskmill.model import (
    SAM_PRESETS,
    MaskGenerator,
    check_presets,
    generator_presets,
    load_checkpoint,
    load_default,
    save_checkpoint,
)


@pytest.fixture(scope="module")
def shipped():
    return load_default()


@pytest.fixture(scope="module")
def scenes():
    made = [scene(256, 256, seed=10_000_000 + i) for i in range(3)]
    return [(s.image, [mask_utils.encode(np.asfortranarray(m)) for m in s.instances]) for s in made]


def test_the_shipped_model_carries_its_calibrated_presets(shipped):
    presets = shipped.metadata["generator_presets"]
    assert set(presets) == {"auto", "semi"}
    assert presets["auto"] == {"pred_iou_thresh": 0.3, "stability_score_thresh": 0.6}
    # The semi pre-fill keeps only more confident masks than the automatic stage.
    assert presets["semi"]["pred_iou_thresh"] > presets["auto"]["pred_iou_thresh"]
    assert generator_presets(shipped) == presets


def test_an_official_file_gets_sams_presets(tmp_path, tiny_model):
    path = tmp_path / "official.pth"
    torch.save(tiny_model.state_dict(), path)  # a bare state dict: no metadata
    model = load_checkpoint(str(path))
    assert model.metadata == {}
    assert generator_presets(model) == SAM_PRESETS
    assert SAM_PRESETS["auto"] == {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}


def test_presets_survive_a_save_and_load(tmp_path, shipped):
    path = str(tmp_path / "copy.pt")
    save_checkpoint(shipped, path, metadata={"generator_presets": generator_presets(shipped)})
    assert generator_presets(load_checkpoint(path)) == generator_presets(shipped)


@pytest.mark.parametrize(
    ("presets", "message"),
    [
        ({"auto": {"pred_iou_thresh": 0.3, "stability_score_thresh": 0.6}}, r"\['semi'\]"),
        (
            {"auto": {"pred_iou_thresh": 1.5, "stability_score_thresh": 0.6}, "semi": {}},
            r"\['auto'\]\['pred_iou_thresh'\]: must be a number in \[0, 1\], got 1.5",
        ),
        (
            {
                "auto": {"pred_iou_thresh": 0.3, "stability_score_thresh": 0.6, "colour": 1},
                "semi": {"pred_iou_thresh": 0.3, "stability_score_thresh": 0.6},
            },
            r"\['colour'\] are not MaskGenerator parameters",
        ),
        ("0.88", "expected a dict"),
    ],
)
def test_malformed_presets_are_named(presets, message):
    with pytest.raises(ValueError, match=message):
        check_presets(presets)


def test_from_preset_uses_the_models_thresholds_and_overrides_win(shipped):
    generator = MaskGenerator.from_preset(shipped, "semi", points_per_side=4)
    assert generator.pred_iou_thresh == generator_presets(shipped)["semi"]["pred_iou_thresh"]
    override = MaskGenerator.from_preset(shipped, "auto", pred_iou_thresh=0.5)
    assert override.pred_iou_thresh == 0.5
    assert override.stability_score_thresh == 0.6
    with pytest.raises(ValueError, match="preset must be one of"):
        MaskGenerator.from_preset(shipped, "manual")


def test_the_stage_generator_is_the_grid_plus_the_models_preset(shipped):
    generator = stage_generator(shipped, "auto", {"stability_score_thresh": 0.1})
    assert generator.pred_iou_thresh == 0.3 and generator.stability_score_thresh == 0.1
    assert generator.max_mask_area_fraction == STAGE_GENERATOR["max_mask_area_fraction"]
    assert len(generator.point_grids[0]) == STAGE_GENERATOR["points_per_side"] ** 2


def test_a_threshold_no_mask_reaches_returns_no_records(shipped, scenes):
    """No batch survives the predicted-IoU filter: an empty list, not an error."""
    image = scenes[0][0]
    assert MaskGenerator(shipped, points_per_side=8, pred_iou_thresh=0.999).generate(image) == []
    assert (
        MaskGenerator(shipped, points_per_side=8, crop_n_layers=1, pred_iou_thresh=0.999).generate(
            image
        )
        == []
    )


def test_areas_counted_while_encoding_equal_pycocotools(shipped, scenes):
    records = MaskGenerator(
        shipped,
        points_per_side=8,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        min_mask_region_area=50,
    ).generate(scenes[1][0])
    assert len(records) > 20
    assert [r["area"] for r in records] == [
        int(a) for a in mask_utils.area([r["segmentation"] for r in records])
    ]


def test_calibrating_a_model_against_itself_keeps_its_quality(shipped, scenes):
    presets = generator_presets(shipped)
    grid = {**STAGE_GENERATOR, "points_per_side": 8}
    result = calibrate_presets(shipped, presets, scenes, grid, base=shipped, min_masks=3)
    lowest = min(p["stability_score_thresh"] for p in presets.values())
    predicted, stability, best = proposal_quality(shipped, scenes, grid, lowest)
    for name, preset in presets.items():
        bar = result.quality_bar[name]
        kept = (predicted > preset["pred_iou_thresh"]) & (
            stability >= preset["stability_score_thresh"]
        )
        assert bar == pytest.approx(best[kept].mean())
        assert result.report[name]["calibrated"]
        new = result.presets[name]
        # Its own bar is met at its own threshold, so the lowest threshold meeting it keeps at
        # least as many masks, and they meet the bar; it sits between two masks' scores.
        now = (predicted > new["pred_iou_thresh"]) & (stability >= preset["stability_score_thresh"])
        assert now.sum() == result.report[name]["masks"] >= kept.sum()
        assert best[now].mean() >= bar - 1e-9
        assert not np.isclose(predicted, new["pred_iou_thresh"]).any()
        assert new["stability_score_thresh"] == preset["stability_score_thresh"]


def test_an_unreachable_bar_keeps_the_base_presets(shipped, scenes):
    presets = generator_presets(shipped)
    grid = {**STAGE_GENERATOR, "points_per_side": 8}
    result = calibrate_presets(
        shipped, presets, scenes, grid, quality_bar={"auto": 1.01, "semi": 1.01}
    )
    assert result.presets == presets
    assert not any(r["calibrated"] for r in result.report.values())
