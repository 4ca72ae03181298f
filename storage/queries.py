"""The questions the engine asks a store, answered with DuckDB over its shards.

Every SQL string and shard name the engine needs lives here (or elsewhere in ``storage/``), so
``engine/`` asks questions and never names a file. Each function takes a :class:`Store` (or its
URL), and opens one catalog for its answer, or an open :class:`Catalog` to share one connection
between several questions. A catalog is a snapshot of the shard list when it was opened: pass a
store, not an old catalog, to see shards written since.

RLEs are COCO compressed RLE dicts ``{"size": [H, W], "counts": str}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from maskmill.storage.catalog import SHARDS, TABLES, Catalog
from maskmill.storage.images import ImageInfo
from maskmill.storage.schema import STAGE_GT, STAGES
from maskmill.storage.store import Store

# The stages a person or a model annotates: everything but imported ground truth (and ingest).
ANNOTATION_STAGES = tuple(s for s in STAGES if s != STAGE_GT)

# Masks nobody reviews: the model's own (kept semi pre-fill, the automatic stage, prompted by
# a detector's boxes) and ground truth. Every other source is a person's (or a simulated
# person's) work, which review judges.
UNREVIEWED_SOURCES = ("model", "gt", "detector")
# SQL condition on masks ``m``: a person's mask, which review judges.
REVIEWABLE = "m.source NOT IN ({})".format(", ".join(f"'{s}'" for s in UNREVIEWED_SOURCES))
# The verdict that stands for each reviewed mask: its newest one (at the same instant, the
# reviewer id last in order, so the choice is deterministic).
LATEST_VERDICTS = (
    "(SELECT * FROM reviews QUALIFY row_number() OVER "
    "(PARTITION BY mask_id ORDER BY reviewed_at DESC, reviewer DESC) = 1)"
)
_APPROVED = "(v.verdict = 'approved' OR v.correction IS NOT NULL)"
# Which masks count under each review rule (see reviewed_masks).
_REVIEW_RULES = {
    "covering": f"(v.mask_id IS NULL OR {_APPROVED})",
    "default": (
        f"(NOT {REVIEWABLE} OR {_APPROVED} OR (v.mask_id IS NULL AND NOT EXISTS "
        "(SELECT 1 FROM reviews r WHERE r.round = m.round AND r.stage = m.stage)))"
    ),
    "approved": f"(m.stage = '{STAGE_GT}' OR {_APPROVED})",
}


@contextmanager
def _opened(
    source: Store | str | Catalog, tables: Sequence[str] | None = None
) -> Iterator[Catalog]:
    """``source`` itself when it is a catalog (left open), else a catalog of it (of its
    ``tables`` only, when given), closed after."""
    if isinstance(source, Catalog):
        yield source
        return
    with Catalog(source, tables=TABLES if tables is None else tables) as catalog:
        yield catalog


def stage_key(round_: int, stage: str) -> str:
    """The shard key of a round and stage's rounds row; its failures shards' keys are this,
    a dash and the image id (or unit of work)."""
    return f"r{int(round_)}-{stage}"


# SQL: the ids of the images a round and stage has finished (:func:`images_done`), of the
# partition's shard keys (a parameter) and the image ids of ``{masks}``, its masks.
_DONE = (
    "SELECT image_id FROM images WHERE image_id IN (SELECT unnest(?)) "
    "UNION SELECT image_id FROM {masks}"
)


def _rle(counts: str, height: int, width: int) -> dict[str, Any]:
    return {"size": [int(height), int(width)], "counts": counts}


def reviewed_masks(masks: str = "masks", rule: str = "default") -> str:
    """SQL subquery (to alias ``m``): the rows of ``masks`` (the masks view, or a subquery of
    its columns) that count under review ``rule``, with a reviewer's correction (its RLE counts,
    area, box, and the reviewer as ``source``) in place of the mask it corrects.

    Each mask's verdict is its newest (:data:`LATEST_VERDICTS`); a corrected mask counts as
    approved. Rules:

    - ``covering``: what covers an object (the annotation queue's ``existing`` masks): every
      mask but a rejected one, so a rejected object is drawn again when its image is next
      annotated.
    - ``default`` (training and export): a round and stage without any verdict counts whole, as
      before review existed; in one with verdicts, a person's mask counts once approved. Masks
      of :data:`UNREVIEWED_SOURCES` always count.
    - ``approved``: only approved masks, and ground truth.
    """
    if rule not in _REVIEW_RULES:
        raise ValueError(f"review rule must be one of {sorted(_REVIEW_RULES)}, got {rule!r}")
    return (
        "(SELECT m.* REPLACE (coalesce(v.correction, m.segmentation) AS segmentation, "
        "coalesce(v.correction_area, m.area) AS area, "
        "coalesce(v.correction_bbox, m.bbox) AS bbox, "
        "CASE WHEN v.correction IS NULL THEN m.source ELSE v.reviewer END AS source) "
        f"FROM {masks} m LEFT JOIN {LATEST_VERDICTS} v ON v.mask_id = m.mask_id "
        f"WHERE {_REVIEW_RULES[rule]})"
    )


def image_infos(source: Store | str | Catalog) -> dict[str, ImageInfo]:
    """Every image of the store, by id (ids in sorted order)."""
    with _opened(source) as catalog:
        rows = catalog.con.execute(
            "SELECT image_id, uri, height, width, sha256 FROM images ORDER BY image_id"
        ).fetchall()
    return {
        image_id: ImageInfo(
            image_id=image_id, uri=uri, height=int(height), width=int(width), sha256=sha256
        )
        for image_id, uri, height, width, sha256 in rows
    }


def ground_truth(source: Store | str | Catalog) -> dict[str, list[dict[str, Any]]]:
    """Ground-truth RLEs (stage ``gt``, crowd regions left out) of every image that has some,
    by image id, each image's in stored order (shard, then row)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for image_id, counts, height, width in _ground_truth_rows(
        source, "segmentation, height, width"
    ):
        out.setdefault(image_id, []).append(_rle(counts, height, width))
    return out


