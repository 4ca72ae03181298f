"""The three stages of the data engine, as plain functions over a store.

- :func:`assisted_manual`: an :class:`~engine.annotators.Annotator` labels each image's objects
  with the predictor; stage ``manual``.
- :func:`semi_automatic`: the mask generator, with stricter thresholds, pre-fills the confident
  masks; the annotator adds the objects they miss; stage ``semi``.
- :func:`fully_automatic`: the mask generator over every image on a Ray actor pool; stage
  ``auto``.

The unit of work is one image: its masks are one shard keyed by the image id, written through
:class:`~storage.StageWriter`, so a rerun skips finished images and a killed run resumes with no
mask lost or duplicated (mask ids are a hash of image, round, stage and index). An image that
cannot be read goes to the failures table with the reason, and the round goes on; so does an
image whose model step raises (reason ``model_error``, with the exception). A failed image has no
shard, so a rerun tries it again. Each stage
ends by writing its row of the rounds table (:func:`stage_metrics`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from maskmill.engine.annotators import Annotator
from maskmill.engine.generate import Generator
from maskmill.engine.images import BadImageError, load_image
from maskmill.engine.plan import ImageRow, Plan, existing_masks
from maskmill.engine.ray_pool import GeneratorPool, ImageJob
from maskmill.model import Predictor, load_checkpoint
from maskmill.storage import Catalog, StageWriter, Store

# The automatic stage's generator on a CPU: a 16x16 grid (SAM: 32x32) and SAM's thresholds;
# masks covering >= 95 % of the image are dropped, as for SA-1B.
AUTO_GENERATOR: dict[str, Any] = {
    "points_per_side": 16,
    "points_per_batch": 64,
    "pred_iou_thresh": 0.88,
    "stability_score_thresh": 0.95,
    "min_mask_region_area": 0,
    "max_mask_area_fraction": 0.95,
}
# Semi-automatic pre-fill: only confident masks, so the annotator's work is on what is missing.
SEMI_GENERATOR: dict[str, Any] = {
    **AUTO_GENERATOR,
    "pred_iou_thresh": 0.92,
    "stability_score_thresh": 0.97,
}
# The same roles for the small shipped model (``model.load_default``): its IoU head is calibrated
# to its own quality (predicted IoUs stay below 0.6) and its logits are soft, so SAM's
# thresholds keep nothing. Measured on 4 held-out generated scenes (16x16 points): predicted IoU
# > 0.3 with stability >= 0.6 keeps 5 masks a scene whose best IoU with a whole object averages
# 0.73 (parts of objects count as misses there); > 0.4 with >= 0.7 keeps 3, averaging 0.75.
DEFAULT_MODEL_AUTO: dict[str, Any] = {"pred_iou_thresh": 0.3, "stability_score_thresh": 0.6}
DEFAULT_MODEL_SEMI: dict[str, Any] = {"pred_iou_thresh": 0.4, "stability_score_thresh": 0.7}


def assisted_manual(
    store: Store,
    round_: int,
    plan: Plan,
    image_ids: list[str],
    model_meta: dict[str, Any],
    annotator: Annotator,
    progress: bool = False,
) -> dict[str, Any]:
    """Round ``round_`` of assisted-manual annotation over ``image_ids``; returns its rounds row.

    ``model_meta`` is the stored model's meta (``version``, ``uri``, ``metrics``).
    """
    return _annotation_stage(
        store, round_, "manual", plan, image_ids, model_meta, annotator, None, progress
    )


def semi_automatic(
    store: Store,
    round_: int,
    plan: Plan,
    image_ids: list[str],
    model_meta: dict[str, Any],
    annotator: Annotator,
    generator_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Round ``round_`` of semi-automatic annotation: the generator (``SEMI_GENERATOR`` unless
    given) pre-fills, the annotator adds the missing objects; returns its rounds row."""
    kwargs = SEMI_GENERATOR if generator_kwargs is None else generator_kwargs
    return _annotation_stage(
        store, round_, "semi", plan, image_ids, model_meta, annotator, kwargs, progress
    )


def _annotation_stage(
    store: Store,
    round_: int,
    stage: str,
    plan: Plan,
    image_ids: list[str],
    model_meta: dict[str, Any],
    annotator: Annotator,
    generator_kwargs: dict[str, Any] | None,
    progress: bool,
) -> dict[str, Any]:
    version = int(model_meta["version"])
    started = time.perf_counter()
    with StageWriter(store, round_, stage) as writer:
        todo = [plan.images[i] for i in image_ids if not writer.done(i)]
        if todo:
            model = load_checkpoint(model_meta["uri"])
            predictor = Predictor(model)
            generator = Generator(model, **generator_kwargs) if generator_kwargs else None
        for row in _bar(todo, f"round {round_} {stage}", progress):
            image = read_stored_image(writer, row)
            if image is None:
                continue
            records: list[dict[str, Any]] = []
            existing = existing_masks(store, row.image_id, round_)
            try:
                with torch.inference_mode():
                    if generator is not None:
                        for record in generator.generate(image):
                            records.append({**record, "source": "model"})
                            existing.append(record["segmentation"])
                    predictor.set_image(image)
                    annotation = annotator.annotate(row.image_id, image, predictor, existing)
            except Exception as error:  # noqa: BLE001 - one image's error must not end the round
                message = f"{row.uri}: model_error: {type(error).__name__}: {error}"
                writer.write_failures(
                    row.image_id, [{"image_id": row.image_id, "uri": row.uri, "error": message}]
                )
                continue
            records.extend(annotation.records(annotator.source))
            for index, record in enumerate(records):
                record.update(image_id=row.image_id, index=index)
            writer.write_masks(row.image_id, records, model_version=version)
        return writer.finish(
            model_version=version,
            metrics=stage_metrics(store, round_, stage, model_meta, time.perf_counter() - started),
        )


