"""What the engine costs as it scales, one section per question; each prints figures against a
reference measured in the same run.

    python bench/scale.py                          # every section, defaults
    python bench/scale.py --sections cache --images 4 --size 1024 --points-per-side 4

Sections:

``cache`` (the embedding cache, ``engine.embeddings``): the fully automatic stage over the same
images twice in one store: round 1 with a ``vit_b`` model of random weights (cold cache: every
image encoded and its float16 embedding written), then round 2 with a copy of that model whose
mask decoder changed, as a retrain with the encoder frozen leaves it (same encoder digest, so
every embedding is read back). Printed: both stages' wall times (actor start and model load
included, Ray's own start not), the actors' time on the images, the ratio second / first (goal
<= 0.2), the cache's entries and bytes, and whether round 2 wrote no entry (all hits).
Generated scenes (``engine.training.synthetic.write_coco``) at ``--size`` px longest side
(4:3); the generator grid is small (``--points-per-side``), as the cost to save is the encoder's.

``throughput``: the automatic stage (no embedding cache, ``--points-per-side`` grid, the
``--scale-model``) over one store of ``--corpus`` generated 64x64 images with 1 worker, then 2:
images/s, wall and after the actors started, and the speed-up.

``memory``: the same stage on 1 worker over a store of each ``--corpus`` size (``--corpus 500
5000``): the driver's peak RSS while images stream (above its RSS before), its peak over the
whole stage, closing figures included, and the actor's peak RSS. The images' loop streams, so
the first and the actor's should not grow with the corpus. The closing figures
(``storage.queries.stage_figures``, counted once per finish) read the stage's own shards, each
once: their time (``closing_figures_s``, measured alone after the stage) grows with the stage's
shard count, not the store's. Then the stage once more over the finished store: a rerun with
nothing to do returns the stored rounds row (a listing of the stage's shards and a read of the
row), its time and the driver's RSS growth during it.

``stats``: ``compute_stats`` over ``--stats-masks`` synthetic mask rows (goal <= 2 s at 10 M).

``gpu`` (not in the default run; :func:`bench_gpu`): the GPU paths of issue 15 item 5 — encoder
images/s at fp32 / bf16 / fp16 autocast, bf16 and fp16 mask parity with fp32, the automatic
stage on Ray actors with a GPU each at fp32 and bf16, and a Ray Train retrain on NCCL. Without
CUDA it runs on the CPU and says so. On a GPU machine:

    python bench/scale.py --sections gpu --model vit_h --images 8 --corpus 64 --workers 1

    python bench/scale.py --sections throughput memory --corpus 500 5000 --scale-model small
    python bench/scale.py --sections stats

Other sections are added as ``def bench_<name>(args) -> dict`` and listed in :data:`SECTIONS`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskmill.engine.plan import make_plan, model_bytes
from maskmill.engine.ray_pool import init_ray
from maskmill.engine.stages import fully_automatic
from maskmill.engine.training.synthetic import write_coco
from maskmill.model import build_model
from maskmill.model.sam import encoder_digest
from maskmill.storage import Store, cache_size, import_coco
from maskmill.storage.queries import stage_figures

CACHE_GOAL = 0.2  # second stage / first stage, at most
STATS_GOAL_S = 2.0  # maskmill stats over 10 M masks, at most


def bench_cache(args: argparse.Namespace) -> dict[str, Any]:
    """The ``cache`` section (module doc): two automatic stages, cold then warm cache."""
    options = {
        "points_per_side": args.points_per_side,
        # Random weights predict low IoUs: keep every mask so the decoder does real work.
        "pred_iou_thresh": 0.0,
        "stability_score_thresh": 0.0,
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        height = args.size * 3 // 4
        annotations = write_coco(
            work / "scenes", args.images, seed=args.seed, height=height, width=args.size
        )
        store = Store(str(work / "store"))
        import_coco(str(annotations), str(work / "scenes" / "images"), store)
        plan = make_plan(store, 0, 0, True, seed=args.seed, holdout=0.0)

        model = build_model(args.model, seed=args.seed)
        # The frozen-encoder retrain: only the mask decoder's weights move.
        retrained = copy.deepcopy(model)
        with torch.no_grad():
            for parameter in retrained.mask_decoder.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
        assert encoder_digest(retrained) == encoder_digest(model)
        store.write_model(1, model_bytes(model, {}), {"round": 0, "metrics": {}})
        store.write_model(2, model_bytes(retrained, {}), {"round": 1, "metrics": {}})
        metas = store.model_metas()

        init_ray(num_cpus=args.workers)
        timings = []
        for round_, meta in ((1, metas[0]), (2, metas[1])):
            before = cache_size(store)
            started = time.perf_counter()
            row = fully_automatic(store, round_, plan, plan.auto, meta, args.workers, options)
            wall = time.perf_counter() - started
            metrics = _metrics(row)
            after = cache_size(store)
            timings.append(
                {
                    "wall_s": wall,
                    "worker_s": metrics["worker_seconds"],
                    "pool_start_s": metrics["pool_start_seconds"],
                    "masks": row["masks"],
                    "entries_written": after.entries - before.entries,
                }
            )
        size = cache_size(store)
    first, second = timings
    return {
        "model": args.model,
        "images": args.images,
        "size": f"{args.size}x{height}",
        "first_wall_s": first["wall_s"],
        "second_wall_s": second["wall_s"],
        "ratio_wall": second["wall_s"] / first["wall_s"],
        "first_worker_s": first["worker_s"],
        "second_worker_s": second["worker_s"],
        "ratio_worker": second["worker_s"] / first["worker_s"],
        "pool_start_s": f"{first['pool_start_s']:.1f} / {second['pool_start_s']:.1f}",
        "masks": f"{first['masks']} / {second['masks']}",
        "cache_entries": size.entries,
        "cache_mb": size.bytes / 2**20,
        "second_all_hits": second["entries_written"] == 0,
        "goal": f"ratio_wall <= {CACHE_GOAL}",
        "goal_met": second["wall_s"] / first["wall_s"] <= CACHE_GOAL,
    }


def corpus_store(root: Path, images: int, args: argparse.Namespace) -> tuple[Store, Any, dict]:
    """A store of ``images`` generated 64x64 PNGs (noise: written in about 1 ms each) with
    the ``--scale-model`` as v1; the store, its all-automatic plan and v1's meta."""
    from PIL import Image

    from maskmill.storage import ingest_folder

    folder = root / "images"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(args.seed)
    for index in range(images):
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:06d}.png", compress_level=1)
    store = Store(str(root / "store"))
    ingest_folder(store, str(folder))
    model = scale_model(args.scale_model)
    store.write_model(1, model_bytes(model, {}), {"round": 0, "config": model.config.to_dict()})
    plan = make_plan(store, 0, 0, True, seed=args.seed, holdout=0.0)
    return store, plan, store.model_metas()[-1]


