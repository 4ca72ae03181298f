"""The steps of a data-engine run, as plain functions of its settings (Prefect-free; the flows in
``flows/data_engine.py`` wire them).

Every step is idempotent: it reads what the store already holds and does only what is missing,
so rerunning a killed run continues it, and rerunning a finished run changes nothing.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from maskmill.engine.annotators import SimulatedAnnotator
from maskmill.engine.plan import Plan, ensure_initial_model, make_plan, model_for_round
from maskmill.engine.ray_pool import init_ray
from maskmill.engine.stages import assisted_manual, fully_automatic, semi_automatic
from maskmill.engine.training.retrain import RetrainConfig, retrain
from maskmill.model import EncoderPrecision
from maskmill.model.mask_generator import generator_parameters
from maskmill.storage import Store, import_coco, ingest_folder
from maskmill.storage.queries import ground_truth, ground_truth_categories

DEFAULT_WORKDIR = "out/engine"


class EngineSettings(BaseModel):
    """Everything a run depends on: ``maskmill run``'s options, the ``data_engine`` flow's
    parameter (Prefect validates it and shows each field, with its description, in a deployment's
    form). ``model_dump()`` gives the JSON-able dict, ``model_validate(dict)`` reads it back;
    unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")

    store: str = Field(
        f"{DEFAULT_WORKDIR}/store",
        min_length=1,
        description="Store URL (local folder or fsspec URL) that holds the images, masks, "
        "model versions and rounds of this run.",
    )
    images: str | None = Field(
        None,
        description="Image folder or fsspec URL. Empty: generated scenes with ground truth.",
    )
    annotations: str | None = Field(
        None,
        description="COCO instances JSON of `images`: the ground truth the simulated annotator "
        "and the held-out evaluation use.",
    )
    checkpoint: str | None = Field(
        None, description="Starting model checkpoint. Empty: the shipped default model."
    )
    manual_rounds: int = Field(
        2, ge=0, description="Assisted-manual rounds (a retrain follows each)."
    )
    semi_rounds: int = Field(1, ge=0, description="Semi-automatic rounds (a retrain follows each).")
    auto: bool = Field(True, description="End with the fully automatic pass over every image.")
    seed: int = Field(
        0,
        ge=0,
        description="Seeds the image split, retraining and the generated scenes: same seed, "
        "same masks.",
    )
    workers: int = Field(
        2,
        ge=1,
        description="Ray actors of the automatic stage and Ray Train workers of retraining.",
    )
    ray_address: str | None = Field(
        None, description="Address of an existing Ray cluster. Empty: a local one."
    )
    holdout: float = Field(
        0.25,
        ge=0.0,
        lt=1.0,
        description="Share of the ground-truth images held out for the 1-click mIoU.",
    )
    scenes: int = Field(14, ge=1, description="Generated scenes when `images` is empty.")
    scene_size: int = Field(256, ge=16, description="Side in pixels of the generated scenes.")
    retrain_steps: int | None = Field(
        None,
        ge=0,
        description="Optimiser steps per retrain. Empty: as many as the round's new masks call "
        "for (about 4 draws of each, 10 to 200 steps); 0 turns retraining off (rounds keep the "
        "model). A retrained model is used only when it is not worse on the validation images.",
    )
    include_auto: bool = Field(False, description="Retrain on the automatic masks too.")
    accept_iou: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="IoU with the ground truth at which the simulated annotator stops clicking "
        "(brush and eraser strokes then finish the mask to IoU 0.95) and keeps a pre-filled mask "
        "as is.",
    )
    max_clicks: int = Field(
        20,
        ge=1,
        description="Clicks the simulated annotator spends on an object at most (strokes "
        "finish it).",
    )
    points_per_side: int = Field(
        16, ge=1, description="Side of the generators' point grid (side x side prompts)."
    )
    prefill_concepts: list[str] = Field(
        [],
        description="Semi stage: pre-fill every instance of these concepts (the model's concept "
        "head, learned from the store's categories) instead of the generator's confident "
        "masks. Empty: the generator's, labelled where the head is sure.",
    )
    clip_model: str | None = Field(
        None,
        description="open_clip model whose text prompts each retrain also trains (a name such "
        "as ViT-B-32 with `clip_weights`, or local-dir:/folder); never downloaded. Empty: "
        "none.",
    )
    clip_weights: str | None = Field(
        None, description="Weights file of a named `clip_model` (open_clip's state dict)."
    )
    progress: bool = Field(True, description="Show tqdm progress bars.")
    embedding_cache: bool = Field(
        True,
        description="Keep image embeddings in the store (float16, per image encoder) so an "
        "image is encoded once per encoder: later stages and rounds, and models retrained with "
        "the encoder frozen, read them back. Off: every stage encodes every image again.",
    )
    encoder_precision: EncoderPrecision = Field(
        "fp32",
        description="What the image encoder computes in during the annotation stages: fp32, "
        "or bf16 / fp16 under torch.autocast (for GPUs; masks at IoU >= 0.98 with fp32). Its "
        "embeddings are cached apart from fp32 ones. Model metrics (held-out and validation "
        "mIoU) stay fp32, so they compare across runs.",
    )
    # A plain default, not default_factory, so the form shows it; pydantic copies it per instance.
    generator_options: dict[str, Any] = Field(
        {},
        description="Further MaskGenerator parameters for both generators (e.g. "
        "pred_iou_thresh, stability_score_thresh), over the model's presets.",
    )

    @model_validator(mode="after")
    def _check_sources(self) -> EngineSettings:
        # PydanticCustomError, not ValueError: its message is shown as is ("Value error, "-free).
        if self.annotations and not self.images:
            raise PydanticCustomError(
                "annotations_without_images",
                "annotations needs images (the folder its file_names are in)",
            )
        if self.images and not self.annotations and (self.manual_rounds or self.semi_rounds):
            raise PydanticCustomError(
                "rounds_without_ground_truth",
                "manual and semi rounds need ground truth for the simulated annotator: give "
                "annotations (a COCO instances file), or set manual_rounds and semi_rounds to 0 "
                "for the automatic pass alone",
            )
        if self.clip_weights and not self.clip_model:
            raise PydanticCustomError(
                "clip_weights_without_model", "clip_weights needs clip_model (which CLIP)"
            )
        unknown = sorted(set(self.generator_options) - generator_parameters())
        if unknown:
            raise PydanticCustomError(
                "unknown_generator_options",
                "generator_options {unknown} are not MaskGenerator parameters",
                {"unknown": unknown},
            )
        return self


