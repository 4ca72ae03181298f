"""COCO import and COCO / SA-1B export, on local and memory:// stores."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskmill.storage import (
    BadImageError,
    Catalog,
    CocoFormatError,
    GroundTruthConflictError,
    MaskSizeError,
    MissingImageError,
    Store,
    ValidationErrors,
    export_coco,
    export_sa1b,
    import_coco,
)
from tests.test_storage_data import STORE_KINDS, empty_store, make_coco, snapshot


@pytest.fixture(params=STORE_KINDS)
def store(request, tmp_path) -> Iterator[Store]:
    yield from empty_store(request.param, tmp_path)


def _counts(s: Store) -> tuple[int, int, int]:
    with Catalog(s) as catalog:
        return catalog.con.execute(
            "SELECT (SELECT count(*) FROM images), (SELECT count(*) FROM masks), "
            "(SELECT count(DISTINCT mask_id) FROM masks)"
        ).fetchone()


def _masks(s: Store) -> list[tuple]:
    with Catalog(s) as catalog:
        return catalog.con.execute(
            "SELECT m.mask_id, i.uri, m.segmentation, m.height, m.width, m.area, m.bbox, "
            "m.category, m.iscrowd FROM masks m JOIN images i USING (image_id) ORDER BY mask_id"
        ).fetchall()


def test_import_twice_gives_same_counts(tmp_path, store):
    annotations, images, data = make_coco(tmp_path)
    first = import_coco(str(annotations), str(images), store)
    assert (first.images, first.masks) == (4, 6)
    assert _counts(store) == (4, 6, 6)
    before = _masks(store)
    import_coco(str(annotations), str(images), store)
    assert _counts(store) == (4, 6, 6)
    assert _masks(store) == before  # same ids, same RLEs: the shard was replaced, not added
    with Catalog(store) as catalog:
        assert catalog.query("SELECT DISTINCT round, stage, source FROM masks")[1] == [
            (0, "gt", "gt")
        ]
        assert catalog.query("SELECT count(*) FROM rounds")[1] == [(1,)]


def test_stored_masks_match_pycocotools(tmp_path, store):
    """Each stored RLE is what pycocotools' COCO API makes of the annotation; area and bbox
    are pycocotools' area and toBbox of the stored RLE."""
    annotations, images, _ = make_coco(tmp_path)
    import_coco(str(annotations), str(images), store)
    coco = COCO(str(annotations))
    with Catalog(store) as catalog:
        rows = catalog.con.execute(
            "SELECT i.uri, m.segmentation, m.height, m.width, m.area, m.bbox, m.iscrowd "
            "FROM masks m JOIN images i USING (image_id)"
        ).fetchall()
    stored = Counter()
    for uri, counts, h, w, area, bbox, _ in rows:
        rle = {"size": [h, w], "counts": counts.encode()}
        assert area == int(mask_utils.area(rle))
        assert np.allclose(bbox, mask_utils.toBbox(rle))
        stored[(uri.rsplit("images/", 1)[1], counts)] += 1
    expected = Counter()
    for ann in coco.dataset["annotations"]:
        rle = coco.annToRLE(ann)
        counts = rle["counts"] if isinstance(rle["counts"], bytes) else None
        if counts is None:  # compressed input already
            counts = rle["counts"].encode()
        expected[(coco.imgs[ann["image_id"]]["file_name"], counts.decode())] += 1
    assert stored == expected
    assert sorted(r[-1] for r in rows) == [False] * 5 + [True]


def test_export_import_round_trip(tmp_path, store):
    annotations, images, _ = make_coco(tmp_path)
    import_coco(str(annotations), str(images), store)
    exported = tmp_path / "export.json"
    assert export_coco(store, str(exported)) == {"images": 4, "masks": 6, "images_without_masks": 1}

    again = Store(str(tmp_path / "again"))
    import_coco(str(exported), str(images), again)
    assert _masks(again) == _masks(store)  # same mask ids, RLEs, areas, boxes, classes


