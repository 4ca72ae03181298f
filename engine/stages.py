"""The three stages of the data engine, as plain functions over a store.

- :func:`assisted_manual`: an :class:`~engine.annotators.Annotator` labels each image's objects
  with the predictor; stage ``manual``.
- :func:`semi_automatic`: the mask generator, with stricter thresholds, pre-fills the confident
  masks; the annotator keeps, corrects or deletes each and adds the objects they miss; stage
  ``semi``.
- :func:`fully_automatic`: the mask generator over every image on a Ray actor pool; stage
  ``auto``.

The unit of work is one image: its masks are one shard keyed by the image id, written through
:class:`~storage.StageWriter`, so a rerun skips finished images and a killed run resumes with no
mask lost or duplicated (mask ids are a hash of image, round, stage and index). An image that
cannot be read goes to the failures table with the reason, and the round goes on; so does an
image whose model step raises (reason ``model_error``, with the exception). A failed image has no
shard, so a rerun tries it again. Each stage
ends by writing its row of the rounds table (:func:`stage_metrics`), counting the stage's shards
once; a stage with every image done and its row up to date returns the stored row instead
(``StageWriter.finished_row``): rerunning a finished stage costs a listing and changes nothing.

The two annotation stages write with ``StageWriter(shared=True)``: each image is claimed
(``storage.claims``), annotated while its claim is renewed, and committed once, so a simulated
annotator, other runs and people on ``maskmill serve`` can share a round; a run out of images to
claim waits for the others' and the row is written by whoever completes the round. The automatic
stage keeps the round-wide writer lease (one pool does the whole pass).

Images are encoded through the store's embedding cache (``engine.embeddings``): an image the
same image encoder met before (an earlier stage, round or a frozen-encoder retrain's model) is
not encoded again. ``embedding_cache=False`` turns it off (the model's own float32 features).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from maskmill.engine.annotators import Annotation, Annotator
from maskmill.engine.embeddings import image_embeddings, open_embedding_cache, set_image
from maskmill.engine.plan import Plan
from maskmill.model import EncoderPrecision, MaskGenerator, Predictor, Sam, load_checkpoint
from maskmill.model.concepts import find_instances, label_records, require_concept_head
from maskmill.storage import ClaimLostError, ImageDoneError, StageWriter, Store
from maskmill.storage.embeddings import EmbeddingCache
from maskmill.storage.images import BadImageError, ImageInfo, load_stored_image
from maskmill.storage.queries import existing_masks, stage_figures

# The stages' generator grid on a CPU: 16x16 points (SAM: 32x32); masks covering >= 95 % of the
# image are dropped, as for SA-1B. The thresholds are not here: they are the model's own
# (``generator_presets``: ``auto`` for the automatic stage, the stricter ``semi`` for the
# semi-automatic pre-fill), stored with its weights.
# How often an annotation stage out of images to claim looks again while others (people, other
# runs) still hold some: a claim that expires comes back to it.
CLAIM_POLL_S = 2.0

STAGE_GENERATOR: dict[str, Any] = {
    "points_per_side": 16,
    "points_per_batch": 64,
    "min_mask_region_area": 0,
    "max_mask_area_fraction": 0.95,
}


def stage_generator(
    model: Sam,
    preset: str,
    options: dict[str, Any] | None = None,
    encoder_precision: EncoderPrecision = "fp32",
) -> MaskGenerator:
    """The mask generator of a stage: :data:`STAGE_GENERATOR`, the model's ``preset``
    thresholds (``auto`` or ``semi``), then ``options`` (e.g. a user's thresholds) over both;
    its image encoder computes at ``encoder_precision``."""
    return MaskGenerator.from_preset(
        model,
        preset,
        **{**STAGE_GENERATOR, **(options or {})},
        encoder_precision=encoder_precision,
    )


def assisted_manual(
    store: Store,
    round_: int,
    plan: Plan,
    image_ids: list[str],
    model_meta: dict[str, Any],
    annotator: Annotator,
    progress: bool = False,
    embedding_cache: bool = True,
    encoder_precision: EncoderPrecision = "fp32",
) -> dict[str, Any]:
    """Round ``round_`` of assisted-manual annotation over ``image_ids``; returns its rounds row.

    ``model_meta`` is the stored model's meta (``version``, ``uri``, ``metrics``);
    ``embedding_cache``: encode through the store's embedding cache (module doc);
    ``encoder_precision``: what the image encoder computes in (``Predictor``).
    """
    return _annotation_stage(
        store,
        round_,
        "manual",
        plan,
        image_ids,
        model_meta,
        annotator,
        None,
        progress,
        embedding_cache,
        encoder_precision=encoder_precision,
    )


def semi_automatic(
    store: Store,
    round_: int,
    plan: Plan,
    image_ids: list[str],
    model_meta: dict[str, Any],
    annotator: Annotator,
    generator_options: dict[str, Any] | None = None,
    progress: bool = False,
    embedding_cache: bool = True,
    prefill_concepts: Sequence[str] | None = None,
    encoder_precision: EncoderPrecision = "fp32",
) -> dict[str, Any]:
    """Round ``round_`` of semi-automatic annotation: the generator (:func:`stage_generator`,
    the model's ``semi`` preset, ``generator_options`` over it) pre-fills; the annotator keeps,
    corrects or deletes each pre-filled mask and adds the missing objects; returns its rounds
    row (with the pre-fill verdicts, see :func:`stage_metrics`). ``embedding_cache``: encode
    through the store's embedding cache (module doc). ``prefill_concepts``: pre-fill every
    instance of these concepts instead (:func:`encode_and_prefill`). ``encoder_precision``: what
    the image encoder computes in (``Predictor``)."""
    return _annotation_stage(
        store,
        round_,
        "semi",
        plan,
        image_ids,
        model_meta,
        annotator,
        generator_options or {},
        progress,
        embedding_cache,
        prefill_concepts,
        encoder_precision,
    )


def _annotation_stage(
    store: Store,
    round_: int,
    stage: str,
    plan: Plan,
    image_ids: list[str],
    model_meta: dict[str, Any],
    annotator: Annotator,
    generator_options: dict[str, Any] | None,
    progress: bool,
    embedding_cache: bool,
    prefill_concepts: Sequence[str] | None = None,
    encoder_precision: EncoderPrecision = "fp32",
) -> dict[str, Any]:
    """A stage of annotated images; ``generator_options`` None: no pre-fill (manual), a dict:
    the ``semi`` pre-fill with those options (or by ``prefill_concepts``)."""
    version = int(model_meta["version"])
    started = time.perf_counter()
    thresholds: dict[str, float] = {}
    # What the annotator did that leaves no mask in the store, summed over this run's images.
    run_counts = dict.fromkeys(("prefill_deleted", "skipped_small", "skipped_budget"), 0)
    # Shared: people (maskmill serve) and other runs may annotate this round and stage at once;
    # each image is claimed, annotated and committed by one of them.
    with StageWriter(store, round_, stage, shared=True) as writer:
        if (finished := writer.finished_row(image_ids)) is not None:
            return finished
        # One listing of the committed shards, not one request per image.
        done = set(store.shard_keys("masks", round_, stage))
        todo = [i for i in image_ids if i not in done]
        # One query for the stage: what earlier rounds drew on each image (shown, not redone).
        earlier = existing_masks(store, todo, round_)
        if todo:
            model = load_checkpoint(model_meta["uri"])
            predictor = Predictor(model, encoder_precision)
            cache = open_embedding_cache(store if embedding_cache else None, model)
            generator = None
            if generator_options is not None:
                generator = stage_generator(model, "semi", generator_options, encoder_precision)
                thresholds = _thresholds(generator)
                check_prefill_concepts(model, prefill_concepts)
        failed: set[str] = set()  # images this run wrote a failure for: not tried again
        row: dict[str, Any] | None = None
        while row is None:
            claimed = _claim_each(writer, todo, failed)
            for image_id in _bar(claimed, f"round {round_} {stage}", progress, len(todo)):
                info = plan.images[image_id]
                with writer.claims.keep_alive(image_id):
                    result = _annotate(
                        writer,
                        info,
                        predictor,
                        generator,
                        annotator,
                        earlier[image_id],
                        cache,
                        prefill_concepts,
                    )
                if result is None:  # its failure is recorded
                    failed.add(image_id)
                    continue
                records, annotation = result
                try:
                    writer.write_masks(image_id, records, model_version=version)
                except (ClaimLostError, ImageDoneError):
                    continue  # another annotator took the image over (its claim had expired)
                for name in run_counts:
                    run_counts[name] += getattr(annotation, name)
            if writer.pending(image_ids):
                # Others still hold images of the round: wait for them (a claim that expires
                # comes back to claim_next here); the metrics are measured once, at the end.
                time.sleep(CLAIM_POLL_S)
                continue
            figures = stage_figures(store, round_, stage)  # once, for metrics and row
            metrics = stage_metrics(
                figures, stage, model_meta, time.perf_counter() - started, run_counts
            )
            # Whoever finishes the round last writes its row (None: one came back meanwhile).
            row = writer.finish_if_complete(
                image_ids, model_version=version, metrics={**metrics, **thresholds}, figures=figures
            )
        return row


def _claim_each(writer: StageWriter, image_ids: list[str], failed: set[str]) -> Iterator[str]:
    """Claim and yield the images of ``image_ids`` one at a time, in their order, skipping the
    ones other annotators hold or have done and those in ``failed``; ends when none is left
    to claim (the others' may still be in progress)."""
    claims = writer.claims
    while (image_id := claims.claim_next(i for i in image_ids if i not in failed)) is not None:
        yield image_id


def _annotate(
    writer: StageWriter,
    info: ImageInfo,
    predictor: Predictor,
    generator: MaskGenerator | None,
    annotator: Annotator,
    earlier: list[dict[str, Any]],
    cache: EmbeddingCache | None,
    prefill_concepts: Sequence[str] | None = None,
) -> tuple[list[dict[str, Any]], Annotation] | None:
    """The mask records of one image (the kept pre-fill, then the annotator's, numbered) and
    the annotation; None after writing the image's failure (unreadable, or the model step
    raised). ``cache``: the model's embedding cache, or None."""
    image = read_stored_image(writer, info)
    if image is None:
        return None
    try:
        with torch.inference_mode():
            prefill = encode_and_prefill(
                predictor, generator, image, info.image_id, cache, prefill_concepts
            )
            annotation = annotator.annotate(
                info.image_id,
                image,
                predictor,
                earlier,
                [record["segmentation"] for record in prefill],
            )
    except Exception as error:  # noqa: BLE001 - one image's error must not end the round
        message = f"{info.uri}: model_error: {type(error).__name__}: {error}"
        writer.write_failures(
            info.image_id, [{"image_id": info.image_id, "uri": info.uri, "error": message}]
        )
        return None
    # The pre-fill the annotator kept as is stays the model's; the rest it corrected (now among
    # its own masks) or deleted.
    records = [prefill[index] for index in annotation.kept_prefill]
    records.extend(annotation.records(annotator.source))
    for index, record in enumerate(records):
        record.update(image_id=info.image_id, index=index)
    return records, annotation


def encode_and_prefill(
    predictor: Predictor,
    generator: MaskGenerator | None,
    image: np.ndarray,
    image_id: str | None = None,
    cache: EmbeddingCache | None = None,
    concepts: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Make ``image`` ((H, W, 3) uint8 RGB) the predictor's current image and return the
    pre-fill of the semi stage (none without a ``generator``): its masks, source ``model``,
    each labelled with its concept where the model has a concept head sure of one
    (``model.concepts.label_records``), so pre-filled masks arrive with categories. The image
    (and each crop of a generator with crop layers) is encoded once for both, or read from
    ``cache`` (the model's embedding cache, keyed by ``image_id``; None: no cache).

    With ``concepts`` (and a generator: the semi stage), the pre-fill is instead every
    instance of those concepts the model's concept head finds (``find_instances`` at its own
    threshold), labelled: pre-fill *by* concept, for a team labelling one category at a time."""
    if generator is None or concepts:
        embedding = set_image(predictor, image_id, image, cache)
        if generator is None:
            return []
        found = find_instances(predictor.model, embedding, list(concepts))
        return [{**record, "source": "model"} for record in found]
    # The whole image first, then each crop layer's crop (none without crop layers): each is a
    # view of the cache.
    boxes = generator.crop_boxes(image.shape[:2])
    embeddings = image_embeddings(
        predictor, image_id, image, boxes, cache, generator.encoder_batch_size
    )
    embedding = embeddings[0]  # the whole image
    predictor.set_image_embedding(embedding)
    records = generator.generate_from_crops(embeddings)
    labelled = label_records(predictor.model, embedding, records)
    return [{**record, "source": "model"} for record in labelled]


def check_prefill_concepts(model: Sam, concepts: Sequence[str] | None) -> None:
    """Refuse pre-fill by ``concepts`` the model cannot find, before any image is claimed.

    Raises:
        ValueError: the model has no concept head. KeyError: it does not know a concept.
    """
    if concepts:
        head = require_concept_head(model)
        for name in concepts:
            head.index(name)


def fully_automatic(
    store: Store,
    round_: int,
    plan: Plan,
    image_ids: list[str],
    model_meta: dict[str, Any],
    workers: int = 1,
    generator_options: dict[str, Any] | None = None,
    progress: bool = False,
    embedding_cache: bool = True,
    encoder_precision: EncoderPrecision = "fp32",
) -> dict[str, Any]:
    """The automatic pass: the stage generator (:func:`stage_generator`, the model's ``auto``
    preset, ``generator_options`` over it) over ``image_ids`` on ``workers`` Ray actors (Ray
    must be initialised, see :func:`engine.ray_pool.init_ray`); returns its rounds row, whose
    metrics add ``worker_seconds`` (the actors' time on this run's images),
    ``pool_start_seconds`` (actors started, models loaded), ``workers``, the pool's figures
    (:func:`_pool_figures`: nodes used, actors lost, images resubmitted, actor peak memory)
    and the thresholds used. ``embedding_cache``: the actors encode through the store's
    embedding cache (module doc), crops included, and encode at ``encoder_precision``.

    A worker node lost mid-stage: its actors' images go to the surviving actors
    (``engine.ray_pool``); with none left the stage raises and a rerun (the flow's task
    retry) resumes, skipping every committed image."""
    from maskmill.engine.ray_pool import GeneratorPool  # Ray only where the actors run

    version = int(model_meta["version"])
    started = time.perf_counter()
    thresholds: dict[str, float] = {}
    with StageWriter(store, round_, "auto") as writer:
        if (finished := writer.finished_row(image_ids)) is not None:
            return finished
        # One listing of the committed shards, not one request per image: a resume costs the
        # same whatever the store holds. Jobs are the images' infos (URIs): actors read them.
        done = set(store.shard_keys("masks", round_, "auto"))
        jobs = [plan.images[i] for i in image_ids if i not in done]
        worker_seconds = pool_start_seconds = 0.0
        pool_figures: dict[str, Any] = {}
        if jobs:
            cache_store = store if embedding_cache else None
            with GeneratorPool(
                model_meta["uri"],
                workers,
                "auto",
                generator_options,
                cache_store=cache_store,
                encoder_precision=encoder_precision,
            ) as pool:
                pool_start_seconds = pool.start_seconds
                thresholds = pool.thresholds
                # Streamed: each result is committed and dropped as it arrives (the pool keeps
                # a few in flight), so the driver's memory does not grow with the corpus.
                for result in _bar(pool.map(jobs), f"round {round_} auto", progress, len(jobs)):
                    info = result.image
                    worker_seconds += result.seconds
                    if result.error is not None:
                        writer.write_failures(
                            info.image_id,
                            [{"image_id": info.image_id, "uri": info.uri, "error": result.error}],
                        )
                        continue
                    records = [
                        {**r, "image_id": info.image_id, "index": i, "source": "model"}
                        for i, r in enumerate(result.records)
                    ]
                    writer.write_masks(info.image_id, records, model_version=version)
                pool_figures = _pool_figures(pool)
        figures = stage_figures(store, round_, "auto")  # once, for metrics and row
        metrics = stage_metrics(figures, "auto", model_meta, time.perf_counter() - started)
        return writer.finish(
            model_version=version,
            metrics={
                **metrics,
                "worker_seconds": worker_seconds,
                "pool_start_seconds": pool_start_seconds,
                "workers": workers,
                **pool_figures,
                **thresholds,
            },
            figures=figures,
        )


def _pool_figures(pool: Any) -> dict[str, Any]:
    """What a finished pool tells of the cluster: ``worker_nodes`` (distinct nodes its actors
    ran on), ``workers_lost`` (actors that died), ``jobs_resubmitted`` (their images sent to
    the survivors), ``actor_peak_rss_mb`` (the largest peak memory of a surviving actor) and
    ``actor_devices`` (the surviving actors' torch devices, sorted: ``["cuda"]`` on GPUs)."""
    survivors = pool.where()
    return {
        "worker_nodes": len(set(pool.node_ids)),
        "workers_lost": pool.lost,
        "jobs_resubmitted": pool.resubmitted,
        "actor_peak_rss_mb": max((w["peak_rss"] for w in survivors), default=0) / 2**20,
        "actor_devices": sorted({w["device"] for w in survivors}),
    }


def _thresholds(generator: MaskGenerator) -> dict[str, float]:
    """The thresholds a stage's generator keeps masks at (recorded in the round's metrics)."""
    return {
        "pred_iou_thresh": float(generator.pred_iou_thresh),
        "stability_score_thresh": float(generator.stability_score_thresh),
    }


def read_stored_image(writer: StageWriter, info: ImageInfo) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB of the image as stored (:func:`storage.images.load_stored_image`),
    or None after writing its failure (missing, changed since ingest, unreadable)."""
    try:
        return load_stored_image(info)
    except BadImageError as error:
        writer.write_failures(
            info.image_id, [{"image_id": info.image_id, "uri": info.uri, "error": str(error)}]
        )
        return None


def stage_metrics(
    figures: dict[str, Any],
    stage: str,
    model_meta: dict[str, Any],
    compute_seconds: float | None = None,
    run_counts: dict[str, int] | None = None,
) -> dict[str, float | int | None]:
    """A round's figures, from its stage's :func:`storage.queries.stage_figures` (counted
    from what is stored, so a resumed round counts everything; the caller passes the same
    figures to ``StageWriter.finish``, so the stage's shards are read once).

    ``images``: images done (:func:`storage.queries.images_done`: committed, with masks or
    none; the rounds row's ``images`` too); ``masks_per_image``; ``annotated``: masks an
    annotator made (clicks recorded; a corrected pre-fill has none); over those,
    ``clicks_per_mask``, ``strokes_per_mask``, ``stroke_seconds_per_mask``,
    ``seconds_per_mask`` and ``model_iou_mean`` (mean IoU of the model's mask before any
    stroke with the mask accepted); ``seconds``: annotation time in all; ``failures``: images
    refused; ``heldout_miou``: held-out 1-click mIoU of the model used; ``compute_seconds``:
    wall time of the last (possibly resumed) run.

    ``run_counts`` (an annotation stage's run): ``skipped_small``, ``skipped_budget`` and
    ``prefill_deleted``, summed over the images the run annotated. They leave no mask, so they
    are not in the store: a resumed round counts only its last run's images; None without
    them (a person's web session). The semi stage adds the pre-fill verdicts: ``prefill_kept``
    (its masks of source ``model``), ``prefill_corrected`` (annotated with no click),
    ``prefill_deleted`` and ``prefill`` (the three together).
    """
    images, masks, annotated = figures["images"], figures["masks"], figures["annotated"]
    seconds = figures["seconds"]
    model_metrics = model_meta.get("metrics") or {}
    counts = run_counts or {}

    def per_mask(total: float) -> float | None:
        return total / annotated if annotated else None

    metrics: dict[str, float | int | None] = {
        "images": images,
        "masks": masks,
        "masks_per_image": masks / images if images else None,
        "annotated": annotated,
        "clicks_per_mask": per_mask(figures["clicks"]),
        "strokes_per_mask": per_mask(figures["strokes"]),
        "stroke_seconds_per_mask": per_mask(figures["stroke_seconds"]),
        "seconds": seconds,
        "seconds_per_mask": per_mask(seconds),
        "model_iou_mean": figures["model_iou_mean"],
        "skipped_small": counts.get("skipped_small"),
        "skipped_budget": counts.get("skipped_budget"),
        "failures": figures["failures"],
        "heldout_miou": model_metrics.get("heldout_miou"),
        "compute_seconds": compute_seconds,
    }
    if stage == "semi":
        deleted = counts.get("prefill_deleted")
        kept, corrected = figures["model_masks"], figures["no_click_masks"]
        metrics.update(
            prefill=None if deleted is None else kept + corrected + deleted,
            prefill_kept=kept,
            prefill_corrected=corrected,
            prefill_deleted=deleted,
        )
    return metrics


def _bar(items, desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="image", total=total)
