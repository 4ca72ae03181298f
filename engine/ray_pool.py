"""A pool of Ray actors that run the automatic mask generator.

Each actor loads the model once, when it starts, and then generates masks for one image after
another; it reads the image itself from its URI, so only a URI goes out and SA-1B records (RLE
strings, a few kB per image) come back. With GPUs in the cluster every actor takes one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.util import ActorPool

from maskmill.storage.images import ImageInfo


@dataclass
class ImageResult:
    """What an actor made of one image: records, or the reason it failed.

    Attributes:
        image: the image, as the images table records it.
        records: SA-1B records of ``MaskGenerator.generate`` (None when failed).
        error: the failure message (None when it worked).
        seconds: the actor's time on the image (load + generate).
    """

    image: ImageInfo
    records: list[dict[str, Any]] | None
    error: str | None
    seconds: float


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

    def generate(self, info: ImageInfo) -> ImageResult:
        from maskmill.storage.images import BadImageError, load_stored_image

        start = time.perf_counter()
        try:
            image = load_stored_image(info)
            records = self.generator.generate(image)
        except BadImageError as error:
            return ImageResult(info, None, str(error), time.perf_counter() - start)
        except Exception as error:  # noqa: BLE001 - one image's model error must not end the round
            message = f"{info.uri}: model_error: {type(error).__name__}: {error}"
            return ImageResult(info, None, message, time.perf_counter() - start)
        return ImageResult(info, records, None, time.perf_counter() - start)

    def ready(self) -> tuple[int, dict[str, float]]:
        """The actor's process id and its generator's thresholds, once its model is loaded."""
        thresholds = {
            "pred_iou_thresh": float(self.generator.pred_iou_thresh),
            "stability_score_thresh": float(self.generator.stability_score_thresh),
        }
        return self.pid, thresholds


class GeneratorPool:
    """``workers`` generator actors sharing a stream of images.

    ::

        with GeneratorPool(checkpoint_uri, workers=2, preset="auto") as pool:
            for result in pool.map(image_infos):   # in completion order
                ...

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
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        resources = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_actor(workers)}
        started = time.perf_counter()
        self.actors = [
            GeneratorActor.options(**resources).remote(
                checkpoint, preset, dict(options or {}), cpus_per_worker
            )
            for _ in range(workers)
        ]
        # Wait for every model to load, so a broken checkpoint fails here, named, not mid-run.
        ready = ray.get([actor.ready.remote() for actor in self.actors])
        self.pids = [pid for pid, _ in ready]
        self.thresholds: dict[str, float] = ready[0][1]
        self.start_seconds = time.perf_counter() - started
        self.pool = ActorPool(self.actors)

    def map(self, images: Iterable[ImageInfo]) -> Iterator[ImageResult]:
        """Results of ``images`` in the order they finish."""
        return self.pool.map_unordered(
            lambda actor, info: actor.generate.remote(info), list(images)
        )

    def close(self) -> None:
        """Stop the actors (their models go with them)."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> GeneratorPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