def test_exported_coco_loads_and_scores(tmp_path, store):
    annotations, images, _ = make_coco(tmp_path)
    import_coco(str(annotations), str(images), store)
    out = tmp_path / "export.json"
    export_coco(store, str(out))
    gt = COCO(str(out))
    assert len(gt.getAnnIds()) == 6 and len(gt.getImgIds()) == 4
    assert {c["name"] for c in gt.loadCats(gt.getCatIds())} == {"nut", "fig"}
    assert {img["file_name"] for img in gt.loadImgs(gt.getImgIds())} == {
        "a.png",
        "b.png",
        "sub/c.png",
        "d.png",
    }
    results = gt.loadRes(json.loads(out.read_text())["annotations"])  # needs "score"
    evaluation = COCOeval(gt, results, "segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


def test_sa1b_export(tmp_path, store):
    annotations, images, _ = make_coco(tmp_path)
    import_coco(str(annotations), str(images), store)
    out = (
        f"{store.url.rstrip('/')}-sa1b"
        if store.url.startswith("memory")
        else str(tmp_path / "sa1b")
    )
    # d.png has no masks: kept (an empty annotations list) unless asked to leave it out
    assert export_sa1b(store, out, keep_images_without_masks=False) == {
        "images": 3,
        "masks": 6,
        "images_without_masks": 1,
    }
    fs, root = fsspec.core.url_to_fs(out)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(root, detail=False))
    assert names == ["a.json", "b.json", "c.json"]
    assert export_sa1b(store, out)["images"] == 4
    assert json.loads(fs.cat_file(f"{root}/d.json"))["annotations"] == []
    doc = json.loads(fs.cat_file(f"{root}/a.json"))
    assert doc["image"]["width"] == 64 and doc["image"]["file_name"] == "a.png"
    assert len(doc["annotations"]) == 3
    stored = {r[0]: r[2] for r in _masks(store)}
    for ann in doc["annotations"]:
        assert ann["segmentation"]["counts"] == stored[ann["id"]]
        assert set(ann) >= {
            "area",
            "bbox",
            "predicted_iou",
            "point_coords",
            "stability_score",
            "crop_box",
        }


# -- malformed input: a named error, and the store unchanged --------------------------------
def _broken(tmp_path, change) -> tuple[str, str]:
    annotations, images, data = make_coco(tmp_path / "bad")
    change(data, images)
    annotations.write_text(json.dumps(data))
    return str(annotations), str(images)


def _remove_image(data, images):
    (images / "b.png").unlink()


def _truncate_image(data, images):
    # PIL opens it and reads its size (the header is whole), but decoding fails
    path = images / "sub" / "c.png"
    path.write_bytes(path.read_bytes()[:-200])


def _rle_size(data, images):
    data["annotations"][2]["segmentation"]["size"] = [47, 64]


def _image_size(data, images):
    data["images"][0]["width"] = 65


def _bad_polygon(data, images):
    data["annotations"][1]["segmentation"] = [[1, 2, 3]]


def _unknown_image(data, images):
    data["annotations"][3]["image_id"] = 99


def _bad_counts(data, images):
    data["annotations"][2]["segmentation"]["counts"] = "0a"


@pytest.mark.parametrize(
    ("change", "error", "names"),
    [
        (_remove_image, MissingImageError, ["images[1]", "'b.png'", "not found"]),
        (_truncate_image, BadImageError, ["images[2]", "'sub/c.png'", "c.png: truncated: "]),
        (_rle_size, MaskSizeError, ["annotations[2]", "id=13", "47x64", "48x64"]),
        (_image_size, MaskSizeError, ["images[0]", "'a.png'", "65x48", "64x48"]),
        (_bad_polygon, CocoFormatError, ["annotations[1]", "id=12", "polygon 0"]),
        (_unknown_image, CocoFormatError, ["annotations[3]", "image_id 99"]),
        (_bad_counts, CocoFormatError, ["annotations[2]", "id=13", "compressed RLE"]),
    ],
)
def test_malformed_input_is_named_and_store_unchanged(tmp_path, store, change, error, names):
    annotations, images, _ = make_coco(tmp_path)
    import_coco(str(annotations), str(images), store)
    before = snapshot(store)
    bad_annotations, bad_images = _broken(tmp_path, change)
    with pytest.raises(error) as caught:
        import_coco(bad_annotations, bad_images, store)
    for name in names:
        assert name in str(caught.value)
    assert snapshot(store) == before


def test_invalid_json_names_the_place(tmp_path, store):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [], "annotations": [}')
    with pytest.raises(CocoFormatError, match=r"bad\.json: not valid JSON.*line 1 column 32"):
        import_coco(str(bad), str(tmp_path), store)
    assert snapshot(store) == {}
    bad.write_text('{"images": []}')
    with pytest.raises(CocoFormatError, match="'annotations' is missing"):
        import_coco(str(bad), str(tmp_path), store)


def test_every_problem_is_listed(tmp_path, store):
    def several(data, images):
        _remove_image(data, images)
        _rle_size(data, images)
        _bad_polygon(data, images)

    annotations, images = _broken(tmp_path, several)
    with pytest.raises(ValidationErrors) as caught:
        import_coco(annotations, images, store)
    kinds = [type(e) for e in caught.value.errors]
    assert kinds == [MissingImageError, CocoFormatError, MaskSizeError]
    assert "3 problem(s), nothing was written" in str(caught.value)
    assert snapshot(store) == {}


