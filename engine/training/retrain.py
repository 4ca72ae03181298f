"""Retraining between rounds: prompt-simulation training on the masks of a store, through Ray
Train's ``TorchTrainer``, saved as the store's next model version.

The training set is every image with masks of the chosen stages (ground truth, manual and semi by
default; automatic ones by option), held-out images left out. Each worker runs the training
step (``engine.training.pretrain.PromptSimulationStep``: encoder, SAM's 11-pass prompt simulation,
focal : dice 20 : 1 plus IoU MSE) on its own image of the step, wrapped by Ray Train's
``prepare_model`` in ``DistributedDataParallel`` (gloo on CPUs, NCCL with a GPU per worker), whose
backward averages the gradients across workers; every worker takes the same AdamW step, so all
replicas stay equal. Which image, which masks and which prompts a worker draws are functions of
the seed, the step and the worker's rank, so the same command trains the same model. Workers
report their loss through ``ray.train.report`` about every tenth of the steps; rank 0 reports the
trained weights as the run's checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from maskmill.engine.evaluate import calibrate_presets
from maskmill.engine.plan import Plan, evaluate_heldout, heldout_samples, model_bytes
from maskmill.engine.stages import STAGE_GENERATOR
from maskmill.model import generator_presets, load_checkpoint
from maskmill.storage import Store
from maskmill.storage.queries import training_set
from maskmill.storage.schema import STAGE_GT
from maskmill.storage.writer import utc_now

# Held-out images the generator presets are re-calibrated on (a bound on the retrain's cost).
CALIBRATION_IMAGES = 8
# The trained weights' file inside the Ray Train checkpoint.
CHECKPOINT_FILE = "model.pt"


@dataclass
class RetrainConfig:
    """How a retrain runs.

    Attributes:
        steps: optimiser steps (each worker contributes one image per step).
        workers: Ray Train workers (one GPU each where the cluster has GPUs).
        lr: peak AdamW learning rate (warm-up then cosine,
            ``engine.training.pretrain.learning_rate``).
        masks_per_image: masks of an image simulated together per step.
        freeze_image_encoder: train the prompt encoder and mask decoder only (fast on a CPU,
            and safe with the few images of a round).
        stages: mask stages trained on.
        include_auto: also train on the automatic stage's masks.
        seed: seed of sampling and prompt simulation.
        min_mask_area: masks smaller than this (pixels) are not trained on.
    """

    steps: int = 40
    workers: int = 2
    lr: float = 1e-4
    masks_per_image: int = 4
    freeze_image_encoder: bool = True
    stages: tuple[str, ...] = (STAGE_GT, "manual", "semi")
    include_auto: bool = False
    seed: int = 0
    min_mask_area: int = 64


def data_digest(samples: list[dict[str, Any]]) -> str:
    """A short hash of a training set (image ids and mask RLEs), kept in the model's meta."""
    digest = hashlib.blake2b(digest_size=8)
    for sample in samples:
        digest.update(sample["image_id"].encode())
        for mask in sample["masks"]:
            digest.update(mask["counts"].encode())
    return digest.hexdigest()