def _ground_truth_rows(source: Store | str | Catalog, columns: str) -> list[tuple]:
    """``image_id`` and ``columns`` of every ground-truth mask (crowd regions left out), in
    stored order (shard, then row): the one order :func:`ground_truth` and
    :func:`ground_truth_categories` share, so their lists stay parallel."""
    with _opened(source) as catalog:
        if not catalog.store.shards("masks"):  # read_parquet of no file is an error
            return []
        return catalog.con.execute(
            f"SELECT image_id, {columns} FROM {catalog.scan('masks')} "
            "WHERE stage = ? AND NOT iscrowd ORDER BY image_id, filename, file_row_number",
            [STAGE_GT],
        ).fetchall()


def ground_truth_categories(source: Store | str | Catalog) -> dict[str, list[str | None]]:
    """The category name (or None) of each ground-truth mask of :func:`ground_truth`, by image
    id, in the same order."""
    out: dict[str, list[str | None]] = {}
    for image_id, category in _ground_truth_rows(source, "category"):
        out.setdefault(image_id, []).append(category)
    return out


def existing_masks(
    source: Store | str | Catalog, image_ids: Sequence[str], before_round: int
) -> dict[str, list[dict[str, Any]]]:
    """RLEs of the masks (ground truth left out) each of ``image_ids`` got in rounds before
    ``before_round``, in one query; every id is a key, ``[]`` when it has none.

    Review applies (:func:`reviewed_masks`, rule ``covering``): a rejected mask covers nothing,
    so its object is drawn again, and a reviewer's correction stands in its place. Each image's
    masks are ordered by round, stage and mask id.
    """
    out: dict[str, list[dict[str, Any]]] = {image_id: [] for image_id in image_ids}
    if not out:
        return out
    with _opened(source) as catalog:
        rows = catalog.con.execute(
            "SELECT image_id, segmentation, height, width "
            f"FROM {reviewed_masks(rule='covering')} m "
            "WHERE image_id IN (SELECT unnest(?)) AND round < ? AND stage <> ? "
            "ORDER BY image_id, round, stage, mask_id",
            [list(out), int(before_round), STAGE_GT],
        ).fetchall()
    for image_id, counts, height, width in rows:
        out[image_id].append(_rle(counts, height, width))
    return out


