"""Pools of Ray actors that run a model over images: the automatic mask generator
(:class:`GeneratorPool`) and box prompts (:class:`BoxPool`, stage ``boxes``).

Each actor loads the model once, when it starts, and then works on one image after another; it
reads the image itself from its URI, so only a URI (and, for boxes, the image's boxes) goes out
and SA-1B records (RLE strings, a few kB per image) come back. With GPUs in the cluster every
actor takes one. One image's error comes back as that image's failure, not as a crash.

Given the store (``cache_store``), an actor encodes through its embedding cache
(``engine.embeddings``): it reads the embeddings any process wrote before through the store's
fsspec filesystem, and writes the ones it computes, for every later stage and actor.

Streaming and lost workers (:meth:`WorkerPool.map`): at most ``IN_FLIGHT_PER_ACTOR`` jobs per
actor are out at once, so the driver holds a few results whatever the corpus size, and the
actors are spread over the cluster's nodes (Ray's ``SPREAD``). An actor that dies (its node
lost) is not restarted by Ray (``max_restarts=0``: a restart could wait forever for a CPU the
survivors hold); the pool resubmits that actor's unfinished jobs to the surviving actors, and
raises :class:`WorkersLostError` only when none is left (the stage's Prefect task retry then
reruns the stage, which skips the images already committed). A job's result reaches the
caller once; an image resubmitted after its actor died was never returned before.
"""

from __future__ import annotations

import os
import resource
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.exceptions import ObjectLostError, RayActorError

from maskmill.storage.images import ImageInfo
from maskmill.storage.store import Store


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


# Jobs out per actor: one running and one waiting in its queue, so an actor never idles while
# the driver commits a result, and the driver holds a bounded number of results.
IN_FLIGHT_PER_ACTOR = 2
_END = object()  # the end of a pool's jobs


class WorkersLostError(RuntimeError):
    """Every actor of a pool died (their nodes lost) with jobs left; rerun to resume."""


class _Worker:
    """What every pool actor reports about itself (a base of the actor classes)."""

    device = "cpu"  # the torch device its model is on (``cuda`` where Ray gave it a GPU)

    def where(self) -> dict[str, Any]:
        """The actor's node id (Ray's, hex), process id, peak resident memory (bytes) and torch
        device."""
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "peak_rss": peak_rss_bytes(),
            "device": self.device,
        }


def peak_rss_bytes() -> int:
    """This process's peak resident memory, bytes (Linux reports ``ru_maxrss`` in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
class GeneratorActor(_Worker):
    """Loads the model once and generates masks for the images it is sent."""

    def __init__(
        self,
        checkpoint: str,
        preset: str,
        options: dict[str, Any],
        cache_store: Store | None,
        encoder_precision: str,
        threads: int,
    ) -> None:
        import torch

        from maskmill.engine.embeddings import open_embedding_cache
        from maskmill.engine.stages import stage_generator
        from maskmill.model import load_checkpoint

        # One actor per core: more threads each would only fight over the same cores.
        torch.set_num_threads(max(1, threads))
        # Ray sets CUDA_VISIBLE_DEVICES per actor: a GPU is visible only when it was given one.
        device = self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_checkpoint(checkpoint, device=device)
        self.generator = stage_generator(model, preset, options, encoder_precision)
        self.cache = open_embedding_cache(cache_store, model)
        self.pid = os.getpid()

    def run(self, info: ImageInfo) -> ImageResult:
        """The generator's SA-1B records of one image (its crops' embeddings from the cache
        where there)."""
        from maskmill.engine.embeddings import generate_masks

        return image_result(
            info, lambda image: generate_masks(self.generator, info.image_id, image, self.cache)
        )

    def ready(self) -> tuple[int, dict[str, float]]:
        """The actor's process id and its generator's thresholds, once its model is loaded."""
        thresholds = {
            "pred_iou_thresh": float(self.generator.pred_iou_thresh),
            "stability_score_thresh": float(self.generator.stability_score_thresh),
        }
        return self.pid, thresholds


@ray.remote
class BoxActor(_Worker):
    """Loads the model once and prompts it with the boxes of the images it is sent."""

    def __init__(
        self,
        checkpoint: str | None,
        cache_store: Store | None,
        encoder_precision: str,
        threads: int,
    ) -> None:
        import torch

        from maskmill.engine.embeddings import open_embedding_cache
        from maskmill.model import Predictor, load_model

        torch.set_num_threads(max(1, threads))
        # Ray sets CUDA_VISIBLE_DEVICES per actor: a GPU is visible only when it was given one.
        device = self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model, _ = load_model(checkpoint, device=device)
        self.predictor = Predictor(model, encoder_precision)
        self.cache = open_embedding_cache(cache_store, model)
        self.pid = os.getpid()

    def run(self, job: tuple[ImageInfo, np.ndarray]) -> ImageResult:
        """One record per box of an image: ``job`` is the image and its (N, 4) XYXY pixel
        boxes (``engine.boxes.box_masks``)."""
        from maskmill.engine.boxes import box_masks

        info, boxes = job
        return image_result(
            info,
            lambda image: box_masks(
                self.predictor, image, boxes, image_id=info.image_id, cache=self.cache
            ),
        )

    def ready(self) -> tuple[int, dict[str, float]]:
        """The actor's process id, once its model is loaded (nothing else to report)."""
        return self.pid, {}