def scale_model(name: str) -> Any:
    """``default``: the shipped model (``tiny``, 512 px input, ~0.3 s an image on one CPU);
    ``small``: the same architecture at a 128 px input with random weights (16x less encoder
    work), for corpora whose model time would not fit a benchmark run."""
    from maskmill.model import load_default
    from maskmill.model.config import get_config

    if name == "default":
        return load_default()
    return build_model(dataclasses.replace(get_config("tiny"), image_size=128), seed=0)


class RssSampler:
    """Peak resident memory of this process while open, sampled every 20 ms from
    ``/proc/self/statm`` (``ru_maxrss`` is the whole life's peak: store making included)."""

    def __init__(self, streamed: Callable[[], bool] | None = None) -> None:
        self.peak = self.start = self.streaming_peak = _rss_bytes()
        # Checked once a second: True once every image is committed; the peak up to then is
        # ``streaming_peak`` (the images' loop; the stage's closing queries come after).
        self.streamed = streamed or (lambda: False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        streaming, ticks = True, 0
        while not self._stop.wait(0.02):
            rss = _rss_bytes()
            self.peak = max(self.peak, rss)
            ticks += 1
            if streaming and ticks % 50 == 0:
                streaming = not self.streamed()
            if streaming:
                self.streaming_peak = max(self.streaming_peak, rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _auto_stage(store: Store, round_: int, plan: Any, meta: dict, workers: int, points: int):
    """One automatic stage (the stage grid at ``points`` a side, the model's ``auto``
    thresholds, no embedding cache: every image costs its encoder pass); its metrics, wall
    seconds and the driver's peak RSS during it."""
    options = {"points_per_side": points}

    def streamed() -> bool:
        return len(store.shard_keys("masks", round_, "auto")) >= len(plan.auto)

    with RssSampler(streamed) as rss:
        started = time.perf_counter()
        row = fully_automatic(
            store, round_, plan, plan.auto, meta, workers, options, embedding_cache=False
        )
        wall = time.perf_counter() - started
    metrics = _metrics(row)
    assert metrics["images"] == len(plan.auto), (metrics["images"], len(plan.auto))
    return metrics, wall, rss


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    """The ``memory`` section: the automatic stage on one worker over ``--corpus`` sizes
    (500, and 5000 with ``--corpus 500 5000``), each in a store of its own: the driver's peak
    RSS during the stage (above its RSS before) and the actor's peak RSS. Streaming holds
    both flat: the ratio largest / smallest corpus should stay near 1. Then the closing
    figures alone, and a rerun of the finished stage (module doc)."""
    init_ray(num_cpus=max(2, args.workers))
    figures: dict[str, Any] = {"model": args.scale_model, "points_per_side": args.points_per_side}
    peaks = []
    for images in args.corpus:
        with tempfile.TemporaryDirectory() as tmp:
            store, plan, meta = corpus_store(Path(tmp), images, args)
            metrics, wall, rss = _auto_stage(store, 1, plan, meta, 1, args.points_per_side)
            # What the stage's finish counts (once), alone: the stage's own shards, each once.
            with RssSampler() as closing:
                started = time.perf_counter()
                stage_figures(store, 1, "auto")
                closing_s = time.perf_counter() - started
            # The same stage again, every image done: it returns the stored row.
            with RssSampler() as resume:
                started = time.perf_counter()
                fully_automatic(store, 1, plan, plan.auto, meta, 1, {}, embedding_cache=False)
                resume_s = time.perf_counter() - started
        driver_mb = (rss.streaming_peak - rss.start) / 2**20
        actor_mb = metrics["actor_peak_rss_mb"]
        peaks.append((driver_mb, actor_mb))
        figures[f"{images}_images_per_s"] = images / wall
        figures[f"{images}_driver_rss_mb"] = f"{rss.start / 2**20:.0f} + {driver_mb:.1f}"
        # The stage's closing figures (DuckDB over the stage's shards) peak above the loop.
        figures[f"{images}_driver_closing_mb"] = (rss.peak - rss.start) / 2**20
        figures[f"{images}_actor_peak_mb"] = actor_mb
        figures[f"{images}_closing_figures_s"] = closing_s
        figures[f"{images}_closing_figures_mb"] = (closing.peak - closing.start) / 2**20
        figures[f"{images}_resume_all_done_s"] = resume_s
        figures[f"{images}_resume_driver_mb"] = (resume.peak - resume.start) / 2**20
    if len(peaks) > 1:
        figures["driver_growth_mb"] = peaks[-1][0] - peaks[0][0]
        figures["actor_ratio"] = peaks[-1][1] / peaks[0][1]
    return figures


def bench_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """The ``throughput`` section: the automatic stage over one store of ``--corpus[0]``
    images with 1 worker (round 1), then 2 (round 2): images/s over the stage's wall time
    (actors' start and model load included) and over the time after the pool started."""
    init_ray(num_cpus=2)
    images = args.corpus[0]
    figures: dict[str, Any] = {"model": args.scale_model, "images": images}
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        store, plan, meta = corpus_store(Path(tmp), images, args)
        for round_, workers in ((1, 1), (2, 2)):
            metrics, wall, _ = _auto_stage(store, round_, plan, meta, workers, args.points_per_side)
            rates[workers] = images / (wall - metrics["pool_start_seconds"])
            figures[f"{workers}_worker_images_per_s"] = images / wall
            figures[f"{workers}_worker_steady_images_per_s"] = rates[workers]
    figures["speedup_2_vs_1"] = rates[2] / rates[1]
    return figures


def bench_stats(args: argparse.Namespace) -> dict[str, Any]:
    """The ``stats`` section: ``maskmill stats`` (``compute_stats``) over ``--stats-masks``
    synthetic mask rows (``bench/storage.py --synthetic``); goal <= 2 s at 10 M."""
    spec = importlib.util.spec_from_file_location(
        "bench_storage", Path(__file__).with_name("storage.py")
    )
    storage_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(storage_bench)
    figures = storage_bench.bench_synthetic(args.stats_masks, None, keep=False)
    figures["goal"] = f"stats_s_best_of_3 <= {STATS_GOAL_S:g} at 10 M masks"
    if args.stats_masks >= 10_000_000:
        figures["goal_met"] = figures["stats_s_best_of_3"] <= STATS_GOAL_S
    return figures


def bench_gpu(args: argparse.Namespace) -> dict[str, Any]:
    """The ``gpu`` section (issue 15, item 5): the GPU paths, measured wherever it runs (without
    CUDA it runs them on the CPU and ``device`` says so: those are not GPU figures).

    - Encoder speed: ``--model`` (random weights; ``vit_h`` for SAM's largest) encodes
      ``--images`` photo-like 1024x768 images ``--gpu-batch`` at a time at each encoder
      precision (one warm-up call first): images/s and the ratio to fp32.
    - Parity: the shipped model, or ``--checkpoint`` (e.g. an official SAM file), prompted with
      the box of every object of ``--images`` generated scenes at each precision: mask IoU
      with fp32, smallest and mean (the bar: >= 0.98).
    - Actors: the automatic stage over ``--corpus[0]`` generated images on ``--workers`` Ray
      actors (a GPU each where the cluster has them) at fp32, then bf16: images/s after the
      actors started, and the actors' devices.
    - Ray Train: a retrain of the shipped model (``--retrain-steps`` steps on four generated
      scenes) on as many workers as the machine has GPUs (1 without): its device, process
      group backend (nccl on GPUs) and seconds.
    """
    from pycocotools import mask as mask_utils
    from torchvision.ops import masks_to_boxes

    from maskmill.engine.training.synthetic import photo_like, scene
    from maskmill.model import ENCODER_PRECISIONS, Predictor, load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    figures: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (no CUDA)",
        "encoder_model": args.model,
    }

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    model = build_model(args.model, seed=0).to(device).eval()
    photos = [photo_like(768, 1024, seed=args.seed + i) for i in range(args.images)]
    rates = {}
    for precision in ENCODER_PRECISIONS:
        predictor = Predictor(model, precision)
        predictor.embed_images(photos[:1], batch_size=1)  # warm-up: kernels picked, caches filled
        synchronize()
        started = time.perf_counter()
        predictor.embed_images(photos, batch_size=args.gpu_batch)
        synchronize()
        rates[precision] = len(photos) / (time.perf_counter() - started)
        figures[f"encoder_{precision}_images_per_s"] = rates[precision]
    for precision in ENCODER_PRECISIONS[1:]:
        figures[f"encoder_{precision}_speedup"] = rates[precision] / rates["fp32"]
    del model, predictor
    if device == "cuda":
        torch.cuda.empty_cache()

    trained, source = load_model(args.checkpoint, device=device)
    figures["parity_model"] = source
    masks: dict[str, list[np.ndarray]] = {p: [] for p in ENCODER_PRECISIONS}
    for index in range(args.images):
        painted = scene(seed=args.seed + index)
        boxes = masks_to_boxes(torch.from_numpy(painted.instances)).numpy()  # XYXY
        for precision in ENCODER_PRECISIONS:
            predictor = Predictor(trained, precision)
            predictor.set_image(painted.image)
            for box in boxes:
                mask = predictor.predict(box=box, multimask_output=False)[0][0]
                masks[precision].append(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))
    figures["parity_masks"] = len(masks["fp32"])
    for precision in ENCODER_PRECISIONS[1:]:
        ious = [
            mask_utils.iou([low], [full], [0])[0, 0]
            for low, full in zip(masks[precision], masks["fp32"], strict=True)
        ]
        figures[f"parity_{precision}_iou_min"] = float(min(ious))
        figures[f"parity_{precision}_iou_mean"] = float(np.mean(ious))

    init_ray()
    with tempfile.TemporaryDirectory() as tmp:
        store, plan, meta = corpus_store(Path(tmp), args.corpus[0], args)
        for round_, precision in enumerate(("fp32", "bf16"), start=1):
            started = time.perf_counter()
            row = fully_automatic(
                store,
                round_,
                plan,
                plan.auto,
                meta,
                args.workers,
                {"points_per_side": args.points_per_side},
                embedding_cache=False,
                encoder_precision=precision,
            )
            wall = time.perf_counter() - started
            metrics = _metrics(row)
            steady = wall - metrics["pool_start_seconds"]
            figures[f"actors_{precision}_images_per_s"] = args.corpus[0] / steady
        figures["actor_devices"] = ",".join(metrics["actor_devices"])
        figures["actors"] = args.workers
    figures.update(_gpu_retrain(args))
    return figures


