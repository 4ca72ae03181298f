"""The questions the engine asks storage (``storage.queries``), on local and memory:// stores,
and the rule that engine/ asks them instead of naming files or writing SQL."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maskmill.engine.report import rounds_table
from maskmill.engine.stages import stage_metrics
from maskmill.storage import Catalog, StageWriter, Store, rle
from maskmill.storage.images import ImageInfo, images_table
from maskmill.storage.queries import (
    existing_masks,
    image_infos,
    images_done,
    learning_curves,
    stage_figures,
    stage_progress,
    training_set,
)
from maskmill.storage.writer import masks_table, utc_now
from tests.test_storage_data import STORE_KINDS, empty_store, snapshot

IDS = ("A", "B", "C", "D")


@pytest.fixture(params=STORE_KINDS)
def store(request, tmp_path) -> Iterator[Store]:
    yield from empty_store(request.param, tmp_path)


def _mask(image: str, top: int, side: int) -> dict:
    """A side x side square at (top, top) on a 40 x 50 (H x W) image."""
    mask = np.zeros((40, 50), bool)
    mask[top : top + side, top : top + side] = True
    return {"image_id": image, "segmentation": rle.encode(mask)}


def _images(store: Store) -> None:
    infos = [
        ImageInfo(image_id=i, uri=f"file:///{i}.png", height=40, width=50, sha256=i * 64)
        for i in IDS
    ]
    store.write_shard("images", images_table(infos, utc_now()), "test")


def _write(store: Store, round_: int, stage: str, masks: dict[str, list[tuple[int, int]]]):
    """One shard per image of ``masks`` (image -> [(top, side), ...]; [] = done, no masks)."""
    with StageWriter(store, round_, stage) as writer:
        for image, squares in masks.items():
            records = [_mask(image, top, side) for top, side in squares]
            writer.write_masks(image, records, source="gt" if stage == "gt" else "model")
        writer.finish()


def _fill(store: Store) -> None:
    """Ground truth on A and B; round 1 manual: A 2 masks, B none; round 2 semi: C 1 mask;
    round 3 auto: A 1, D 1."""
    _images(store)
    _write(store, 0, "gt", {"A": [(0, 9)], "B": [(1, 9)]})
    _write(store, 1, "manual", {"A": [(2, 5), (10, 6)], "B": []})
    _write(store, 2, "semi", {"C": [(3, 7)]})
    _write(store, 3, "auto", {"A": [(20, 8)], "D": [(4, 4)]})


def _counts(rles: list[dict]) -> list[str]:
    return [r["counts"] for r in rles]


def test_existing_masks_batched_is_the_same_as_one_image_at_a_time(store):
    _fill(store)
    ids = list(IDS) + ["unknown"]
    batched = existing_masks(store, ids, before_round=3)
    assert list(batched) == ids
    for image_id in ids:
        assert batched[image_id] == existing_masks(store, [image_id], 3)[image_id]
    # ground truth never counts; round 3 (auto) is not before round 3
    assert [len(batched[i]) for i in ids] == [2, 0, 1, 0, 0]
    # A's masks in mask-id order, as written in round 1
    written = [_mask("A", 2, 5)["segmentation"], _mask("A", 10, 6)["segmentation"]]
    order = sorted(range(2), key=lambda index: rle.mask_id("A", 1, "manual", index))
    assert _counts(batched["A"]) == _counts([written[i] for i in order])
    assert batched["C"][0]["size"] == [40, 50]
    # an open catalog answers the same, and later rounds see the later masks
    with Catalog(store) as catalog:
        assert existing_masks(catalog, ids, 3) == batched
        assert [len(v) for v in existing_masks(catalog, ids, 4).values()] == [3, 0, 1, 1, 0]
    assert existing_masks(store, [], 3) == {}


def test_images_done_counts_an_image_finished_with_no_masks(store):
    """One definition of a round's images: the rounds row, the stage's metrics and
    ``maskmill run``'s table all count B, which finished round 1 with zero masks."""
    _fill(store)
    assert images_done(store, 1, "manual") == ["A", "B"]
    assert images_done(store, 0, "gt") == ["A", "B"]  # one shard of several images
    figures = stage_figures(store, 1, "manual")
    assert (figures["images"], figures["masks"], figures["failures"]) == (2, 2, 0)
    by_stage = {(r["round"], r["stage"]): r for r in learning_curves(store)}
    assert sorted(by_stage) == [(1, "manual"), (2, "semi"), (3, "auto")]  # no ground truth
    assert (by_stage[1, "manual"]["images"], by_stage[1, "manual"]["masks"]) == (2, 2)
    assert stage_metrics(figures, "manual", {})["images"] == 2
    assert [r["images"] for r in rounds_table(store)] == [2, 1, 2]