class WorkerPool:
    """``workers`` actors of one kind sharing a stream of jobs (images, or images with their
    boxes): each actor class has ``run(job) -> ImageResult`` and ``ready() -> (pid, info)``,
    and ``where()`` (:class:`_Worker`). ``node_ids``: each actor's node; ``lost`` and
    ``resubmitted``: actors that died and jobs sent again (module doc).

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
        options = {
            "num_cpus": cpus_per_worker,
            "num_gpus": gpus_per_actor(workers),
            # One actor per node before two on one: a lost node takes fewer actors with it.
            "scheduling_strategy": "SPREAD",
            # A lost actor's jobs go to the survivors (map), not to a restart that may never
            # find a free CPU.
            "max_restarts": 0,
        }
        started = time.perf_counter()
        self.actors = [
            actor_class.options(**options).remote(*args, cpus_per_worker) for _ in range(workers)
        ]
        # Wait for every model to load, so a broken checkpoint fails here, named, not mid-run.
        ready = ray.get([actor.ready.remote() for actor in self.actors])
        self.pids = [pid for pid, _ in ready]
        self.ready_info: dict[str, float] = ready[0][1]
        self.node_ids: list[str] = [w["node_id"] for w in ray.get(self._where(self.actors))]
        self.start_seconds = time.perf_counter() - started
        self.live: list[int] = list(range(workers))  # indexes of the actors still alive
        self.resubmitted = 0  # jobs sent again after their actor died

    @staticmethod
    def _where(actors: list[Any]) -> list[ray.ObjectRef]:
        return [actor.where.remote() for actor in actors]

    @property
    def lost(self) -> int:
        """Actors that died while this pool ran."""
        return len(self.actors) - len(self.live)

    def map(self, jobs: Iterable[Any]) -> Iterator[ImageResult]:
        """Results of ``jobs`` in the order they finish, streamed: ``jobs`` is read lazily and
        at most ``IN_FLIGHT_PER_ACTOR`` jobs per live actor are out at once. A job whose actor
        died (or whose result was lost with its node) is resubmitted to a surviving actor;
        :class:`WorkersLostError` when no actor is left."""
        pending = iter(jobs)
        again: deque[Any] = deque()  # jobs of dead actors, sent before new ones
        running: dict[ray.ObjectRef, tuple[int, Any]] = {}  # result -> (actor index, job)
        load = dict.fromkeys(self.live, 0)
        exhausted = False

        def submit() -> None:
            nonlocal exhausted
            while self.live:
                index = min(self.live, key=load.__getitem__)  # the least busy actor
                if load[index] >= IN_FLIGHT_PER_ACTOR:
                    return
                if again:
                    job = again.popleft()
                elif exhausted or (job := next(pending, _END)) is _END:
                    exhausted = True
                    return
                running[self.actors[index].run.remote(job)] = (index, job)
                load[index] += 1

        submit()
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            index, job = running.pop(ref)
            load[index] -= 1
            try:
                result = ray.get(ref)
            except (RayActorError, ObjectLostError) as error:
                if isinstance(error, RayActorError) and index in self.live:
                    self.live.remove(index)
                again.append(job)
                self.resubmitted += 1
                if not self.live:
                    raise WorkersLostError(
                        f"all {len(self.actors)} workers died (nodes lost?) with jobs left; "
                        "run the stage again to resume: committed images are skipped"
                    ) from error
                submit()
                continue
            submit()
            yield result

    def where(self) -> list[dict[str, Any]]:
        """``where()`` of each live actor: node id, process id, peak memory so far."""
        return ray.get(self._where([self.actors[i] for i in self.live]))

    def close(self) -> None:
        """Stop the actors (their models go with them)."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        self.live = []

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
        cache_store: the store whose embedding cache the actors use; None: no cache.
        encoder_precision: what the actors' image encoders compute in (``Predictor``).
    """

    def __init__(
        self,
        checkpoint: str,
        workers: int = 1,
        preset: str = "auto",
        options: dict[str, Any] | None = None,
        cpus_per_worker: int = 1,
        cache_store: Store | None = None,
        encoder_precision: str = "fp32",
    ) -> None:
        from maskmill.model import encoder_autocast_dtype

        encoder_autocast_dtype(encoder_precision)  # a bad name fails here, not in every actor
        args = (checkpoint, preset, dict(options or {}), cache_store, encoder_precision)
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
        cache_store: the store whose embedding cache the actors use; None: no cache.
        encoder_precision: what the actors' image encoders compute in (``Predictor``).
    """

    def __init__(
        self,
        checkpoint: str | None,
        workers: int = 1,
        cpus_per_worker: int = 1,
        cache_store: Store | None = None,
        encoder_precision: str = "fp32",
    ) -> None:
        from maskmill.model import encoder_autocast_dtype

        encoder_autocast_dtype(encoder_precision)  # a bad name fails here, not in every actor
        args = (checkpoint, cache_store, encoder_precision)
        super().__init__(BoxActor, args, workers, cpus_per_worker)
