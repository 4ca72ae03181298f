"""A second domain for the data-engine loop: fluorescence-microscopy-like nuclei.

Nothing like the shipped model's pre-training scenes (textured, coloured objects on photo-like
backgrounds) nor like the fruit photos: dark background, one colour channel, blurred bright
ellipses of uneven intensity with inner texture, touching and clustered, with shot noise and
uneven illumination. Deterministic by seed; ground truth exact (each nucleus's visible pixels).

    python bench/cells.py --out out/cells --count 16        # images/ and instances.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils


def cells_image(
    height: int = 320, width: int = 320, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One image: (H, W, 3) uint8 RGB (green fluorescence) and (N, H, W) bool nucleus masks,
    disjoint (a nucleus painted later hides what it covers)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    signal = np.zeros((height, width), np.float32)
    owner = np.full((height, width), -1, np.int32)
    count = int(rng.integers(8, 22))
    centres = []
    for index in range(count):
        if centres and rng.random() < 0.45:  # clustered: a neighbour of an earlier nucleus
            cy, cx = centres[int(rng.integers(len(centres)))]
            angle = rng.uniform(0, 2 * np.pi)
            step = rng.uniform(22, 32)
            cy, cx = cy + step * np.sin(angle), cx + step * np.cos(angle)
        else:
            cy, cx = rng.uniform(15, height - 15), rng.uniform(15, width - 15)
        centres.append((cy, cx))
        ry, rx = rng.uniform(7, 18), rng.uniform(7, 18)
        theta = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        # A wobbly boundary: the radius varies with the angle.
        phi = np.arctan2(v, u)
        wobble = 1 + 0.12 * np.sin(3 * phi + rng.uniform(0, 6)) + 0.06 * np.sin(5 * phi)
        r = np.sqrt((u / rx) ** 2 + (v / ry) ** 2) / wobble
        inside = r <= 1.0
        if inside.sum() < 40:
            continue
        owner[inside] = index
        brightness = rng.uniform(0.35, 1.0)
        texture = cv2.GaussianBlur(rng.random((height, width)).astype(np.float32), (0, 0), 2.0)
        profile = brightness * (0.75 + 0.25 * (1 - r.clip(0, 1) ** 2)) * (0.8 + 0.4 * texture)
        signal = np.where(inside, profile, signal)
    illumination = 0.7 + 0.3 * np.exp(
        -(((yy - height * rng.uniform(0.2, 0.8)) / height) ** 2)
        - ((xx - width * rng.uniform(0.2, 0.8)) / width) ** 2
    )
    image = cv2.GaussianBlur(signal, (0, 0), 1.2) * illumination
    image = rng.poisson(image * 60 + 4) / 64.0  # shot noise on a faint background
    green = np.clip(image * 255, 0, 255).astype(np.uint8)
    rgb = np.stack([green // 5, green, green // 4], axis=2)
    masks = [owner == i for i in range(count) if (owner == i).sum() >= 40]
    return rgb, np.stack(masks) if masks else np.zeros((0, height, width), bool)


def write_cells(folder: str | Path, count: int, seed: int = 0, size: int = 320) -> Path:
    """``count`` images as a COCO instances file (``folder/instances.json``, RLE masks, one
    category ``nucleus``) with ``folder/images/NNNNNN.png``; returns the JSON path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        image, masks = cells_image(size, size, seed=seed + index)
        name = f"{index:06d}.png"
        cv2.imwrite(str(folder / "images" / name), image[:, :, ::-1])
        images.append({"id": index + 1, "file_name": name, "height": size, "width": size})
        for mask in masks:
            encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": 1,
                    "segmentation": {"size": encoded["size"], "counts": encoded["counts"].decode()},
                    "area": float(mask_utils.area(encoded)),
                    "bbox": [float(v) for v in mask_utils.toBbox(encoded)],
                    "iscrowd": 0,
                }
            )
    path = folder / "instances.json"
    path.write_text(
        json.dumps(
            {
                "info": {"description": f"maskmill bench cells, seeds {seed}..{seed + count - 1}"},
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "nucleus", "supercategory": "cell"}],
            }
        )
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=320)
    args = parser.parse_args(argv)
    print(write_cells(args.out, args.count, args.seed, args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
