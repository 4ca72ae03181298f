"""The data engine's learning curves: per round, annotation cost per mask, how much of the
model's mask survived correction, masks per image, and the held-out quality of the model each
round used and produced; as a query, a table, a PNG and the CLI's `stats --plot`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from maskmill.engine.report import format_rounds, rounds_table
from maskmill.flows.cli import main
from maskmill.storage import StageWriter, Store, rle
from maskmill.storage.images import ImageInfo
from maskmill.storage.plots import plot_learning_curves
from maskmill.storage.queries import learning_curves


def _mask(offset: int) -> dict:
    mask = np.zeros((40, 60), bool)
    mask[offset : offset + 10, offset : offset + 12] = True
    return rle.encode(mask)


def _annotated(image: str, index: int, seconds: float, clicks: int, strokes: int, iou: float):
    return {
        "image_id": image,
        "index": index,
        "segmentation": _mask(index * 3),
        "clicks": [[5.0, 5.0, 1]] * clicks,
        "seconds": seconds,
        "strokes": strokes,
        "stroke_seconds": 2.0 * strokes,
        "model_iou": iou,
        "source": "simulated",
    }


def _model(store: Store, version: int, round_: int, miou: float, noc90: float, **extra) -> None:
    meta = {"round": round_, "metrics": {"heldout_miou": miou, "heldout_noc90": noc90}, **extra}
    store.write_model(version, b"weights", meta)


@pytest.fixture()
def store(tmp_path) -> Store:
    """Two manual rounds and a semi round with known figures, models v1..v3."""
    store = Store(str(tmp_path / "store"))
    with StageWriter(store, 0, "ingest") as writer:
        infos = [
            ImageInfo(image_id=i, uri=f"/{i}.png", height=40, width=60, sha256=i * 64)
            for i in "abcde"
        ]
        writer.write_images("images", infos)
    _model(store, 1, 0, 0.50, 15.0)
    _model(store, 2, 1, 0.60, 12.0, promoted=True)
    _model(store, 3, 2, 0.58, 13.0, promoted=False)
    rounds = {
        1: (
            "manual",
            1,
            [("a", [(30.0, 6, 3, 0.5), (20.0, 4, 1, 0.7)]), ("b", [(10.0, 2, 0, 1.0)])],
        ),
        2: ("manual", 2, [("c", [(12.0, 2, 1, 0.8), (8.0, 1, 0, 0.9)]), ("d", [])]),
    }
    for round_, (stage, version, images) in rounds.items():
        with StageWriter(store, round_, stage) as writer:
            for image, masks in images:
                records = [_annotated(image, i, *m) for i, m in enumerate(masks)]
                writer.write_masks(image, records, model_version=version)
            writer.finish(model_version=version, metrics={"prefill_kept": 0})
    with StageWriter(store, 3, "semi") as writer:
        prefill = {"image_id": "e", "index": 0, "segmentation": _mask(0), "source": "model"}
        writer.write_masks("e", [prefill, _annotated("e", 1, 6.0, 1, 0, 0.95)], model_version=2)
        writer.finish(model_version=2, metrics={"prefill_kept": 1})
    return store


def test_learning_curves_count_what_is_stored(store):
    rows = {(r["round"], r["stage"]): r for r in learning_curves(store)}
    assert list(rows) == [(1, "manual"), (2, "manual"), (3, "semi")]
    first, second, semi = rows.values()
    assert first["images"] == 2 and first["masks"] == 3 and first["masks_per_image"] == 1.5
    assert first["annotated"] == 3
    assert first["seconds_per_mask"] == pytest.approx(20.0)
    assert first["clicks_per_mask"] == pytest.approx(4.0)
    assert first["strokes_per_mask"] == pytest.approx(4 / 3)
    assert first["model_iou"] == pytest.approx((0.5 + 0.7 + 1.0) / 3)
    # An image finished with no masks counts among the images of its round.
    assert second["images"] == 2 and second["masks"] == 2 and second["masks_per_image"] == 1.0
    # The model each round used (v1, v2) and the one trained after it (meta round = the round).
    assert (first["used_miou"], first["used_noc90"]) == (0.50, 15.0)
    assert (first["produced_version"], first["produced_miou"]) == (2, 0.60)
    assert first["produced_promoted"] is True
    assert (second["produced_version"], second["produced_promoted"]) == (3, False)
    # Semi: the kept pre-fill (source model) is a mask of the image, not an annotated one.
    assert semi["masks"] == 2 and semi["annotated"] == 1
    assert semi["seconds_per_mask"] == pytest.approx(6.0)
    assert semi["produced_version"] is None
    assert semi["metrics"] == {"prefill_kept": 1}


def test_the_plot_is_one_png_with_six_panels(store, tmp_path):
    from maskmill.storage import Catalog

    with Catalog(store) as catalog:
        png = plot_learning_curves(catalog, str(tmp_path / "plots"))
    image = Image.open(png)
    assert png.endswith("learning_curves.png") and image.size[0] > 1000 and image.size[1] > 600
    # Not blank: the curves put colour on a white figure.
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    coloured = (pixels.max(axis=1) - pixels.min(axis=1)) > 60
    assert coloured.mean() > 0.002


def test_the_rounds_table_and_cli_show_the_curves(store, tmp_path, capsys):
    rows = rounds_table(store)
    assert [r["round"] for r in rows] == [1, 2, 3]
    text = format_rounds(rows)
    header = text.splitlines()[0]
    for title in ("s/mask", "clicks/mask", "strokes/mask", "model IoU", "mIoU used"):
        assert title in header
    assert main(["stats", "--store", store.url, "--plot", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "learning_curves.png").is_file()
    assert json.loads(json.dumps(rows, default=str))  # JSON-able for the Prefect artifact