def _gpu_retrain(args: argparse.Namespace) -> dict[str, Any]:
    """The Ray Train part of :func:`bench_gpu`: the retraining step (``retrain._fit``, what
    ``maskmill run`` calls between rounds) on the shipped model and four generated scenes."""
    from PIL import Image

    from maskmill.engine.training.retrain import RetrainConfig, _fit
    from maskmill.engine.training.synthetic import scene
    from maskmill.model import load_default, save_checkpoint
    from maskmill.storage import rle

    workers = max(1, torch.cuda.device_count())
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base.pt")
        save_checkpoint(load_default(), base)
        samples = []
        for index in range(4):
            generated = scene(seed=args.seed + 100 + index)
            uri = os.path.join(tmp, f"scene-{index}.png")
            Image.fromarray(generated.image).save(uri)
            masks = [rle.encode(m) for m in generated.all_masks(64)]
            samples.append({"image_id": f"s{index}", "uri": uri, "round": 1, "masks": masks})
        config = RetrainConfig(workers=workers, seed=args.seed)
        started = time.perf_counter()
        _, metrics = _fit(base, samples, config, steps=args.retrain_steps, seen_round=1)
        seconds = time.perf_counter() - started
    return {
        "train_workers": workers,
        "train_device": metrics["train_device"],
        "train_backend": metrics["train_backend"],
        "train_seconds": seconds,
        "train_steps": args.retrain_steps,
    }


