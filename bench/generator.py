"""Automatic mask generation: maskmill's MaskGenerator against segment-anything's
SamAutomaticMaskGenerator, same weights and parameters, in one run.

    python bench/generator.py --images ../shared/data/fruits_nuts/images --config tiny
    python bench/generator.py --images DIR --config vit_b --max-images 3
    python bench/generator.py --large-image          # 4000x3000, 32x32 points, one crop layer

Per image: both times, their ratio (reference / maskmill), the number of masks, the share of the
reference's masks matched by one of ours at IoU >= 0.9 and of ours matched by one of its, and
each implementation's peak memory above its starting point (resident set size sampled every
5 ms). Weights: a checkpoint, or random weights shared by both (``--checkpoint`` omitted). Random
weights predict low IoUs, so with them the thresholds default to 0 (every mask goes through every
step) unless given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator

from maskmill.engine.training.synthetic import photo_like
from maskmill.model import build_model, generator_presets, get_config, load_checkpoint
from maskmill.model.mask_generator import MaskGenerator
from maskmill.storage.images import load_image
from reference import build_reference, randomize_

PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak resident set size above the value at entry, sampled in a thread (Linux)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * PAGE

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss() - self.start)
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self.start = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss() - self.start)


def run(generate, image):
    with PeakMemory() as memory, torch.inference_mode():
        start = time.perf_counter()
        records = generate(image)
        seconds = time.perf_counter() - start
    return records, seconds, memory.peak


def match_rates(reference, ours) -> tuple[float, float]:
    if not reference and not ours:
        return 1.0, 1.0
    if not reference or not ours:
        return 0.0, 0.0
    a = [r["segmentation"] for r in reference]
    b = [r["segmentation"] for r in ours]
    ious = np.asarray(mask_utils.iou(a, b, [0] * len(b))).reshape(len(a), len(b))
    return float((ious.max(1) >= 0.9).mean()), float((ious.max(0) >= 0.9).mean())


def models(args):
    if args.checkpoint:
        ours = load_checkpoint(args.checkpoint)
        reference = build_reference(ours.config)
        reference.load_state_dict(ours.state_dict())
    else:
        reference = build_reference(get_config(args.config))
        ours = build_model(args.config)
        ours.load_state_dict(randomize_(reference, seed=0))
    return reference.eval(), ours.eval()


def parameters(args, ours) -> dict:
    """The run's generator parameters: random weights at thresholds 0, a checkpoint at its own
    ``auto`` preset (``generator_presets``: SAM's for an official file); options override."""
    if args.checkpoint is None:
        thresholds = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    else:
        thresholds = generator_presets(ours)["auto"]
    for name in ("pred_iou_thresh", "stability_score_thresh"):
        if getattr(args, name) is not None:
            thresholds[name] = getattr(args, name)
    return dict(
        points_per_side=args.points_per_side,
        crop_n_layers=args.crop_n_layers,
        min_mask_region_area=args.min_mask_region_area,
        **thresholds,
    )


def bench_images(args) -> None:
    reference, ours = models(args)
    params = parameters(args, ours)
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in {".jpg", ".png"})
    paths = paths[: args.max_images] if args.max_images else paths
    reference_generator = SamAutomaticMaskGenerator(reference, output_mode="coco_rle", **params)
    our_generator = MaskGenerator(ours, **params)
    print(
        f"config {ours.config.name}, "
        f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'random weights'}"
    )
    print(f"parameters {params}, {torch.get_num_threads()} threads\n")
    header = (
        f"{'image':14s}{'ref s':>8s}{'ours s':>8s}{'ratio':>7s}{'ref n':>7s}{'our n':>7s}"
        f"{'ref matched':>12s}{'ours matched':>13s}{'ref MiB':>9s}{'our MiB':>9s}"
    )
    print(header)
    rows = []
    for path in paths:
        image = load_image(str(path))
        expected, ref_s, ref_mem = run(reference_generator.generate, image)
        got, our_s, our_mem = run(our_generator.generate, image)
        ref_matched, ours_matched = match_rates(expected, got)
        rows.append((ref_s, our_s, ref_matched, ours_matched, ref_mem, our_mem))
        print(
            f"{path.name:14s}{ref_s:8.2f}{our_s:8.2f}{ref_s / our_s:6.2f}x{len(expected):7d}"
            f"{len(got):7d}{ref_matched:12.3f}{ours_matched:13.3f}"
            f"{ref_mem / 2**20:9.0f}{our_mem / 2**20:9.0f}",
            flush=True,
        )
    ref_s = statistics.median(r[0] for r in rows)
    our_s = statistics.median(r[1] for r in rows)
    print(
        f"\nmedian: reference {ref_s:.2f} s, maskmill {our_s:.2f} s, ratio {ref_s / our_s:.2f}x; "
        f"matched: reference {statistics.median(r[2] for r in rows):.3f}, "
        f"ours {statistics.median(r[3] for r in rows):.3f}; peak MiB: reference "
        f"{max(r[4] for r in rows) / 2**20:.0f}, maskmill {max(r[5] for r in rows) / 2**20:.0f}"
    )
    print("goal: ratio >= 4x with both match rates >= 0.98")


def bench_large_image(args) -> None:
    _, ours = models(args)
    params = parameters(args, ours) | {"points_per_side": 32, "crop_n_layers": 1}
    image = photo_like(3000, 4000, seed=0)
    records, seconds, peak = run(MaskGenerator(ours, **params).generate, image)
    print(
        f"4000x3000 image, {ours.config.name}, {params}: {len(records)} masks in {seconds:.1f} s, "
        f"peak memory {peak / 2**30:.2f} GiB above start (goal < 4 GiB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", help="folder of .jpg / .png photos")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--checkpoint", help="weights for both (default: random, shared)")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--pred-iou-thresh", type=float)
    parser.add_argument("--stability-score-thresh", type=float)
    parser.add_argument("--crop-n-layers", type=int, default=0)
    parser.add_argument("--min-mask-region-area", type=int, default=0)
    parser.add_argument("--max-images", type=int)
    parser.add_argument("--large-image", action="store_true", help="the 4000x3000 memory check")
    args = parser.parse_args()
    if args.large_image:
        bench_large_image(args)
    elif args.images:
        bench_images(args)
    else:
        parser.error("give --images DIR or --large-image")


if __name__ == "__main__":
    main()