def test_overlapping_import_is_refused(tmp_path, store):
    """A second file giving an image ground truth again is refused, naming the entry."""
    annotations, images, data = make_coco(tmp_path)
    import_coco(str(annotations), str(images), store)
    before = snapshot(store)
    data["images"] = data["images"][:2]  # a different file: a.png and b.png only
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] <= 2]
    subset = tmp_path / "subset.json"
    subset.write_text(json.dumps(data))
    with pytest.raises(ValidationErrors) as caught:
        import_coco(str(subset), str(images), store)
    assert [type(e) for e in caught.value.errors] == [GroundTruthConflictError] * 2
    assert "images[0] (id=1, file_name='a.png'): already has ground truth" in str(caught.value)
    assert snapshot(store) == before


def test_storage_imports_neither_prefect_nor_ray():
    import subprocess
    import sys

    code = (
        "import sys, storage, storage.plots; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'ray'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- polygons off the image, bad images: refused or reported, never stored silently ---------
def _polygon_outside(data, images):
    data["annotations"][4]["segmentation"] = [[100, 10, 120, 10, 110, 30]]  # b.png is 80x60


def _polygon_degenerate(data, images):
    data["annotations"][5]["segmentation"] = [[1, 1, 2, 2, 3, 3]]  # on one line


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            _polygon_outside,
            "annotations[4] (id=22, image_id=2): the polygon lies wholly outside the 80x60 "
            "(w x h) image (x 100..120, y 10..30): its mask is empty",
        ),
        (
            _polygon_degenerate,
            "annotations[5] (id=31, image_id=3): the polygon covers no pixel (degenerate): "
            "its mask is empty",
        ),
    ],
    ids=["outside", "degenerate"],
)
def test_polygon_covering_no_pixel_is_refused(tmp_path, store, change, words):
    """Once stored as an empty mask (area 0, bbox 0); now a named error, nothing written."""
    annotations, images = _broken(tmp_path, change)
    with pytest.raises(CocoFormatError) as caught:
        import_coco(annotations, images, store)
    assert str(caught.value) == words
    assert snapshot(store) == {}


def _polygons_past_the_edge(data, images):
    data["annotations"][0]["segmentation"] = [[-10, 2, 20, 3, 18, 25, 4, 20]]  # a.png 64x48
    data["annotations"][5]["segmentation"] = [[40, 40, 70, 40, 45, 49]]  # c.png 50x50


def _import_coco_cli(annotations: str, images: str, store: str) -> subprocess.CompletedProcess:
    """``maskmill import-coco``, the real entry point, in a subprocess."""
    command = [sys.executable, "-m", "maskmill.flows.cli", "import-coco"]
    command += ["--annotations", annotations, "--images", images, "--store", store]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_clipped_polygons_are_counted_and_printed(tmp_path):
    annotations, images = _broken(tmp_path, _polygons_past_the_edge)
    store = Store(str(tmp_path / "store"))
    result = import_coco(annotations, images, store)
    assert (result.images, result.masks, result.clipped) == (4, 6, 2)
    polygon = json.loads(Path(annotations).read_text())["annotations"][0]["segmentation"]
    on_image = int(mask_utils.area(mask_utils.frPyObjects(polygon, 48, 64)[0]))
    with Catalog(store) as catalog:
        areas = [a for (a,) in catalog.con.execute("SELECT area FROM masks").fetchall()]
    assert on_image > 0 and on_image in areas and 0 not in areas  # clipped, not emptied
    again = str(tmp_path / "again")
    out = _import_coco_cli(annotations, images, again)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        f"imported 4 images and 6 masks as ground truth (round 0, stage gt) into {again}; "
        "2 polygon mask(s) reached past their image's edge and were clipped to it\n"
    )
    unclipped, images_ok, _ = make_coco(tmp_path / "ok")
    assert import_coco(str(unclipped), str(images_ok), Store(str(tmp_path / "s3"))).clipped == 0


def test_import_coco_cli_refuses_truncated_jpeg_and_tiny_image(tmp_path):
    """Images are validated once, at import, by the stages' own reader: a truncated JPEG and a
    1x1 image are named errors of the command and the store is not created."""
    annotations, images, data = make_coco(tmp_path)
    rgb = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(images / "cut.jpg", quality=90)
    jpeg = (images / "cut.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # the header is whole
    Image.fromarray(rgb[:1, :1]).save(images / "dot.png")
    data["images"] += [{"id": 5, "file_name": "cut.jpg"}, {"id": 6, "file_name": "dot.png"}]
    annotations.write_text(json.dumps(data))
    store = tmp_path / "store"
    out = _import_coco_cli(str(annotations), str(images), str(store))
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.splitlines()
    at = lines.index(
        f"maskmill import-coco: {annotations}: 2 problem(s), nothing was written to the store:"
    )
    assert lines[at + 1].startswith(
        f"  - BadImageError: images[4] (id=5, file_name='cut.jpg'): {images}/cut.jpg: truncated: "
    )
    assert lines[at + 2] == (
        f"  - BadImageError: images[5] (id=6, file_name='dot.png'): {images}/dot.png: too_small: "
        "1x1 pixels; maskmill needs at least 8x8"
    )
    assert not store.exists()