def training_set(
    source: Store | str | Catalog,
    stages: Sequence[str],
    before_round: int,
    exclude: Sequence[str] | None = None,
    min_mask_area: int = 64,
    only: Sequence[str] | None = None,
    approved_only: bool = False,
) -> list[dict[str, Any]]:
    """Images and masks to train on: ``[{"image_id", "uri", "round", "masks": [RLE, ...],
    "categories": [name | None, ...], "category_ids": [id | None, ...]}]`` by id (the two
    lists parallel to ``masks``); ``round`` is the newest round of the image's masks.

    Masks of ``stages`` from rounds before ``before_round`` (ground truth is round 0), at least
    ``min_mask_area`` pixels, crowd regions left out; images in ``exclude`` (held out) too, and
    with ``only`` given, every image not in it. Review applies (:func:`reviewed_masks`): rule
    ``default``, or ``approved`` with ``approved_only``. An image's masks are ordered by mask id.
    """
    masks = reviewed_masks(rule="approved" if approved_only else "default")
    with _opened(source) as catalog:
        rows = catalog.con.execute(
            "SELECT m.image_id, i.uri, m.round, m.segmentation, m.height, m.width, "
            "m.category, m.category_id "
            f"FROM {masks} m JOIN images i USING (image_id) WHERE m.stage IN (SELECT unnest(?)) "
            "AND m.round < ? AND m.area >= ? AND NOT m.iscrowd "
            "AND m.image_id NOT IN (SELECT unnest(?)) "
            "AND (? OR m.image_id IN (SELECT unnest(?))) ORDER BY m.image_id, m.mask_id",
            [
                list(stages),
                int(before_round),
                int(min_mask_area),
                list(exclude or []),
                only is None,
                list(only or []),
            ],
        ).fetchall()
    out: dict[str, dict[str, Any]] = {}
    for image_id, uri, round_, counts, height, width, category, category_id in rows:
        entry = out.setdefault(
            image_id,
            {
                "image_id": image_id,
                "uri": uri,
                "round": int(round_),
                "masks": [],
                "categories": [],
                "category_ids": [],
            },
        )
        entry["round"] = max(entry["round"], int(round_))
        entry["masks"].append(_rle(counts, height, width))
        entry["categories"].append(category)
        entry["category_ids"].append(None if category_id is None else int(category_id))
    return list(out.values())


def images_done(source: Store | str | Catalog, round_: int, stage: str) -> list[str]:
    """Ids of the images a round and stage has finished, sorted: the one definition of a
    round's ``images`` (the rounds table's and ``maskmill run``'s).

    An image is done when its unit of work is committed: a masks shard keyed by its id (written
    with masks or with none, so an image the model found nothing in counts), or masks of it in
    a shard of several images (a ground-truth import). Failed images have no shard.

    Reads the round and stage's own shards (:meth:`~storage.catalog.Catalog.query_folder`), as
    listed now; of a catalog given as ``source``, only its ``images`` view is used.
    """
    with _opened(source, ("images",)) as catalog:
        keys = catalog.store.shard_keys("masks", int(round_), stage)
        if not keys:  # no shard: nothing done (and read_parquet of no file is an error)
            return []
        rows = catalog.query_folder(
            _DONE.format(masks=SHARDS) + " ORDER BY image_id", [keys], "masks", round_, stage
        )
    return [image_id for (image_id,) in rows]


# SQL of stage_figures over a partition's shards (parameters: the source of the model's masks,
# the partition's shard keys): one pass, per image (the per-image rows also give the images
# done), then summed. Annotated masks are those with clicks recorded.
_FIGURES = f"""
WITH per_image AS MATERIALIZED (
    SELECT image_id, count(*) AS masks, count(clicks) AS annotated,
           sum(len(clicks)) AS clicks,
           sum(strokes) FILTER (WHERE clicks IS NOT NULL) AS strokes,
           sum(stroke_seconds) FILTER (WHERE clicks IS NOT NULL) AS stroke_seconds,
           sum(model_iou) FILTER (WHERE clicks IS NOT NULL) AS iou_sum,
           count(model_iou) FILTER (WHERE clicks IS NOT NULL) AS iou_count,
           sum(seconds) AS seconds,
           count(*) FILTER (WHERE source = ?) AS model_masks,
           count(*) FILTER (WHERE len(clicks) = 0) AS no_click_masks
    FROM {SHARDS} GROUP BY image_id)
SELECT (SELECT count(*) FROM ({_DONE.format(masks="per_image")})),
       coalesce(sum(masks), 0), coalesce(sum(annotated), 0), coalesce(sum(clicks), 0),
       coalesce(sum(strokes), 0), coalesce(sum(stroke_seconds), 0),
       sum(iou_sum) / nullif(sum(iou_count), 0), coalesce(sum(seconds), 0),
       coalesce(sum(model_masks), 0), coalesce(sum(no_click_masks), 0)
FROM per_image
"""