def retrain(
    store: Store,
    round_: int,
    plan: Plan,
    base_meta: dict[str, Any],
    config: RetrainConfig | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train the model of ``base_meta`` on the store's masks up to round ``round_`` and store
    it as the next version (meta ``round`` = ``round_``); return the new model's meta.

    A version already stored for ``round_`` is returned as it is (a resumed run retrains once).
    Ray must be initialised (:func:`engine.ray_pool.init_ray`).
    """
    config = config or RetrainConfig()
    for meta in store.model_metas():
        if int(meta.get("round") or 0) == round_:
            return meta
    stages = tuple(config.stages) + (("auto",) if config.include_auto else ())
    samples = training_set(store, stages, round_ + 1, plan.heldout, config.min_mask_area)
    started = time.perf_counter()
    base = load_checkpoint(base_meta["uri"])
    if samples:
        model, train_metrics = _fit(base_meta["uri"], samples, config)
    else:  # nothing new to learn from: the next version is the same weights, said so in meta
        model, train_metrics = base, {"steps": 0}
    # The generator thresholds travel with the weights: the base's presets, re-expressed in
    # the new IoU head's units on the held-out images (kept as they are when it cannot be).
    calibration = calibrate_presets(
        model,
        generator_presets(base),
        list(heldout_samples(store, plan, CALIBRATION_IMAGES)),
        STAGE_GENERATOR,
        quality_bar=base.metadata.get("generator_quality_bar"),
        base=base,
    )
    metrics = {
        **evaluate_heldout(store, plan, model, progress=progress),
        **train_metrics,
        "train_images": len(samples),
        "train_masks": sum(len(s["masks"]) for s in samples),
        "train_seconds": time.perf_counter() - started,
    }
    version = max(int(m["version"]) for m in store.model_metas()) + 1
    meta = {
        "round": round_,
        "source": "retrain",
        "base_version": int(base_meta["version"]),
        "config": model.config.to_dict(),
        "data_digest": data_digest(samples),
        "generator_presets": calibration.presets,
        "preset_calibration": {"quality_bar": calibration.quality_bar, **calibration.report},
        "metrics": metrics,
        "retrain": {**asdict(config), "stages": list(stages)},
        "created_at": utc_now().isoformat(),
    }
    checkpoint_meta = {
        "round": round_,
        "base_version": meta["base_version"],
        "generator_presets": calibration.presets,
        "generator_quality_bar": calibration.quality_bar,
    }
    payload = model_bytes(model, checkpoint_meta)
    store.write_model(version, payload, meta)
    return next(m for m in store.model_metas() if int(m["version"]) == version)


def _fit(base_uri: str, samples: list[dict[str, Any]], config: RetrainConfig):
    """Run the Ray Train job; return the trained model and its training metrics (rank 0's)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from maskmill.engine.ray_pool import gpus_available

    scratch = tempfile.mkdtemp(prefix="maskmill-retrain-")
    try:
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={
                "base_uri": base_uri,
                "samples": samples,
                "config": asdict(config),
            },
            scaling_config=ScalingConfig(
                num_workers=config.workers,
                # A GPU per worker, or none: with fewer GPUs than workers the job would
                # wait forever for the missing ones.
                use_gpu=gpus_available(at_least=config.workers),
                resources_per_worker={"CPU": 1},
            ),
            run_config=RunConfig(storage_path=scratch, name="retrain"),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"retraining from {base_uri} ended without a checkpoint")
        with result.checkpoint.as_directory() as folder:
            model = load_checkpoint(os.path.join(folder, CHECKPOINT_FILE))
        metrics = dict(result.metrics)  # what rank 0 reported with the checkpoint
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return model, metrics


def _draw(
    samples: list[dict[str, Any]], config: RetrainConfig, step: int, rank: int, world: int
) -> tuple[int, np.ndarray, int]:
    """What worker ``rank`` of ``world`` trains on at ``step``: the sample's index, the indices of
    its masks (sorted, at most ``masks_per_image``) and the draw number that seeds its prompts.
    Draws go through a seeded permutation of the samples, ``world`` of them per step."""
    draw = step * world + rank
    index = int(np.random.default_rng(config.seed).permutation(len(samples))[draw % len(samples)])
    rng = np.random.default_rng([config.seed, draw])
    pick = np.sort(rng.permutation(len(samples[index]["masks"]))[: config.masks_per_image])
    return index, pick, draw


def _train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the same steps on every rank, each on its own image."""
    import ray.train
    import ray.train.torch
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from maskmill.engine.training.pretrain import (
        PromptSimulationStep,
        TrainConfig,
        build_optimizer,
        learning_rate,
        train_step,
    )
    from maskmill.model import load_checkpoint, save_checkpoint
    from maskmill.storage import rle
    from maskmill.storage.images import load_image

    config = RetrainConfig(
        **{**loop_config["config"], "stages": tuple(loop_config["config"]["stages"])}
    )
    samples = loop_config["samples"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(1)  # one core per worker (resources_per_worker)
    schedule = TrainConfig(
        steps=config.steps, lr=config.lr, warmup=max(1, config.steps // 10), seed=config.seed
    )
    model = load_checkpoint(loop_config["base_uri"])
    # A step whose prompts are all points leaves the box-corner embeddings without a gradient
    # (and the other way round), so DDP must look for unused parameters in every backward.
    simulation_step = ray.train.torch.prepare_model(
        PromptSimulationStep(model, schedule.simulation, config.freeze_image_encoder),
        parallel_strategy_kwargs={"find_unused_parameters": True},
    )
    optimizer = build_optimizer(model, schedule)
    simulation_step.train()
    images: dict[int, np.ndarray] = {}
    losses, first_ious, last_ious = [], [], []
    report_every = max(1, config.steps // 10)
    for step in range(config.steps):
        index, pick, draw = _draw(samples, config, step, rank, world)
        sample = samples[index]
        if index not in images:  # each worker decodes an image once
            images[index] = load_image(sample["uri"], exif_transpose=False)
        masks = np.stack([rle.decode(sample["masks"][i]) for i in pick])
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + draw)
        result = train_step(
            simulation_step,
            optimizer,
            images[index],
            masks,
            generator,
            learning_rate(schedule, step),
            schedule.grad_clip,
        )
        losses.append(float(result.loss.detach()))
        first_ious.append(float(result.ious[0].mean()))
        last_ious.append(float(result.ious[-1].mean()))
        if (step + 1) % report_every == 0 and step + 1 < config.steps:
            # Progress; every rank reports at the same steps (reports are collective).
            ray.train.report(
                {"step": step + 1, "train_loss": float(np.mean(losses[-report_every:]))}
            )
    tail = max(1, len(losses) // 4)
    metrics = {
        "steps": config.steps,
        "workers": world,
        "train_loss_first": float(np.mean(losses[:tail])),
        "train_loss_last": float(np.mean(losses[-tail:])),
        "train_iou1_last": float(np.mean(first_ious[-tail:])),
        "train_iou_final_last": float(np.mean(last_ious[-tail:])),
    }
    if isinstance(simulation_step, DistributedDataParallel):
        simulation_step = simulation_step.module
    with tempfile.TemporaryDirectory(prefix="maskmill-retrain-ckpt-") as folder:
        checkpoint = None
        if rank == 0:  # the replicas are equal: one checkpoint, with rank 0's metrics
            save_checkpoint(simulation_step.model.eval(), os.path.join(folder, CHECKPOINT_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)  # uploads before it returns
