"""Encoder and per-click decoder time of maskmill against segment-anything, same weights, one run.

    python bench/model.py                     # tiny and vit_b
    python bench/model.py --configs vit_b --repeats 5 --clicks 50

Both implementations get one random state dict; runs are interleaved (reference, ours, reference,
ours, ...) so machine noise hits both alike, and medians are reported. Ratios are reference time
over maskmill time (> 1: maskmill is faster). Goals (issue 2): encoder >= 1.3x; one click
(prompt encoder + mask decoder, vit_b) <= 30 ms or >= 2x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from segment_anything import SamPredictor

from maskmill.engine.training.synthetic import photo_like
from maskmill.model import Predictor, build_model, get_config
from reference import build_reference, randomize_


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def bench_config(name: str, repeats: int, clicks: int, image: np.ndarray) -> dict:
    config = get_config(name)
    reference = build_reference(config)
    ours = build_model(config)
    ours.load_state_dict(randomize_(reference, seed=0))
    reference_predictor, our_predictor = SamPredictor(reference), Predictor(ours)

    # Encoder: set_image end to end (resize, normalise, pad, ViT), interleaved.
    encoder = {"reference": [], "maskmill": []}
    with torch.inference_mode():
        reference_predictor.set_image(image)  # warm-up (allocator, thread pool)
        our_predictor.set_image(image)
        for _ in range(repeats):
            encoder["reference"].append(_timed(lambda: reference_predictor.set_image(image)))
            encoder["maskmill"].append(_timed(lambda: our_predictor.set_image(image)))

    rng = np.random.default_rng(0)
    height, width = image.shape[:2]
    points = rng.uniform([0, 0], [width, height], size=(clicks, 1, 2)).astype(np.float32)
    features = reference_predictor.features
    embedding = our_predictor.image_embedding
    prompt_encoder, mask_decoder = reference.prompt_encoder, reference.mask_decoder
    foreground = torch.ones(1, 1, dtype=torch.int64)

    def reference_click(point: np.ndarray) -> None:
        coords = torch.as_tensor(
            reference_predictor.transform.apply_coords(point, (height, width))
        ).float()[None]
        sparse, dense = prompt_encoder(points=(coords, foreground), boxes=None, masks=None)
        mask_decoder(features, prompt_encoder.get_dense_pe(), sparse, dense, True)

    def our_click(point: np.ndarray) -> None:
        scale = np.array(embedding.input_size[::-1]) / [width, height]
        coords = torch.as_tensor(point * scale).float()[None]
        our_predictor.decode(embedding, (coords, foreground), None, None, True)

    click = {"reference": [], "maskmill": []}
    predict = {"reference": [], "maskmill": []}
    labels = np.array([1])
    with torch.inference_mode():
        reference_click(points[0])
        our_click(points[0])
        for point in points:
            click["reference"].append(_timed(lambda p=point: reference_click(p)))
            click["maskmill"].append(_timed(lambda p=point: our_click(p)))
            # The whole predict() call: also upsampling to the image and thresholding.
            predict["reference"].append(
                _timed(lambda p=point: reference_predictor.predict(p, labels))
            )
            predict["maskmill"].append(_timed(lambda p=point: our_predictor.predict(p, labels)))

    def summary(times: dict[str, list[float]]) -> dict:
        ref_ms = statistics.median(times["reference"]) * 1000
        our_ms = statistics.median(times["maskmill"]) * 1000
        return {"reference_ms": ref_ms, "maskmill_ms": our_ms, "ratio": ref_ms / our_ms}

    return {
        "config": name,
        "image": f"{width}x{height}",
        "threads": torch.get_num_threads(),
        "encoder": summary(encoder),
        "click": summary(click),
        "predict": summary(predict),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "vit_b"])
    parser.add_argument("--repeats", type=int, default=3, help="encoder runs per implementation")
    parser.add_argument("--clicks", type=int, default=30, help="clicks per implementation")
    parser.add_argument("--json", action="store_true", help="print one JSON object per config")
    args = parser.parse_args()

    image = photo_like(768, 1024, seed=0)
    for name in args.configs:
        result = bench_config(name, args.repeats, args.clicks, image)
        if args.json:
            print(json.dumps(result))
            continue
        print(f"\n{name}  ({result['image']} photo-like image, {result['threads']} threads)")
        print(f"{'':28s}{'reference ms':>14s}{'maskmill ms':>14s}{'ratio':>8s}")
        for key, label in [
            ("encoder", "encoder (set_image)"),
            ("click", "click (prompt enc + decoder)"),
            ("predict", "predict() incl. upsampling"),
        ]:
            row = result[key]
            print(
                f"{label:28s}{row['reference_ms']:14.1f}{row['maskmill_ms']:14.1f}"
                f"{row['ratio']:7.2f}x"
            )
        encoder_ok = result["encoder"]["ratio"] >= 1.3
        click = result["click"]
        click_ok = click["maskmill_ms"] <= 30 or click["ratio"] >= 2
        print(f"goal encoder >= 1.3x: {'met' if encoder_ok else 'NOT met'}")
        print(f"goal click <= 30 ms or >= 2x: {'met' if click_ok else 'NOT met'}")


if __name__ == "__main__":
    main()