def stage_figures(source: Store | str | Catalog, round_: int, stage: str) -> dict[str, Any]:
    """What a round and stage holds, counted from its committed shards.

    Returns:
        ``images`` (:func:`images_done`, a count), ``masks``, ``annotated`` (masks an annotator
        made: clicks recorded, possibly none), ``clicks``, ``strokes``, ``stroke_seconds`` (over
        those), ``model_iou_mean`` (their mean IoU of the model's mask with the accepted one;
        None when none has it), ``seconds`` (annotation time in all), ``model_masks`` (source
        ``model``: a semi stage's kept pre-fill), ``no_click_masks`` (annotated with no click:
        a corrected pre-fill) and ``failures`` (distinct images or URIs refused).

    Reads only the round and stage's own shards, each once (its masks partition, counted per
    image, which also gives :func:`images_done`; its failures shards), not every shard of the
    store: a stage's closing figures cost what the stage holds.
    """
    round_ = int(round_)
    with _opened(source, ("images",)) as catalog:
        store = catalog.store
        keys = store.shard_keys("masks", round_, stage)
        row: Sequence[Any] = (0, 0, 0, 0, 0, 0, None, 0, 0, 0)  # no shard, no mask
        if keys:
            (row,) = catalog.query_folder(_FIGURES, ["model", keys], "masks", round_, stage)
        images, masks, annotated, clicks, strokes, stroke_seconds, model_iou_mean = row[:7]
        seconds, model_masks, no_click_masks = row[7:10]
        failures = 0
        prefix = f"{stage_key(round_, stage)}-"
        if any(key.startswith(prefix) for key in store.shard_keys("failures")):
            # The WHERE: a longer stage name may share the prefix.
            ((failures,),) = catalog.query_folder(
                f"SELECT count(DISTINCT coalesce(image_id, uri)) FROM {SHARDS} "
                "WHERE round = ? AND stage = ?",
                [round_, stage],
                "failures",
                key_prefix=prefix,
            )
    return {
        "images": int(images),
        "masks": int(masks),
        "annotated": int(annotated),
        "clicks": int(clicks),
        "strokes": int(strokes),
        "stroke_seconds": float(stroke_seconds),
        "model_iou_mean": None if model_iou_mean is None else float(model_iou_mean),
        "seconds": float(seconds),
        "model_masks": int(model_masks),
        "no_click_masks": int(no_click_masks),
        "failures": int(failures),
    }


def stage_progress(
    source: Store | str | Catalog,
) -> tuple[set[tuple[int, str]], set[tuple[int, str]]]:
    """(started, finished) (round, stage) pairs: those with masks other than ground truth, and
    those with a row in the rounds table."""
    with _opened(source) as catalog:
        started = catalog.con.execute(
            "SELECT DISTINCT round, stage FROM masks WHERE stage <> ?", [STAGE_GT]
        ).fetchall()
        finished = catalog.con.execute("SELECT DISTINCT round, stage FROM rounds").fetchall()
    return {(int(r), s) for r, s in started}, {(int(r), s) for r, s in finished}


def categories(source: Store | str | Catalog) -> dict[str, int | None]:
    """Category names of the store's masks (ground truth's and those annotators gave), sorted,
    each with its category id: the smallest stored with the name, None when it has none."""
    with _opened(source) as catalog:
        rows = catalog.con.execute(
            "SELECT category, min(category_id) FROM masks WHERE category IS NOT NULL "
            "GROUP BY category ORDER BY category"
        ).fetchall()
    return {name: None if category_id is None else int(category_id) for name, category_id in rows}


