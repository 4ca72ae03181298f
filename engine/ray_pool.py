"""Pools of Ray actors that run a model over images: the automatic mask generator
(:class:`GeneratorPool`) and box prompts (:class:`BoxPool`, stage ``boxes``).

Each actor loads the model once, when it starts, and then works on one image after another; it
reads the image itself from its URI, so only a URI (and, for boxes, the image's boxes) goes out
and SA-1B records (RLE strings, a few kB per image) come back. With GPUs in the cluster every
actor takes one. One image's error comes back as that image's failure, not as a crash.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.util import ActorPool

from maskmill.storage.images import ImageInfo


@dataclass
class ImageResult:
    """What an actor made of one image: records, or the reason it failed.

    Attributes:
        image: the image, as the images table records it.
        records: SA-1B records (``MaskGenerator.generate``'s, or one per box of
            ``engine.boxes.box_masks``; None when failed).
        error: the failure message (None when it worked).
        seconds: the actor's time on the image (load + model).
    """

    image: ImageInfo
    records: list[dict[str, Any]] | None
    error: str | None
    seconds: float


def image_result(
    info: ImageInfo, work: Callable[[np.ndarray], list[dict[str, Any]]]
) -> ImageResult:
    """``work`` on the image ``info`` names, read as stored ((H, W, 3) uint8 RGB,
    ``storage.images.load_stored_image``): its records, or the failure: the image's own reason
    when it cannot be read, ``model_error`` with the exception when ``work`` raises."""
    from maskmill.storage.images import BadImageError, load_stored_image

    start = time.perf_counter()
    try:
        image = load_stored_image(info)
        records = work(image)
    except BadImageError as error:
        return ImageResult(info, None, str(error), time.perf_counter() - start)
    except Exception as error:  # noqa: BLE001 - one image's model error must not end the round
        message = f"{info.uri}: model_error: {type(error).__name__}: {error}"
        return ImageResult(info, None, message, time.perf_counter() - start)
    return ImageResult(info, records, None, time.perf_counter() - start)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to Ray once: a new local cluster by default, ``address`` for an existing one.

    An already initialised Ray (a test session's, a notebook's) is used as it is.
    """
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def gpus_available(at_least: int = 1) -> bool:
    """Whether the Ray cluster has at least ``at_least`` GPUs."""
    return ray.cluster_resources().get("GPU", 0) >= at_least


def gpus_per_actor(workers: int) -> float:
    """One GPU per actor where the cluster has enough; with fewer GPUs than actors they share
    them evenly (Ray's fractional GPUs), so no actor waits forever for a GPU that is not there;
    0 without GPUs."""
    gpus = ray.cluster_resources().get("GPU", 0)
    return 0 if gpus < 1 else min(1.0, gpus / workers)


@ray.remote
class GeneratorActor:
    """Loads the model once and generates masks for the images it is sent."""

    def __init__(self, checkpoint: str, preset: str, options: dict[str, Any], threads: int) -> None:
        import torch

        from maskmill.engine.stages import stage_generator
        from maskmill.model import load_checkpoint

        # One actor per core: more threads each would only fight over the same cores.
        torch.set_num_threads(max(1, threads))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_checkpoint(checkpoint, device=device)
        self.generator = stage_generator(model, preset, options)
        self.pid = os.getpid()

    def run(self, info: ImageInfo) -> ImageResult:
        """The generator's SA-1B records of one image."""
        return image_result(info, self.generator.generate)

    def ready(self) -> tuple[int, dict[str, float]]:
        """The actor's process id and its generator's thresholds, once its model is loaded."""
        thresholds = {
            "pred_iou_thresh": float(self.generator.pred_iou_thresh),
            "stability_score_thresh": float(self.generator.stability_score_thresh),
        }
        return self.pid, thresholds


