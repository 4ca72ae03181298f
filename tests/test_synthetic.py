"""The synthetic seed dataset: deterministic scenes with exact instance and part masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from maskmill.engine.training.synthetic import (
    CATEGORY_OBJECT,
    CATEGORY_PART,
    photo_like,
    scene,
    write_coco,
)


def test_photo_like_is_kept():
    image = photo_like(60, 80, seed=1)
    assert image.shape == (60, 80, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, photo_like(60, 80, seed=1))


def test_scene_is_deterministic_by_seed():
    a, b, c = scene(96, 128, seed=5), scene(96, 128, seed=5), scene(96, 128, seed=6)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.instances, b.instances)
    assert len(a.parts) == len(b.parts)
    for pa, pb in zip(a.parts, b.parts, strict=True):
        np.testing.assert_array_equal(pa, pb)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("seed", range(6))
def test_masks_are_exact(seed):
    generated = scene(128, 160, seed=seed)
    assert generated.image.shape == (128, 160, 3)
    instances = generated.instances
    assert instances.dtype == bool and instances.shape[1:] == (128, 160)
    assert len(generated.parts) == len(instances)
    # Occlusion: a pixel shows one object only, and no listed object is hidden entirely.
    assert instances.sum(axis=0).max() <= 1
    assert instances.reshape(len(instances), -1).any(axis=1).all()
    for instance, parts in zip(instances, generated.parts, strict=True):
        if len(parts) == 0:
            continue
        assert len(parts) >= 2
        # Parts are disjoint, inside their whole, and cover it exactly.
        assert parts.sum(axis=0).max() <= 1
        assert not (parts & ~instance).any()
        np.testing.assert_array_equal(parts.any(axis=0), instance)


def test_some_scenes_have_parts_and_occlusion():
    with_parts = sum(any(len(p) for p in scene(128, 128, seed=s).parts) for s in range(10))
    assert with_parts >= 5
    # Painting the objects without occlusion would give more pixels than the visible masks.
    generated = scene(128, 128, seed=0, objects=(8, 8))
    assert len(generated.instances) >= 4


def test_mask_edges_are_image_edges():
    # The image changes across mask boundaries far more than inside objects.
    generated = scene(128, 128, seed=2)
    grey = generated.image.astype(np.float32).mean(axis=2)
    step = np.abs(np.diff(grey, axis=1))
    labels = np.zeros((128, 128), dtype=np.int32)
    for index, instance in enumerate(generated.instances, start=1):
        labels[instance] = index
    boundary = labels[:, 1:] != labels[:, :-1]
    assert step[boundary].mean() > 3 * step[~boundary].mean()


def test_all_masks_filters_by_area():
    generated = scene(128, 128, seed=3)
    masks = generated.all_masks(min_area=50)
    assert masks.shape[1:] == (128, 128)
    assert (masks.reshape(len(masks), -1).sum(axis=1) >= 50).all()
    expected = sum(m.sum() >= 50 for m in generated.instances)
    expected += sum(p.sum() >= 50 for parts in generated.parts for p in parts)
    assert len(masks) == expected


def test_scene_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least 16"):
        scene(8, 64)
    with pytest.raises(ValueError, match="objects"):
        scene(64, 64, objects=(3, 1))


def test_write_coco_round_trips(tmp_path):
    path = write_coco(tmp_path / "ds", count=3, seed=7, height=96, width=128, min_area=20)
    dataset = json.loads(path.read_text())
    assert [i["file_name"] for i in dataset["images"]] == ["000000.png", "000001.png", "000002.png"]
    coco = COCO(str(path))
    for image_id in range(3):
        generated = scene(96, 128, seed=7 + image_id)
        anns = coco.imgToAnns[image_id]
        objects = [a for a in anns if a["category_id"] == CATEGORY_OBJECT]
        kept = [m for m in generated.instances if m.sum() >= 20]
        assert len(objects) == len(kept)
        for ann, instance in zip(objects, kept, strict=True):
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), instance)
            x, y, w, h = ann["bbox"]
            rows, cols = np.nonzero(instance)
            assert (x, y, w, h) == (cols.min(), rows.min(), np.ptp(cols) + 1, np.ptp(rows) + 1)
            assert ann["area"] == instance.sum()
        for part in (a for a in anns if a["category_id"] == CATEGORY_PART):
            parent = coco.anns[part["parent_id"]]
            assert parent["category_id"] == CATEGORY_OBJECT
            inside = coco.annToMask(part).astype(bool) & ~coco.annToMask(parent).astype(bool)
            assert not inside.any()
    from PIL import Image

    image = np.asarray(Image.open(tmp_path / "ds" / "images" / "000001.png"))
    np.testing.assert_array_equal(image, scene(96, 128, seed=8).image)


def test_scenes_cli_writes_a_coco_dataset(tmp_path):
    from maskmill.flows.cli import main

    assert main(["scenes", "--out", str(tmp_path / "a"), "--count", "3", "--size", "96"]) == 0
    assert (
        main(["scenes", "--out", str(tmp_path / "b"), "--count", "3", "--size", "96", "--held-out"])
        == 0
    )
    data = json.loads((tmp_path / "a" / "instances.json").read_text())
    assert len(data["images"]) == 3 and len(list((tmp_path / "a" / "images").iterdir())) == 3
    assert {c["id"] for c in data["categories"]} == {1, 2}
    assert all(a["image_id"] in {i["id"] for i in data["images"]} for a in data["annotations"])
    # Held-out scenes come from other seeds: other pictures.
    held = (
        tmp_path / "b" / "images" / sorted(p.name for p in (tmp_path / "b" / "images").iterdir())[0]
    )
    first = tmp_path / "a" / "images" / held.name
    assert held.read_bytes() != first.read_bytes()
    assert main(["scenes", "--out", str(tmp_path / "c"), "--count", "0"]) == 2