def fully_automatic(
    store: Store,
    round_: int,
    plan: Plan,
    image_ids: list[str],
    model_meta: dict[str, Any],
    workers: int = 1,
    generator_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The automatic pass: ``MaskGenerator`` (``AUTO_GENERATOR`` unless given) over
    ``image_ids`` on ``workers`` Ray actors (Ray must be initialised, see
    :func:`engine.ray_pool.init_ray`); returns its rounds row, whose metrics add
    ``worker_seconds`` (the actors' time on this run's images), ``pool_start_seconds`` (actors
    started, models loaded) and ``workers``."""
    version = int(model_meta["version"])
    kwargs = AUTO_GENERATOR if generator_kwargs is None else generator_kwargs
    started = time.perf_counter()
    with StageWriter(store, round_, "auto") as writer:
        jobs = [
            ImageJob(r.image_id, r.uri, r.height, r.width)
            for r in (plan.images[i] for i in image_ids)
            if not writer.done(r.image_id)
        ]
        worker_seconds = pool_start_seconds = 0.0
        if jobs:
            with GeneratorPool(model_meta["uri"], workers, kwargs) as pool:
                pool_start_seconds = pool.start_seconds
                for result in _bar(pool.map(jobs), f"round {round_} auto", progress, len(jobs)):
                    job = result.job
                    worker_seconds += result.seconds
                    if result.error is not None:
                        writer.write_failures(
                            job.image_id,
                            [{"image_id": job.image_id, "uri": job.uri, "error": result.error}],
                        )
                        continue
                    records = [
                        {**r, "image_id": job.image_id, "index": i, "source": "model"}
                        for i, r in enumerate(result.records)
                    ]
                    writer.write_masks(job.image_id, records, model_version=version)
        return writer.finish(
            model_version=version,
            metrics={
                **stage_metrics(store, round_, "auto", model_meta, time.perf_counter() - started),
                "worker_seconds": worker_seconds,
                "pool_start_seconds": pool_start_seconds,
                "workers": workers,
            },
        )


def read_stored_image(writer: StageWriter, row: ImageRow) -> np.ndarray | None:
    """The image as stored (no EXIF turn: masks live on the stored grid), or None after writing
    its failure."""
    try:
        image = load_image(row.uri, exif_transpose=False)
        if image.shape[:2] != (row.height, row.width):
            raise BadImageError(
                row.uri,
                "size_changed",
                f"decodes to {image.shape[1]}x{image.shape[0]} but "
                f"the images table says {row.width}x{row.height}",
            )
    except BadImageError as error:
        writer.write_failures(
            row.image_id, [{"image_id": row.image_id, "uri": row.uri, "error": str(error)}]
        )
        return None
    return image


def stage_metrics(
    store: Store,
    round_: int,
    stage: str,
    model_meta: dict[str, Any],
    compute_seconds: float | None = None,
) -> dict[str, float | int | None]:
    """A round's figures, counted from what is stored (so a resumed round counts everything).

    ``images``: images done (shards, masks or none); ``masks_per_image``; ``annotated``: masks
    drawn with clicks; ``clicks_per_mask`` and ``seconds_per_mask`` over those; ``seconds``:
    annotation time in all; ``failures``: images refused; ``heldout_miou``: held-out 1-click
    mIoU of the model used; ``compute_seconds``: wall time of the last (possibly resumed) run.
    """
    images = len(store.fs.glob(f"{store.table_dir('masks', round_, stage)}/part-*.parquet"))
    with Catalog(store) as catalog:
        masks, annotated, clicks, seconds = catalog.con.execute(
            "SELECT count(*), count(clicks), coalesce(sum(len(clicks)), 0), "
            "coalesce(sum(seconds), 0) FROM masks WHERE round = ? AND stage = ?",
            [round_, stage],
        ).fetchone()
        (failures,) = catalog.con.execute(
            "SELECT count(DISTINCT coalesce(image_id, uri)) FROM failures "
            "WHERE round = ? AND stage = ?",
            [round_, stage],
        ).fetchone()
    model_metrics = model_meta.get("metrics") or {}
    return {
        "images": images,
        "masks": int(masks),
        "masks_per_image": masks / images if images else None,
        "annotated": int(annotated),
        "clicks_per_mask": clicks / annotated if annotated else None,
        "seconds": float(seconds),
        "seconds_per_mask": seconds / annotated if annotated else None,
        "failures": int(failures),
        "heldout_miou": model_metrics.get("heldout_miou"),
        "compute_seconds": compute_seconds,
    }


def _bar(items, desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="image", total=total)