def learning_curves(source: Store | str | Catalog) -> list[dict[str, Any]]:
    """Per finished round and stage, what annotation cost and what the model was: the data
    engine's learning curves (SA-1B-paper style).

    Each row: ``round``, ``stage``, ``model_version`` (the model the round used), ``images``,
    ``masks``, ``masks_per_image``; over the masks an annotator drew or corrected (source not
    ``model``): ``annotated``, ``seconds_per_mask``, ``clicks_per_mask``, ``strokes_per_mask``,
    ``model_iou`` (mean IoU of the model's mask before correction with the accepted one); the
    used model's held-out ``used_miou`` / ``used_noc90``, and the model trained after the round
    (meta ``round`` = this round), if any: ``produced_version``, ``produced_miou``,
    ``produced_noc90``, ``produced_promoted`` (None where its meta does not say); and the
    round's own metrics (``metrics``, a dict).
    """
    with _opened(source) as catalog:
        columns, rows = catalog.query(
            """SELECT r.round, r.stage, r.model_version, r.images, r.metrics,
                      count(m.mask_id) AS masks,
                      count(m.mask_id) FILTER (WHERE m.source <> 'model') AS annotated,
                      avg(m.seconds) FILTER (WHERE m.source <> 'model') AS seconds_per_mask,
                      avg(coalesce(len(m.clicks), 0)) FILTER (WHERE m.source <> 'model')
                          AS clicks_per_mask,
                      avg(coalesce(m.strokes, 0)) FILTER (WHERE m.source <> 'model')
                          AS strokes_per_mask,
                      avg(m.model_iou) FILTER (WHERE m.source <> 'model') AS model_iou
               FROM rounds r LEFT JOIN masks m ON m.round = r.round AND m.stage = r.stage
               WHERE r.stage IN (SELECT unnest(?))
               GROUP BY ALL ORDER BY r.round, r.stage""",
            [list(ANNOTATION_STAGES)],
        )
        metas = {int(m["version"]): m for m in catalog.store.model_metas()}
    produced_by: dict[int, dict[str, Any]] = {}
    for meta in sorted(metas.values(), key=lambda m: int(m["version"])):
        if meta.get("round"):
            produced_by[int(meta["round"])] = meta  # the newest version trained after it
    out = []
    for row in rows:
        record = dict(zip(columns, row, strict=True))
        record["metrics"] = json.loads(record["metrics"] or "{}")
        images = int(record["images"] or 0)
        record["masks_per_image"] = record["masks"] / images if images else None
        used = metas.get(int(record["model_version"])) if record["model_version"] else None
        used_metrics = (used or {}).get("metrics") or {}
        record["used_miou"] = used_metrics.get("heldout_miou")
        record["used_noc90"] = used_metrics.get("heldout_noc90")
        produced = produced_by.get(int(record["round"]))
        produced_metrics = (produced or {}).get("metrics") or {}
        record["produced_version"] = int(produced["version"]) if produced else None
        record["produced_miou"] = produced_metrics.get("heldout_miou")
        record["produced_noc90"] = produced_metrics.get("heldout_noc90")
        record["produced_promoted"] = (produced or {}).get("promoted")
        out.append(record)
    return out


def review_queue(
    source: Store | str | Catalog, round_: int, stage: str, reviewer: str
) -> list[str]:
    """Ids of the images of a round and stage with masks waiting for ``reviewer``, sorted: a
    person's masks (not of :data:`UNREVIEWED_SOURCES`), not ``reviewer``'s own (``source`` =
    ``reviewer``), with no verdict from anyone yet."""
    with _opened(source) as catalog:
        rows = catalog.con.execute(
            "SELECT DISTINCT m.image_id FROM masks m "
            f"WHERE m.round = ? AND m.stage = ? AND {REVIEWABLE} AND m.source <> ? "
            "AND m.mask_id NOT IN (SELECT mask_id FROM reviews) ORDER BY m.image_id",
            [int(round_), stage, reviewer],
        ).fetchall()
    return [image_id for (image_id,) in rows]


def review_masks(
    source: Store | str | Catalog,
    image_id: str,
    round_: int | None = None,
    stage: str | None = None,
) -> list[dict[str, Any]]:
    """The masks of an image (of one round and stage, or all), each with its standing verdict,
    in stored order (round, stage, shard, row).

    Each: ``mask_id``, ``round``, ``stage``, ``source``, ``segmentation`` (RLE), ``category``,
    ``predicted_iou``, ``seconds``, ``clicks`` (how many), ``strokes``, ``reviewable`` (a
    person's mask), and of its newest verdict (None when it has none): ``verdict``,
    ``reviewer``, ``reason``, ``correction`` (RLE).
    """
    with _opened(source) as catalog:
        if not catalog.store.shards("masks"):  # read_parquet of no file is an error
            return []
        columns, rows = catalog.query(
            "SELECT m.mask_id, m.round, m.stage, m.source, m.segmentation, m.height, m.width, "
            "m.category, m.predicted_iou, m.seconds, coalesce(len(m.clicks), 0) AS clicks, "
            f"m.strokes, {REVIEWABLE} AS reviewable, v.verdict, v.reviewer, v.reason, "
            "v.correction "
            f"FROM {catalog.scan('masks')} m LEFT JOIN {LATEST_VERDICTS} v USING (mask_id) "
            "WHERE m.image_id = ? AND (? IS NULL OR m.round = ?) AND (? IS NULL OR m.stage = ?) "
            "ORDER BY m.round, m.stage, m.filename, m.file_row_number",
            [image_id, round_, round_, stage, stage],
        )
    out = []
    for row in rows:
        record = dict(zip(columns, row, strict=True))
        height, width = record.pop("height"), record.pop("width")
        record["segmentation"] = _rle(record["segmentation"], height, width)
        if record["correction"] is not None:
            record["correction"] = _rle(record["correction"], height, width)
        out.append(record)
    return out