def prepare(settings: EngineSettings) -> dict[str, Any]:
    """Make the store ready: ground truth imported (generated scenes by default) or a folder
    registered, the starting model stored as v1. Returns a summary."""
    store = Store(settings.store)
    summary: dict[str, Any] = {"store": settings.store}
    if settings.images is None:
        from maskmill.engine.training.synthetic import write_coco

        folder = os.path.join(
            DEFAULT_WORKDIR, f"scenes-s{settings.seed}-n{settings.scenes}-{settings.scene_size}"
        )
        annotations = os.path.join(folder, "instances.json")
        if not os.path.exists(annotations):  # written last by write_coco: complete when there
            write_coco(
                folder,
                settings.scenes,
                seed=settings.seed,
                height=settings.scene_size,
                width=settings.scene_size,
                parts=False,
            )
        summary.update(_import_once(store, annotations, os.path.join(folder, "images"), False))
    elif settings.annotations:
        summary.update(
            _import_once(store, settings.annotations, settings.images, settings.progress)
        )
    else:
        summary.update(ingest_folder(store, settings.images, progress=settings.progress))
    plan = plan_of(settings)
    meta = ensure_initial_model(
        store,
        plan,
        settings.checkpoint,
        progress=settings.progress,
        embedding_cache=settings.embedding_cache,
    )
    summary["initial_model"] = {k: meta.get(k) for k in ("version", "source", "metrics")}
    return summary