def test_failures_are_not_done(store):
    _images(store)
    with StageWriter(store, 1, "auto") as writer:
        writer.write_masks("A", [_mask("A", 0, 5)])
        writer.write_failures("B", [{"image_id": "B", "uri": "file:///B.png", "error": "x"}])
        row = writer.finish()
    assert row["images"] == 1 and images_done(store, 1, "auto") == ["A"]
    assert stage_figures(store, 1, "auto")["failures"] == 1


# Columns added to the masks schema after the first shards were written: an old shard lacks them.
LATER_COLUMNS = ("strokes", "stroke_seconds", "model_iou", "score")


def _annotated(image: str, clicks: int, strokes: int, model_iou: float) -> dict:
    """An annotator's mask of ``image``: ``clicks`` clicks, ``strokes`` strokes, 2 s."""
    return {
        **_mask(image, 0, 5),
        "source": "web:ana",
        "clicks": [[1.0, 1.0, 1]] * clicks,
        "seconds": 2.0,
        "strokes": strokes,
        "stroke_seconds": 0.5 * strokes,
        "model_iou": model_iou,
    }


def _write_raw(store: Store, table: str, path: str, data: bytes) -> None:
    """Put a file at ``path`` as it is (an old writer's shard; a damaged one)."""
    store.fs.makedirs(store.fs._parent(path), exist_ok=True)
    store.fs.pipe_file(path, data)


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("old_keys", [("0old",), ("zold",), ("A", "B")])
def test_stage_figures_read_only_their_partition_whatever_the_schemas(store, old_keys):
    """A stage's figures read its own partition only: a damaged shard of another round (which
    a read of the whole table would choke on) changes nothing. Shards written before columns
    were added to the schema (``old_keys``: sorted before the new shard, after it, or all of
    the partition) count with those columns null."""
    _images(store)
    new = [] if old_keys == ("A", "B") else [_annotated("A", 2, 3, 0.5), _annotated("A", 1, 1, 0.7)]
    with StageWriter(store, 1, "manual") as writer:
        if new:
            writer.write_masks("A", new)
    for index, key in enumerate(old_keys):
        record = {**_annotated(key if key in IDS else "B", 3, 9, 0.1), "index": index}
        table = masks_table([record], 1, "manual").drop_columns(list(LATER_COLUMNS))
        _write_raw(store, "masks", store.shard_path("masks", key, 1, "manual"), _parquet(table))
    # Other rounds' shards: a sound one, and one that is no Parquet file at all (a read of the
    # whole table fails on it).
    _write(store, 2, "manual", {"C": [(0, 5)]})
    _write_raw(store, "masks", store.shard_path("masks", "D", 9, "manual"), b"not parquet")

    figures = stage_figures(store, 1, "manual")
    old = len(old_keys)
    assert figures["masks"] == len(new) + old
    assert figures["annotated"] == len(new) + old
    assert figures["clicks"] == (3 if new else 0) + 3 * old
    assert figures["strokes"] == (4 if new else 0)  # old shards have none recorded
    assert figures["model_iou_mean"] == (pytest.approx(0.6) if new else None)
    assert figures["seconds"] == pytest.approx(2.0 * (len(new) + old))
    assert figures["no_click_masks"] == 0 and figures["model_masks"] == 0
    assert images_done(store, 1, "manual") == ["A", "B"] and figures["images"] == 2
    assert stage_figures(store, 2, "manual")["masks"] == 1
    empty = stage_figures(store, 5, "auto")
    assert (empty["images"], empty["masks"], empty["model_iou_mean"]) == (0, 0, None)