@ray.remote
class BoxActor:
    """Loads the model once and prompts it with the boxes of the images it is sent."""

    def __init__(self, checkpoint: str | None, threads: int) -> None:
        import torch

        from maskmill.model import Predictor, load_model

        torch.set_num_threads(max(1, threads))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, _ = load_model(checkpoint, device=device)
        self.predictor = Predictor(model)
        self.pid = os.getpid()

    def run(self, job: tuple[ImageInfo, np.ndarray]) -> ImageResult:
        """One record per box of an image: ``job`` is the image and its (N, 4) XYXY pixel
        boxes (``engine.boxes.box_masks``)."""
        from maskmill.engine.boxes import box_masks

        info, boxes = job
        return image_result(info, lambda image: box_masks(self.predictor, image, boxes))

    def ready(self) -> tuple[int, dict[str, float]]:
        """The actor's process id, once its model is loaded (nothing else to report)."""
        return self.pid, {}


class WorkerPool:
    """``workers`` actors of one kind sharing a stream of jobs (images, or images with their
    boxes): each actor class has ``run(job) -> ImageResult`` and ``ready() -> (pid, info)``.

    ::

        with GeneratorPool(checkpoint_uri, workers=2, preset="auto") as pool:
            for result in pool.map(image_infos):   # in completion order
                ...

    Args:
        actor_class: the Ray actor class (:class:`GeneratorActor`, :class:`BoxActor`).
        args: its constructor's arguments before ``threads``.
        workers: number of actors.
        cpus_per_worker: Ray CPUs (and torch threads) per actor.
    """

    def __init__(
        self, actor_class: Any, args: tuple[Any, ...], workers: int = 1, cpus_per_worker: int = 1
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        resources = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_actor(workers)}
        started = time.perf_counter()
        self.actors = [
            actor_class.options(**resources).remote(*args, cpus_per_worker) for _ in range(workers)
        ]
        # Wait for every model to load, so a broken checkpoint fails here, named, not mid-run.
        ready = ray.get([actor.ready.remote() for actor in self.actors])
        self.pids = [pid for pid, _ in ready]
        self.ready_info: dict[str, float] = ready[0][1]
        self.start_seconds = time.perf_counter() - started
        self.pool = ActorPool(self.actors)

    def map(self, jobs: Iterable[Any]) -> Iterator[ImageResult]:
        """Results of ``jobs`` in the order they finish."""
        return self.pool.map_unordered(lambda actor, job: actor.run.remote(job), list(jobs))

    def close(self) -> None:
        """Stop the actors (their models go with them)."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GeneratorPool(WorkerPool):
    """``workers`` generator actors sharing a stream of images (:class:`WorkerPool`).

    Args:
        checkpoint: model file every actor loads (a path or URL all of them can read).
        workers: number of actors.
        preset: the model's generator preset the actors use (``auto`` or ``semi``).
        options: ``MaskGenerator`` parameters over the stage grid and the preset
            (``engine.stages.stage_generator``).
        cpus_per_worker: Ray CPUs (and torch threads) per actor.
    """

    def __init__(
        self,
        checkpoint: str,
        workers: int = 1,
        preset: str = "auto",
        options: dict[str, Any] | None = None,
        cpus_per_worker: int = 1,
    ) -> None:
        args = (checkpoint, preset, dict(options or {}))
        super().__init__(GeneratorActor, args, workers, cpus_per_worker)
        # The thresholds the actors' generators keep masks at (recorded by the stage).
        self.thresholds: dict[str, float] = self.ready_info


class BoxPool(WorkerPool):
    """``workers`` box-prompting actors (:class:`BoxActor`) sharing a stream of
    ``(ImageInfo, (N, 4) XYXY boxes)`` jobs (:class:`WorkerPool`).

    Args:
        checkpoint: model file every actor loads; None: the shipped default model.
        workers: number of actors.
        cpus_per_worker: Ray CPUs (and torch threads) per actor.
    """

    def __init__(self, checkpoint: str | None, workers: int = 1, cpus_per_worker: int = 1) -> None:
        super().__init__(BoxActor, (checkpoint,), workers, cpus_per_worker)