def _metrics(row: dict[str, Any]) -> dict[str, Any]:
    import json

    metrics = row["metrics"]
    return json.loads(metrics) if isinstance(metrics, str) else dict(metrics or {})


SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "cache": bench_cache,
    "throughput": bench_throughput,
    "memory": bench_memory,
    "stats": bench_stats,
    "gpu": bench_gpu,
}


def format_table(section: str, figures: dict[str, Any]) -> str:
    """A section's figures as an aligned two-column table."""
    width = max(len(name) for name in figures)
    lines = [f"[{section}]"]
    for name, value in figures.items():
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"  {name:<{width}}  {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=sorted(SECTIONS),
        default=sorted(set(SECTIONS) - {"gpu"}),
        help="sections to run (default: all but gpu, which is for a GPU machine)",
    )
    parser.add_argument("--images", type=int, default=4, help="generated scenes (default 4)")
    parser.add_argument(
        "--size", type=int, default=1024, help="longest side of the scenes, px (default 1024)"
    )
    parser.add_argument(
        "--model", default="vit_b", help="config of the random-weight model (default vit_b)"
    )
    parser.add_argument(
        "--points-per-side", type=int, default=4, help="generator grid side (default 4)"
    )
    parser.add_argument("--workers", type=int, default=1, help="Ray actors (default 1)")
    parser.add_argument(
        "--corpus",
        type=int,
        nargs="+",
        default=[500],
        help="memory: corpus sizes, each its own store (default 500; e.g. 500 5000); "
        "throughput: the first",
    )
    parser.add_argument(
        "--scale-model",
        choices=("default", "small"),
        default="default",
        help="memory/throughput model: the shipped default, or small (128 px input)",
    )
    parser.add_argument(
        "--stats-masks", type=int, default=10_000_000, help="stats: mask rows (default 10 M)"
    )
    parser.add_argument(
        "--gpu-batch", type=int, default=4, help="gpu: images per encoder call (default 4)"
    )
    parser.add_argument(
        "--checkpoint", help="gpu: the trained model of the parity check (default: shipped)"
    )
    parser.add_argument(
        "--retrain-steps", type=int, default=20, help="gpu: Ray Train steps (default 20)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    failed = False
    for section in args.sections:
        figures = SECTIONS[section](args)
        print(format_table(section, figures), flush=True)
        failed |= figures.get("goal_met") is False
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
