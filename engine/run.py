"""The steps of a data-engine run, as plain functions of its settings (Prefect-free; the flows in
``flows/data_engine.py`` wire them).

Every step is idempotent: it reads what the store already holds and does only what is missing,
so rerunning a killed run continues it, and rerunning a finished run changes nothing.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from maskmill.engine.annotators import SimulatedAnnotator
from maskmill.engine.plan import (
    Plan,
    ensure_initial_model,
    ground_truth,
    ingest_folder,
    make_plan,
    model_for_round,
)
from maskmill.engine.ray_pool import init_ray
from maskmill.engine.stages import (
    AUTO_GENERATOR,
    DEFAULT_MODEL_AUTO,
    DEFAULT_MODEL_SEMI,
    SEMI_GENERATOR,
    assisted_manual,
    fully_automatic,
    semi_automatic,
)
from maskmill.engine.training.retrain import RetrainConfig, retrain
from maskmill.storage import Store, import_coco

DEFAULT_WORKDIR = "out/engine"


@dataclass
class EngineSettings:
    """Everything a run depends on (``maskmill run``'s options). JSON-able: ``asdict``.

    Attributes:
        store: store URL. Default: ``out/engine/store``.
        images: image folder or URL; None: generated scenes with ground truth.
        annotations: COCO instances file of ``images`` (ground truth the simulated annotator
            and the held-out evaluation use).
        checkpoint: starting model; None: the shipped default model.
        manual_rounds / semi_rounds: rounds of each annotated stage; auto: the automatic pass.
        seed: seeds the image split, retraining and the generated scenes.
        workers: Ray actors of the automatic stage and Ray Train workers of retraining.
        ray_address: an existing Ray cluster; None: a local one.
        holdout: share of ground-truth images held out for the 1-click mIoU.
        scenes, scene_size: the generated dataset when ``images`` is None.
        retrain_steps: optimiser steps per retrain; 0 skips retraining (rounds keep the model).
        include_auto: retrain on automatic masks too.
        accept_iou, max_clicks: the simulated annotator's acceptance IoU and click budget.
        points_per_side: the generators' grid side.
        generator_options: further ``MaskGenerator`` parameters for both generators (e.g.
            thresholds), over ``AUTO_GENERATOR`` / ``SEMI_GENERATOR``.
        progress: tqdm progress bars.
    """

    store: str = f"{DEFAULT_WORKDIR}/store"
    images: str | None = None
    annotations: str | None = None
    checkpoint: str | None = None
    manual_rounds: int = 2
    semi_rounds: int = 1
    auto: bool = True
    seed: int = 0
    workers: int = 2
    ray_address: str | None = None
    holdout: float = 0.25
    scenes: int = 14
    scene_size: int = 256
    retrain_steps: int = 10
    include_auto: bool = False
    accept_iou: float = 0.9
    max_clicks: int = 20
    points_per_side: int = 16
    progress: bool = True
    generator_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("manual_rounds", "semi_rounds", "retrain_steps", "scenes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.annotations and not self.images:
            raise ValueError("--annotations needs --images (the folder its file_names are in)")
        if self.images and not self.annotations and (self.manual_rounds or self.semi_rounds):
            raise ValueError(
                "manual and semi rounds need ground truth for the simulated annotator: pass "
                "--annotations COCO.json, or --manual-rounds 0 --semi-rounds 0 for the "
                "automatic pass alone"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EngineSettings:
        """Settings from ``asdict`` output (unknown keys are an error naming them)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown engine settings {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    meta = ensure_initial_model(store, plan, settings.checkpoint, progress=settings.progress)
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
    grid = {"points_per_side": settings.points_per_side, **settings.generator_options}
    # SAM's thresholds suit SAM's models; the shipped small model has its own (see stages).
    shipped = settings.checkpoint is None
    auto_defaults = {**AUTO_GENERATOR, **(DEFAULT_MODEL_AUTO if shipped else {})}
    semi_defaults = {**SEMI_GENERATOR, **(DEFAULT_MODEL_SEMI if shipped else {})}
    if stage == "auto":
        init_ray(settings.ray_address)
        return fully_automatic(
            store,
            round_,
            plan,
            ids,
            meta,
            settings.workers,
            {**auto_defaults, **grid},
            settings.progress,
        )
    truth = ground_truth(store)
    annotator = SimulatedAnnotator(
        lambda image_id: truth.get(image_id, []),
        accept_iou=settings.accept_iou,
        max_clicks=settings.max_clicks,
    )
    if stage == "manual":
        return assisted_manual(store, round_, plan, ids, meta, annotator, settings.progress)
    return semi_automatic(
        store, round_, plan, ids, meta, annotator, {**semi_defaults, **grid}, settings.progress
    )


def retrain_after(settings: EngineSettings, round_: int) -> dict[str, Any] | None:
    """Retrain on the store's masks up to round ``round_`` (the newest model as the base) and
    store the next version; None when retraining is off (``retrain_steps`` 0)."""
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
