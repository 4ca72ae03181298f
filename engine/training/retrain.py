"""Retraining between rounds: prompt-simulation training on the masks of a store, through Ray
Train's ``TorchTrainer``, stored as the next model version, and promoted only when it is not
worse on the run's validation images.

What is trained on: every image with masks of the chosen stages (ground truth, manual and semi by
default; automatic ones by option), held-out and validation images left out
(``engine.plan.Plan``). Every earlier round's masks stay in the set (replay), but draws are split
between the masks the base model has not seen ("new": rounds after the base's own) and the rest
(``RetrainConfig.new_share`` of the draws go to the new masks whenever there are both), so a
round's masks are not drowned by the history, and the history is not forgotten.

How long: ``steps = clamp(ceil(epochs x new_masks / (share x masks_per_step)), min_steps,
max_steps)`` (:func:`schedule_steps`): each new mask is drawn about ``epochs`` times, whatever
the size of a round; a retrain costs in proportion to the new data, not the history.

How: each worker runs the training step (``engine.training.pretrain.PromptSimulationStep``:
encoder, SAM's 11-pass prompt simulation, focal : dice 20 : 1 plus IoU MSE) on its own draw of
the step: an image, up to ``masks_per_image`` of its masks, a horizontal flip (p = 1/2) and a
scale jitter of image and masks together (:func:`augment`). The prompt encoder, the mask decoder
and the image encoder's last ``RetrainConfig.encoder_blocks`` blocks train. Ray Train's
``prepare_model`` wraps the step in ``DistributedDataParallel`` (gloo on CPUs, NCCL with a GPU
per worker), whose backward averages the gradients across workers; every worker takes the same
AdamW step, so all replicas stay equal. Every draw is a function of the seed, the step and the
worker's rank, so the same command trains the same model. Workers report their loss through
``ray.train.report`` about every tenth of the steps; rank 0 reports the trained weights as the
run's checkpoint. Workers are placed ``SPREAD`` (one per node while there are nodes with a free
CPU), and the run's metrics say where they ran (``train_worker_nodes``, ``train_node_ids``) and
on what (``train_device``, ``train_backend``).

Promotion: the base and the candidate are scored by 1-click mIoU on the validation images'
annotated masks (``engine.plan.evaluate_validation``); the candidate is promoted when its score
is at least the base's minus ``RetrainConfig.tolerance``. Either way it is stored, with
``promoted``, ``validation`` and ``decision`` in its meta (and ``rejected``, the reason, when it
is not promoted); the next round uses the newest promoted version
(``engine.plan.model_for_round``).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from maskmill.engine.evaluate import calibrate_presets
from maskmill.engine.plan import (
    Plan,
    evaluate_heldout,
    evaluate_validation,
    model_bytes,
    validation_samples,
)
from maskmill.engine.stages import STAGE_GENERATOR
from maskmill.engine.training.concepts import (
    ConceptTrainingConfig,
    concept_examples,
    train_concept_head,
)
from maskmill.engine.training.pretrain import TrainConfig
from maskmill.engine.training.text_prompts import (
    TextPromptTrainingConfig,
    text_prompt_examples,
    train_text_prompt_head,
)
from maskmill.model import Sam, generator_presets, load_checkpoint
from maskmill.model.prompt_simulation import prepare_masks
from maskmill.model.sam import PIXEL_MEAN
from maskmill.model.text_encoder import ClipEncoder
from maskmill.storage import Store
from maskmill.storage.images import load_image
from maskmill.storage.queries import training_set
from maskmill.storage.schema import STAGE_GT
from maskmill.storage.writer import utc_now

# Validation images the generator presets are re-calibrated on, at most (a bound on the
# retrain's cost).
CALIBRATION_IMAGES = 8
# The trained weights' file inside the Ray Train checkpoint.
CHECKPOINT_FILE = "model.pt"
# What a scaled-down image is padded with: the mean colour, which the model's normalisation
# turns into zeros, as it does the padding of its own input frame.
PAD_COLOUR = tuple(round(c) for c in PIXEL_MEAN)


@dataclass
class RetrainConfig:
    """How a retrain runs.

    Why the defaults (argued over counts, measured on generated scenes and on the fluorescence
    nuclei of ``bench/cells.py``, never fitted to one data set):

    - ``epochs`` 4: a pre-trained decoder adapts to a new domain within a few passes over a few
      hundred masks at lr 1e-4; on the nuclei 2 passes reached half the gain of 4 (1-click mIoU
      0.52 -> 0.67 vs 0.71 on other images). Earlier rounds' masks are drawn again in every
      later retrain, so a mask ends up seen many more times than ``epochs``.
    - ``new_share`` 1/2: a round's masks get as many draws as the whole history, whatever
      their sizes, so neither drowns the other.
    - ``encoder_blocks`` 2 (of tiny's 6, with the neck): the frozen encoder is what a new
      domain needs changed most (nuclei, 60 steps: 0.64 frozen, 0.67 two blocks, 0.69 all
      six); two blocks add about a tenth to a CPU step, the whole encoder a third, and the
      promotion rule rejects what over-fits.
    - ``min_steps`` 10 so the warm-up and the cosine have steps to act on; ``max_steps`` 200
      bounds a retrain at about 6 minutes with 2 CPU workers.
    - ``tolerance`` 0: base and candidate are scored on the same masks with the same
      deterministic clicks, so a drop is a measured drop, not noise of the comparison; and an
      allowance would compound (n promotions, each a little worse). Ties go to the candidate:
      it has seen more data.

    Attributes:
        steps: optimiser steps (each worker contributes one draw per step); None: the adaptive
            schedule (:func:`schedule_steps`).
        workers: Ray Train workers (one GPU each where the cluster has GPUs).
        lr: peak AdamW learning rate (warm-up over a tenth of the steps, then cosine to 5 %,
            ``engine.training.pretrain.learning_rate``).
        masks_per_image: masks of an image simulated together per draw.
        encoder_blocks: what of the image encoder trains besides the prompt encoder and mask
            decoder (always trained): the last ``encoder_blocks`` ViT blocks and the neck; 0
            freezes it, None trains all of it.
        stages: mask stages trained on.
        include_auto: also train on the automatic stage's masks.
        seed: seed of sampling, augmentation and prompt simulation.
        min_mask_area: masks smaller than this (pixels) are not trained on.
        epochs: how many times the adaptive schedule draws each new mask, on average.
        new_share: share of the draws that go to the new masks when older ones are replayed.
        min_steps: fewest steps of the adaptive schedule.
        max_steps: most steps of the adaptive schedule (a bound on a retrain's cost).
        flip_probability: chance that a draw is mirrored left-right.
        scale_jitter: a draw's scale is log-uniform in [1 / (1 + j), 1 + j]; 0 turns it off.
        tolerance: the candidate is promoted when its validation 1-click mIoU is at least the
            base's minus this.
        approved_only: train only on masks a reviewer approved (and ground truth); by default
            a round and stage with review verdicts gives its approved masks and one without
            gives all (``storage.queries.reviewed_masks``).
        concepts: also (re)train the model's concept head on the training masks' categories
            (:func:`fit_concepts`), where they have any.
        clip_model: also (re)train the model's CLIP text prompts (:func:`fit_text_prompts`)
            with this open_clip model (a name, or ``local-dir:/folder``); None: the model keeps
            the text head it has, if any.
        clip_weights: the weights file of a named ``clip_model`` (never downloaded).
        embedding_cache: the held-out evaluation after training reads and writes the store's
            embedding cache (``engine.embeddings``).
    """

    steps: int | None = None
    workers: int = 2
    lr: float = 1e-4
    masks_per_image: int = 4
    encoder_blocks: int | None = 2
    stages: tuple[str, ...] = (STAGE_GT, "manual", "semi")
    include_auto: bool = False
    seed: int = 0
    min_mask_area: int = 64
    epochs: float = 4.0
    new_share: float = 0.5
    min_steps: int = 10
    max_steps: int = 200
    flip_probability: float = 0.5
    scale_jitter: float = 0.25
    tolerance: float = 0.0
    approved_only: bool = False
    concepts: bool = True
    clip_model: str | None = None
    clip_weights: str | None = None
    embedding_cache: bool = True

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps is None or self.steps >= 1,
            "workers": self.workers >= 1,
            "lr": self.lr > 0,
            "masks_per_image": self.masks_per_image >= 1,
            "epochs": self.epochs > 0,
            "new_share": 0.0 < self.new_share <= 1.0,
            "min_steps": 1 <= self.min_steps <= self.max_steps,
            "flip_probability": 0.0 <= self.flip_probability <= 1.0,
            "scale_jitter": 0.0 <= self.scale_jitter < 1.0,
            "tolerance": self.tolerance >= 0.0,
        }
        wrong = [name for name, ok in checks.items() if not ok]
        if wrong:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in wrong)
            raise ValueError(f"RetrainConfig: out of range: {values}")
        self.stages = tuple(self.stages)


def schedule_steps(new_masks: int, replayed_masks: int, config: RetrainConfig) -> int:
    """Steps of the adaptive schedule:
    ``clamp(ceil(epochs x new_masks / (share x masks_per_step)), min_steps, max_steps)``, with
    ``masks_per_step = workers x masks_per_image`` and ``share = new_share`` when there are
    ``replayed_masks`` to mix in, else 1. So each new mask is drawn about ``epochs`` times
    (until ``max_steps``), and the replayed masks fill the other ``1 - share`` of the draws."""
    if new_masks <= 0:
        return 0
    share = config.new_share if replayed_masks > 0 else 1.0
    masks_per_step = config.workers * config.masks_per_image
    steps = math.ceil(config.epochs * new_masks / (share * masks_per_step))
    return int(min(config.max_steps, max(config.min_steps, steps)))


def data_digest(samples: list[dict[str, Any]]) -> str:
    """A short hash of a training set (image ids and mask RLEs), kept in the model's meta."""
    digest = hashlib.blake2b(digest_size=8)
    for sample in samples:
        digest.update(sample["image_id"].encode())
        for mask in sample["masks"]:
            digest.update(mask["counts"].encode())
    return digest.hexdigest()


def promotion(
    base: dict[str, float], candidate: dict[str, float], tolerance: float
) -> tuple[bool, str]:
    """Whether a candidate with validation scores ``candidate`` replaces a base with ``base``
    (both :func:`engine.plan.evaluate_validation` results), and why, in words.

    Promoted when ``candidate["miou"] >= base["miou"] - tolerance``. Without validation masks
    nothing shows the candidate is not worse, so it is not promoted.
    """
    if not base or not candidate:
        return False, "no validation masks to compare on"
    change = candidate["miou"] - base["miou"]
    verdict = (
        f"validation 1-click mIoU {base['miou']:.4f} -> {candidate['miou']:.4f} "
        f"({change:+.4f}, tolerance {tolerance}) on {candidate['masks']} masks"
    )
    if change >= -tolerance:
        return True, verdict
    return False, verdict + ": worse"


def retrain(
    store: Store,
    round_: int,
    plan: Plan,
    base_meta: dict[str, Any],
    config: RetrainConfig | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train the model of ``base_meta`` on the store's masks up to round ``round_``, store it
    as the next version (meta ``round`` = ``round_``) and promote it or not on the validation
    images; return the new version's meta.

    A version already stored for ``round_`` is returned as it is (a resumed run retrains once).
    Ray must be initialised (:func:`engine.ray_pool.init_ray`).
    """
    config = config or RetrainConfig()
    for meta in store.model_metas():
        if int(meta.get("round") or 0) == round_:
            return meta
    stages = tuple(config.stages) + (("auto",) if config.include_auto else ())
    held_apart = sorted(set(plan.heldout) | set(plan.validation))
    samples = training_set(
        store,
        stages,
        round_ + 1,
        held_apart,
        config.min_mask_area,
        approved_only=config.approved_only,
    )
    # Masks of rounds after the base's own are new to it (all of them for a starting model).
    seen_round = int(base_meta.get("round") or 0) if base_meta.get("source") == "retrain" else -1
    new_masks = sum(len(s["masks"]) for s in samples if s["round"] > seen_round)
    replayed_masks = sum(len(s["masks"]) for s in samples if s["round"] <= seen_round)
    steps = (
        config.steps
        if config.steps is not None
        else schedule_steps(new_masks, replayed_masks, config)
    )
    started = time.perf_counter()
    base = load_checkpoint(base_meta["uri"])
    # The validation truth is what annotators accepted: never the automatic stage's masks.
    validation = validation_samples(store, plan, config.stages, round_ + 1, config.min_mask_area)
    if samples and steps > 0:
        model, train_metrics = _fit(base_meta["uri"], samples, config, steps, seen_round)
        scores = {
            "base": evaluate_validation(base, validation),
            "candidate": evaluate_validation(model, validation),
        }
        promoted, decision = promotion(scores["base"], scores["candidate"], config.tolerance)
        heldout = evaluate_heldout(
            store, plan, model, progress=progress, embedding_cache=config.embedding_cache
        )
        concept_metrics = fit_concepts(model, samples, config) if config.concepts else {}
        if config.clip_model:
            concept_metrics.update(fit_text_prompts(model, samples, config))
    else:  # nothing new to learn from: the same weights, stored for the record, not promoted
        model, train_metrics, scores, concept_metrics = base, {"steps": 0}, {}, {}
        promoted, decision = False, "no new masks to train on"
        heldout = {k: v for k, v in (base_meta.get("metrics") or {}).items() if "heldout" in k}
    if promoted:
        # The generator thresholds travel with the weights: the base's presets, re-expressed in
        # the new IoU head's units on the validation images, whose truth is the annotators'
        # masks (kept as they are when it cannot be). Never on the held-out images: they only
        # report, so nothing the engine decides may have looked at them.
        calibration = calibrate_presets(
            model,
            generator_presets(base),
            validation[:CALIBRATION_IMAGES],
            STAGE_GENERATOR,
            quality_bar=base.metadata.get("generator_quality_bar"),
            base=base,
        )
        presets, quality_bar = calibration.presets, calibration.quality_bar
        calibration_report = {"quality_bar": quality_bar, **calibration.report}
    else:  # a version no round uses keeps its base's presets, uncalibrated
        presets = generator_presets(base)
        quality_bar = base.metadata.get("generator_quality_bar")
        calibration_report = {"skipped": "not promoted"}
    metrics = {
        **heldout,
        **train_metrics,
        **concept_metrics,
        "train_images": len(samples),
        "train_masks": new_masks + replayed_masks,
        "new_masks": new_masks,
        "replayed_masks": replayed_masks,
        "train_seconds": time.perf_counter() - started,
    }
    version = max(int(m["version"]) for m in store.model_metas()) + 1
    meta = {
        "round": round_,
        "source": "retrain",
        "base_version": int(base_meta["version"]),
        "promoted": promoted,
        "decision": decision,
        "validation": {
            **scores,
            "images": len(validation),
            "tolerance": config.tolerance,
        },
        "config": model.config.to_dict(),
        "data_digest": data_digest(samples),
        "generator_presets": presets,
        "preset_calibration": calibration_report,
        "concepts": list(model.concept_head.names) if model.concept_head is not None else [],
        "text_prompts": model.text_head.clip_name if model.text_head is not None else None,
        "metrics": metrics,
        "retrain": {**asdict(config), "steps": steps, "stages": list(stages)},
        "created_at": utc_now().isoformat(),
    }
    if not promoted:
        meta["rejected"] = decision
    checkpoint_meta = {
        "round": round_,
        "base_version": meta["base_version"],
        "generator_presets": presets,
        "generator_quality_bar": quality_bar,
    }
    store.write_model(version, model_bytes(model, checkpoint_meta), meta)
    return next(m for m in store.model_metas() if int(m["version"]) == version)


def fit_concepts(
    model: Sam,
    samples: list[dict[str, Any]],
    config: RetrainConfig,
    concept_config: ConceptTrainingConfig | None = None,
) -> dict[str, Any]:
    """Train ``model.concept_head`` (in place) on the categories of the training masks
    (``engine.training.concepts``); returns its figures (numbers). A training
    set without categories leaves the model's head as it was and returns ``{}``."""
    concept_config = concept_config or ConceptTrainingConfig(seed=config.seed)
    labelled = [s for s in samples if any(s.get("categories") or [])]
    if not labelled:
        return {}
    chosen = spread(labelled, concept_config.max_images)
    started = time.perf_counter()
    images = [load_image(s["uri"], exif_transpose=False) for s in chosen]
    was_training = model.training
    model.eval()
    examples = concept_examples(model, chosen, images, concept_config)
    model.train(was_training)
    if not (examples.labels >= 0).any():
        return {}
    head, figures = train_concept_head(examples, concept_config)
    model.concept_head = head.to(model.device)
    return {
        **figures,
        "concept_images": examples.images,
        "concept_seconds": time.perf_counter() - started,
    }


def spread(samples: list[dict[str, Any]], most: int) -> list[dict[str, Any]]:
    """At most ``most`` samples, spread evenly over the (id-sorted) list, so a head's training
    cost is bounded whatever the store's size."""
    stride = max(1, math.ceil(len(samples) / most))
    return samples[::stride][:most]


def fit_text_prompts(
    model: Sam,
    samples: list[dict[str, Any]],
    config: RetrainConfig,
    text_config: TextPromptTrainingConfig | None = None,
    clip: ClipEncoder | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Train ``model.text_head`` (in place) with ``config.clip_model`` (or ``clip``) on the
    training masks (``engine.training.text_prompts``); returns its figures. The model's own
    weights do not change. ``progress``: called (done, total) after each image's examples.

    A training set with no mask large enough for CLIP leaves the model's text head as it was
    and returns ``{}``.

    Raises:
        ClipEncoderError: the CLIP cannot be loaded from local files.
    """
    text_config = text_config or TextPromptTrainingConfig(seed=config.seed)
    if clip is None:
        clip = ClipEncoder.load(config.clip_model, config.clip_weights, device=model.device)
    chosen = spread([s for s in samples if s["masks"]], text_config.max_images)
    started = time.perf_counter()
    images = [load_image(s["uri"], exif_transpose=False) for s in chosen]
    was_training = model.training
    model.eval()
    try:
        examples = text_prompt_examples(model, clip, chosen, images, text_config, progress)
    except ValueError:  # no mask large enough for CLIP to see: the model keeps what it had
        model.train(was_training)
        return {}
    head, figures = train_text_prompt_head(model, clip, examples, text_config)
    model.train(was_training)
    model.text_head = head.to(model.device)
    return {
        **figures,
        "text_images": examples.images,
        "text_seconds": time.perf_counter() - started,
    }


def _fit(
    base_uri: str,
    samples: list[dict[str, Any]],
    config: RetrainConfig,
    steps: int,
    seen_round: int = -1,
) -> tuple[Sam, dict[str, Any]]:
    """Run the Ray Train job of ``steps`` steps, its workers spread over the cluster's nodes;
    return the trained model and its training metrics (rank 0's, with ``train_worker_nodes``:
    how many nodes the workers ran on, and ``train_node_ids``: their Ray node ids). Samples of
    rounds after ``seen_round`` are the new ones (:func:`_draw`)."""
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
                "steps": steps,
                "seen_round": seen_round,
            },
            scaling_config=ScalingConfig(
                num_workers=config.workers,
                # A GPU per worker, or none: with fewer GPUs than workers the job would
                # wait forever for the missing ones.
                use_gpu=gpus_available(at_least=config.workers),
                resources_per_worker={"CPU": 1},
                # One worker per node where the cluster has the nodes: the steps run in
                # parallel on separate machines' cores. A soft spread: workers share a node
                # when there are fewer nodes (or free CPUs) than workers.
                placement_strategy="SPREAD",
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


# ------------------------------------------------------------------------------------ draws


@dataclass(frozen=True)
class Draw:
    """What one worker trains on at one step.

    Attributes:
        index: the sample (image) drawn.
        pick: indices of its masks trained on, sorted, at most ``masks_per_image``.
        seed: seed of the draw's prompt simulation.
        flip: mirror image and masks left-right.
        scale: scale factor of image and masks (:func:`augment`).
        offset: (y, x) in [0, 1): where the crop window (scale > 1) or the scaled image
            (scale < 1) sits, as a share of the room there is.
    """

    index: int
    pick: tuple[int, ...]
    seed: int
    flip: bool
    scale: float
    offset: tuple[float, float]


def _draw(
    samples: list[dict[str, Any]],
    config: RetrainConfig,
    step: int,
    rank: int,
    world: int,
    seen_round: int = -1,
) -> Draw:
    """The draw of worker ``rank`` of ``world`` at ``step``: a function of the seed, the step
    and the rank only.

    The image comes from the new samples (round after ``seen_round``) with probability
    ``new_share``, else from the replayed ones (always from whichever group is the only one);
    within a group, an image's chance is proportional to its masks, so every mask of the group
    is equally likely to be trained on.
    """
    number = step * world + rank
    rng = np.random.default_rng([config.seed, number])
    new = [i for i, s in enumerate(samples) if s["round"] > seen_round]
    old = [i for i, s in enumerate(samples) if s["round"] <= seen_round]
    use_new = bool(new) and (not old or rng.random() < config.new_share)
    group = new if use_new else old
    weights = np.array([len(samples[i]["masks"]) for i in group], dtype=np.float64)
    index = int(group[rng.choice(len(group), p=weights / weights.sum())])
    chosen = rng.permutation(len(samples[index]["masks"]))[: config.masks_per_image]
    pick = tuple(int(i) for i in np.sort(chosen))
    flip = bool(rng.random() < config.flip_probability)
    jitter = math.log1p(config.scale_jitter)
    scale = float(math.exp(rng.uniform(-jitter, jitter))) if jitter > 0 else 1.0
    offset = (float(rng.random()), float(rng.random()))
    return Draw(index, pick, config.seed * 1_000_003 + number, flip, scale, offset)


def augment(
    image: np.ndarray,
    masks: np.ndarray,
    flip: bool = False,
    scale: float = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Flip and scale an (H, W, 3) uint8 image and its (M, H, W) bool masks together; the
    result has the same shapes.

    ``flip`` mirrors left-right. ``scale`` > 1 enlarges both (image bilinear, masks nearest)
    and crops an (H, W) window at ``offset`` (y, x) of the room there is; ``scale`` < 1 shrinks
    both and places them at ``offset`` on an (H, W) canvas of ``PAD_COLOUR`` (masks empty there).
    """
    if image.ndim != 3 or masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"augment needs an (H, W, 3) image and (M, H, W) masks of its size, got image "
            f"{image.shape} and masks {masks.shape}"
        )
    if flip:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    height, width = image.shape[:2]
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_h, new_w) == (height, width):
        return np.ascontiguousarray(image), np.ascontiguousarray(masks)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    resized_masks = np.stack(
        [
            np.asarray(Image.fromarray(m.astype(np.uint8)).resize((new_w, new_h), Image.NEAREST))
            for m in masks
        ]
    ).astype(bool)
    if scale > 1:
        top = min(new_h - height, int(offset[0] * (new_h - height + 1)))
        left = min(new_w - width, int(offset[1] * (new_w - width + 1)))
        window = (slice(top, top + height), slice(left, left + width))
        return resized[window].copy(), resized_masks[(slice(None), *window)].copy()
    top = min(height - new_h, int(offset[0] * (height - new_h + 1)))
    left = min(width - new_w, int(offset[1] * (width - new_w + 1)))
    canvas = np.empty_like(image)
    canvas[:] = PAD_COLOUR
    canvas[top : top + new_h, left : left + new_w] = resized
    placed = np.zeros_like(masks)
    placed[:, top : top + new_h, left : left + new_w] = resized_masks
    return canvas, placed


def training_example(
    image: np.ndarray, masks: list[np.ndarray], draw: Draw, long_side: int
) -> tuple[np.ndarray, np.ndarray]:
    """The (H, W, 3) uint8 image and (M, H, W) bool masks a draw trains on: the picked masks
    of the sample (``masks``, each (H, W) bool), augmented (:func:`augment`).

    A mask that loses more than half of its (scaled) area to the crop is left out, as is one
    with no pixel left at the model's input size ``long_side``; when none is left the draw is
    trained without its scale jitter, and at worst on the sample's largest mask alone.
    """
    picked = np.stack([masks[i] for i in draw.pick])
    augmented, moved = augment(image, picked, draw.flip, draw.scale, draw.offset)
    expected = picked.reshape(len(picked), -1).sum(1) * draw.scale**2
    kept = (moved.reshape(len(moved), -1).sum(1) >= 0.5 * expected) & _visible(moved, long_side)
    if kept.any():
        return augmented, moved[kept]
    augmented, moved = augment(image, picked, draw.flip)
    kept = _visible(moved, long_side)
    if kept.any():
        return augmented, moved[kept]
    largest = max(range(len(masks)), key=lambda i: int(masks[i].sum()))
    return augment(image, masks[largest][None], draw.flip)


def _visible(masks: np.ndarray, long_side: int) -> np.ndarray:
    """(M,) bool: whether each (M, H, W) mask keeps a pixel in the model's input frame."""
    return prepare_masks(masks, long_side).flatten(1).any(dim=1).numpy()


# ------------------------------------------------------------------------------- the worker


def _train_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the same steps on every rank, each on its own draw."""
    import ray.train
    import ray.train.torch
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from maskmill.engine.training.pretrain import (
        PromptSimulationStep,
        build_optimizer,
        learning_rate,
        train_step,
    )
    from maskmill.model import load_checkpoint, save_checkpoint
    from maskmill.storage import rle
    from maskmill.storage.images import load_image

    config = RetrainConfig(**loop_config["config"])
    samples, steps, seen_round = (
        loop_config["samples"],
        loop_config["steps"],
        loop_config["seen_round"],
    )
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(1)  # one core per worker (resources_per_worker)
    schedule = retrain_schedule(config, steps)
    model = load_checkpoint(loop_config["base_uri"])
    # A step whose prompts are all points leaves the box-corner embeddings without a gradient
    # (and the other way round), so DDP must look for unused parameters in every backward.
    simulation_step = ray.train.torch.prepare_model(
        PromptSimulationStep(model, schedule.simulation, config.encoder_blocks),
        parallel_strategy_kwargs={"find_unused_parameters": True},
    )
    optimizer = build_optimizer(model, schedule)
    simulation_step.train()
    decoded: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}
    losses, first_ious, last_ious = [], [], []
    report_every = max(1, steps // 10)
    for step in range(steps):
        draw = _draw(samples, config, step, rank, world, seen_round)
        if draw.index not in decoded:  # each worker decodes an image once
            sample = samples[draw.index]
            decoded[draw.index] = (
                load_image(sample["uri"], exif_transpose=False),
                [rle.decode(m) for m in sample["masks"]],
            )
        image, masks = training_example(*decoded[draw.index], draw, model.image_size)
        result = train_step(
            simulation_step,
            optimizer,
            image,
            masks,
            torch.Generator().manual_seed(draw.seed),
            learning_rate(schedule, step),
            schedule.grad_clip,
        )
        losses.append(float(result.loss.detach()))
        first_ious.append(float(result.ious[0].mean()))
        last_ious.append(float(result.ious[-1].mean()))
        if (step + 1) % report_every == 0 and step + 1 < steps:
            # Progress; every rank reports at the same steps (reports are collective).
            ray.train.report(
                {"step": step + 1, "train_loss": float(np.mean(losses[-report_every:]))}
            )
    tail = max(1, len(losses) // 4)
    metrics: dict[str, Any] = {
        "steps": steps,
        "workers": world,
        "train_loss_first": float(np.mean(losses[:tail])),
        "train_loss_last": float(np.mean(losses[-tail:])),
        "train_iou1_last": float(np.mean(first_ious[-tail:])),
        "train_iou_final_last": float(np.mean(last_ious[-tail:])),
    }
    # Where the ranks ran (rank 0's metrics are the run's): shows the job was spread.
    node_ids = _rank_node_ids(world)
    metrics["train_worker_nodes"] = len(set(node_ids))
    metrics["train_node_ids"] = sorted(set(node_ids))
    # And on what: the model's device (cuda where Ray Train gave each worker a GPU) and the
    # process group's backend (nccl on GPUs, gloo on CPUs; none for a single worker).
    metrics["train_device"] = model.device.type
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    metrics["train_backend"] = str(torch.distributed.get_backend()) if distributed else None
    if isinstance(simulation_step, DistributedDataParallel):
        simulation_step = simulation_step.module
    with tempfile.TemporaryDirectory(prefix="maskmill-retrain-ckpt-") as folder:
        checkpoint = None
        if rank == 0:  # the replicas are equal: one checkpoint, with rank 0's metrics
            save_checkpoint(simulation_step.model.eval(), os.path.join(folder, CHECKPOINT_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)  # uploads before it returns


def _rank_node_ids(world: int) -> list[str]:
    """The Ray node id of every rank of a ``world``-rank training job, by rank; a collective
    call, so every rank must make it (the same step on each)."""
    import ray
    import torch.distributed as dist

    node_id = ray.get_runtime_context().get_node_id()
    if world == 1 or not dist.is_initialized():
        return [node_id]
    # One small object per rank, once, through the process group Ray Train set up.
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, node_id)
    return [str(n) for n in gathered]


def retrain_schedule(config: RetrainConfig, steps: int) -> TrainConfig:
    """The ``engine.training.pretrain.TrainConfig`` whose learning-rate schedule and simulation
    a retrain of ``steps`` steps uses: warm-up over a tenth of them, cosine to 5 % after."""
    return TrainConfig(steps=steps, lr=config.lr, warmup=max(1, steps // 10), seed=config.seed)
