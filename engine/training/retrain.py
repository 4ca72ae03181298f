"""Retraining between rounds: prompt-simulation training on the masks of a store, through Ray
Train's ``TorchTrainer``, saved as the store's next model version.

The training set is every image with masks of the chosen stages (ground truth, manual and semi by
default; automatic ones by option), held-out images left out. Each worker runs the training
step (``engine.training.pretrain.train_step``: encoder, SAM's 11-pass prompt simulation, focal :
dice 20 : 1 plus IoU MSE, ``loss.backward()``) on its own image of the step; gradients are
averaged across workers with ``all_reduce`` (gloo on CPUs, NCCL with a GPU per worker), and every
worker takes the same AdamW step, so all replicas stay equal. Which image, which masks and which
prompts a worker draws are functions of the seed, the step and the worker's rank, so the same
command trains the same model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from maskmill.engine.plan import Plan, evaluate_heldout, model_bytes
from maskmill.storage import Catalog, Store
from maskmill.storage.schema import STAGE_GT
from maskmill.storage.writer import utc_now


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


def training_set(
    store: Store,
    stages: tuple[str, ...],
    before_round: int,
    exclude: list[str] | None = None,
    min_mask_area: int = 64,
) -> list[dict[str, Any]]:
    """Images and masks to train on: ``[{"image_id", "uri", "masks": [RLE, ...]}]``, by id.

    Masks of ``stages`` from rounds before ``before_round`` (ground truth is round 0), at least
    ``min_mask_area`` pixels, crowd regions left out; images in ``exclude`` (held out) too.
    """
    if not store.shards("masks"):
        return []
    with Catalog(store) as catalog:
        rows = catalog.con.execute(
            "SELECT m.image_id, i.uri, m.segmentation, m.height, m.width FROM masks m "
            "JOIN images i USING (image_id) WHERE m.stage IN (SELECT unnest(?)) "
            "AND m.round < ? AND m.area >= ? AND NOT m.iscrowd "
            "AND m.image_id NOT IN (SELECT unnest(?)) ORDER BY m.image_id, m.mask_id",
            [list(stages), before_round, min_mask_area, list(exclude or [])],
        ).fetchall()
    out: dict[str, dict[str, Any]] = {}
    for image_id, uri, counts, height, width in rows:
        entry = out.setdefault(image_id, {"image_id": image_id, "uri": uri, "masks": []})
        entry["masks"].append({"size": [height, width], "counts": counts})
    return list(out.values())


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
    if samples:
        model, train_metrics = _fit(base_meta["uri"], samples, config)
    else:  # nothing new to learn from: the next version is the same weights, said so in meta
        from maskmill.model import load_checkpoint

        model, train_metrics = load_checkpoint(base_meta["uri"]), {"steps": 0}
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
        "metrics": metrics,
        "retrain": {**asdict(config), "stages": list(stages)},
        "created_at": utc_now().isoformat(),
    }
    payload = model_bytes(model, {"round": round_, "base_version": meta["base_version"]})
    store.write_model(version, payload, meta)
    return next(m for m in store.model_metas() if int(m["version"]) == version)


def _fit(base_uri: str, samples: list[dict[str, Any]], config: RetrainConfig):
    """Run the Ray Train job; return the trained model and its training metrics."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from maskmill.engine.ray_pool import gpus_available
    from maskmill.model import load_checkpoint

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
                use_gpu=gpus_available(),
                resources_per_worker={"CPU": 1},
            ),
            run_config=RunConfig(storage_path=scratch, name="retrain"),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"retraining from {base_uri} ended without a checkpoint")
        with result.checkpoint.as_directory() as folder:
            model = load_checkpoint(os.path.join(folder, "model.pt"))
            with open(os.path.join(folder, "metrics.json")) as handle:
                metrics = json.load(handle)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return model, metrics


def _train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the same steps on every rank, each on its own image."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from maskmill.engine.images import load_image
    from maskmill.engine.training.pretrain import (
        TrainConfig,
        build_optimizer,
        learning_rate,
        train_step,
    )
    from maskmill.model import load_checkpoint, save_checkpoint
    from maskmill.storage import rle

    config = RetrainConfig(
        **{**loop_config["config"], "stages": tuple(loop_config["config"]["stages"])}
    )
    samples = loop_config["samples"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(1)  # one core per worker (resources_per_worker)
    device = ray.train.torch.get_device()
    model = load_checkpoint(loop_config["base_uri"], device=device)
    for parameter in model.image_encoder.parameters():
        parameter.requires_grad_(not config.freeze_image_encoder)
    schedule = TrainConfig(
        steps=config.steps, lr=config.lr, warmup=max(1, config.steps // 10), seed=config.seed
    )
    optimizer = build_optimizer(model, schedule)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    order = np.random.default_rng(config.seed).permutation(len(samples))
    images: dict[int, np.ndarray] = {}
    losses, first_ious, last_ious = [], [], []
    for step in range(config.steps):
        draw = step * world + rank
        index = int(order[draw % len(samples)])
        sample = samples[index]
        if index not in images:  # each worker decodes an image once
            images[index] = load_image(sample["uri"], exif_transpose=False)
        rng = np.random.default_rng([config.seed, draw])
        pick = np.sort(rng.permutation(len(sample["masks"]))[: config.masks_per_image])
        masks = np.stack([rle.decode(sample["masks"][i]) for i in pick])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(schedule, step)
        optimizer.zero_grad(set_to_none=True)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + draw)
        result = train_step(
            model,
            images[index],
            masks,
            schedule.simulation,
            generator,
            config.freeze_image_encoder,
        )
        if world > 1:  # data parallel: the mean gradient of the workers' images
            for parameter in trainable:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
                dist.all_reduce(parameter.grad)
                parameter.grad /= world
        torch.nn.utils.clip_grad_norm_(trainable, schedule.grad_clip)
        optimizer.step()
        losses.append(float(result.loss.detach()))
        first_ious.append(float(result.ious[0].mean()))
        last_ious.append(float(result.ious[-1].mean()))
    tail = max(1, len(losses) // 4)
    metrics = {
        "steps": config.steps,
        "workers": world,
        "train_loss_first": float(np.mean(losses[:tail])),
        "train_loss_last": float(np.mean(losses[-tail:])),
        "train_iou1_last": float(np.mean(first_ious[-tail:])),
        "train_iou_final_last": float(np.mean(last_ious[-tail:])),
    }
    if rank == 0:
        folder = tempfile.mkdtemp(prefix="maskmill-retrain-ckpt-")
        save_checkpoint(model.eval(), os.path.join(folder, "model.pt"))
        with open(os.path.join(folder, "metrics.json"), "w") as handle:
            json.dump(metrics, handle)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    else:
        ray.train.report(metrics)