def test_a_finished_stage_s_row_is_returned_only_while_it_is_up_to_date(store):
    """StageWriter.finished_row: the stored row, as finish returned it, while every image is
    done and nothing was committed after the row; None otherwise, so the stage counts again."""
    _images(store)
    ids = ["A", "B", "C"]
    with StageWriter(store, 1, "auto") as writer:
        assert writer.finished_row(ids) is None  # nothing done
        writer.write_masks("A", [_mask("A", 0, 5)])
        writer.write_masks("B", [])
        writer.write_failures("C", [{"image_id": "C", "uri": "file:///C.png", "error": "x"}])
        row = writer.finish(model_version=1, metrics={"seconds": 1.0})
        # C failed: a rerun tries it again, so the stage is not finished for these ids.
        assert writer.finished_row(ids) is None
        assert writer.finished_row(ids[:2]) == row
        assert writer.finished_row([]) == row
        time.sleep(0.05)  # the next commit is later than the row by the store's clock
        writer.write_masks("C", [_mask("C", 1, 5), _mask("C", 2, 5)])
        assert writer.finished_row(ids) is None  # C committed after the row: not counted
        assert writer.finished_row(ids[:2]) is None
        row = writer.finish(model_version=1)
        assert writer.finished_row(ids) == row
        assert (row["images"], row["masks"]) == (3, 3)
        time.sleep(0.05)
        writer.write_failures("D", [{"image_id": "D", "uri": "file:///D.png", "error": "x"}])
        assert writer.finished_row(ids) is None  # a failure after the row: counted again
        row = writer.finish(model_version=1)
        assert writer.finished_row(ids) == row
        # A row that missed an image committed while it was being counted (another writer's)
        # is newer than every shard, but counts fewer images than are done: counted again.
        figures = stage_figures(store, 1, "auto")
        writer.write_masks("D", [])
        time.sleep(0.05)
        row = writer.finish(model_version=1, figures=figures)
        assert row["images"] == 3 and writer.finished_row(ids) == row
        assert writer.finished_row([*ids, "D"]) is None

    def unlocked() -> dict[str, bytes]:
        return {path: data for path, data in snapshot(store).items() if "/locks/" not in path}

    before = unlocked()
    with StageWriter(store, 1, "auto") as writer:
        assert writer.finished_row(ids) == row
    assert unlocked() == before  # asking changed nothing
    with StageWriter(store, 1, "manual", shared=True) as writer:
        assert writer.finished_row([]) is None  # no row for this stage


def test_image_infos_and_training_set(store):
    _fill(store)
    infos = image_infos(store)
    assert list(infos) == list(IDS)
    assert infos["B"] == ImageInfo(
        image_id="B", uri="file:///B.png", height=40, width=50, sha256="B" * 64
    )
    samples = training_set(store, ("gt", "manual"), before_round=2, exclude=["B"], min_mask_area=30)
    # A: ground truth (81 px) and manual (36 px; the 25 px one is under min_mask_area)
    assert [(s["image_id"], s["uri"], len(s["masks"])) for s in samples] == [
        ("A", "file:///A.png", 2)
    ]
    assert samples[0]["round"] == 1  # the newest round of its masks (ground truth is 0)
    only = training_set(store, ("gt", "manual"), before_round=2, only=["B"], min_mask_area=30)
    assert [s["image_id"] for s in only] == ["B"]
    assert training_set(store, ("gt",), before_round=2, only=[], min_mask_area=1) == []


def test_stage_progress(store):
    _fill(store)
    with StageWriter(store, 4, "manual") as writer:  # started, no rounds row yet
        writer.write_masks("B", [_mask("B", 0, 5)])
    started, finished = stage_progress(store)
    assert started == {(1, "manual"), (2, "semi"), (3, "auto"), (4, "manual")}
    assert finished == {(0, "gt"), (1, "manual"), (2, "semi"), (3, "auto")}


def test_engine_asks_storage_and_never_names_a_file():
    """engine/ holds no SQL, no Parquet read and no shard name or glob: storage/ owns them."""
    engine = Path(__file__).resolve().parents[1] / "engine"
    pattern = re.compile(r"part-|read_parquet|SELECT|glob\(")
    hits = [
        f"{path.relative_to(engine.parent)}:{number}: {line.strip()}"
        for path in sorted(engine.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert hits == []