def _import_once(store: Store, annotations: str, images: str, progress: bool) -> dict[str, Any]:
    """Import the ground truth unless the store has it (a rerun leaves its shards alone; an
    import killed before its masks shard is done again)."""
    truth = ground_truth(store)
    if truth:
        return {"images": len(truth), "gt_masks": sum(map(len, truth.values())), "source": images}
    result = import_coco(annotations, images, store, progress=progress)
    return {"images": result.images, "gt_masks": result.masks, "source": images}


def plan_of(settings: EngineSettings) -> Plan:
    """The run's plan (deterministic from the store and the seed)."""
    return make_plan(
        Store(settings.store),
        settings.manual_rounds,
        settings.semi_rounds,
        settings.auto,
        settings.seed,
        settings.holdout,
    )


def annotate_round(settings: EngineSettings, round_: int) -> dict[str, Any]:
    """Run round ``round_`` of the plan with the newest model trained before it; returns the
    round's row of the rounds table."""
    store = Store(settings.store)
    plan = plan_of(settings)
    rounds = {r: (stage, ids) for r, stage, ids in plan.rounds()}
    if round_ not in rounds:
        raise ValueError(f"round {round_} is not in the plan (rounds {sorted(rounds)})")
    stage, ids = rounds[round_]
    meta = model_for_round(store, round_)
    # The thresholds are the model's own presets (stored with its weights); the user's
    # generator options override them.
    options = {"points_per_side": settings.points_per_side, **settings.generator_options}
    # What every stage takes from the settings alike.
    common = {
        "progress": settings.progress,
        "embedding_cache": settings.embedding_cache,
        "encoder_precision": settings.encoder_precision,
    }
    if stage == "auto":
        init_ray(settings.ray_address)
        return fully_automatic(store, round_, plan, ids, meta, settings.workers, options, **common)
    truth, names = ground_truth(store), ground_truth_categories(store)
    annotator = SimulatedAnnotator(
        lambda image_id: truth.get(image_id, []),
        categories=lambda image_id: names.get(image_id, []),
        accept_iou=settings.accept_iou,
        max_clicks=settings.max_clicks,
    )
    if stage == "manual":
        return assisted_manual(store, round_, plan, ids, meta, annotator, **common)
    return semi_automatic(
        store,
        round_,
        plan,
        ids,
        meta,
        annotator,
        options,
        prefill_concepts=settings.prefill_concepts,
        **common,
    )


def retrain_after(settings: EngineSettings, round_: int) -> dict[str, Any] | None:
    """Retrain on the store's masks up to round ``round_`` (the newest promoted model as the
    base) and store the next version, promoted or not (``engine.training.retrain``); None when
    retraining is off (``retrain_steps`` 0)."""
    if settings.retrain_steps == 0:
        return None
    init_ray(settings.ray_address)
    store = Store(settings.store)
    # Ground truth drives the simulated annotator; training on it too would hand the model
    # the answers the rounds are meant to produce, so only real annotations count here.
    stages = ("manual", "semi") if _simulated(settings) else ("gt", "manual", "semi")
    config = RetrainConfig(
        steps=settings.retrain_steps,
        workers=settings.workers,
        stages=stages,
        include_auto=settings.include_auto,
        seed=settings.seed,
        clip_model=settings.clip_model,
        clip_weights=settings.clip_weights,
        embedding_cache=settings.embedding_cache,
    )
    return retrain(
        store,
        round_,
        plan_of(settings),
        model_for_round(store, round_ + 1),
        config,
        settings.progress,
    )


def _simulated(settings: EngineSettings) -> bool:
    """Whether the annotations come from the ground truth (the simulated annotator)."""
    return settings.manual_rounds + settings.semi_rounds > 0
