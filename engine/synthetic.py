"""Synthetic, photo-like images generated from a seed: demo inputs and test data that need no
download."""

from __future__ import annotations

import numpy as np


def photo_like(height: int = 480, width: int = 640, seed: int = 0) -> np.ndarray:
    """An (H, W, 3) uint8 RGB image with what photos have and random noise lacks: a lit
    background gradient, several overlapping textured objects with soft shading, and sensor noise.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(60, 200, size=3).astype(np.float32)
    light = 0.6 + 0.4 * (xx / width * rng.uniform(-1, 1) + yy / height * rng.uniform(-1, 1))
    image = base[None, None, :] * light[..., None]
    for _ in range(rng.integers(4, 8)):
        cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
        ry, rx = rng.uniform(0.06, 0.25) * height, rng.uniform(0.06, 0.25) * width
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        mask = inside <= 1.0
        colour = rng.uniform(20, 235, size=3).astype(np.float32)
        shade = 1.0 - 0.35 * np.clip(inside, 0, 1)  # rounded-object shading
        frequency = rng.uniform(0.05, 0.3)
        texture = 1.0 + 0.08 * np.sin(frequency * xx + rng.uniform(0, 6)) * np.cos(frequency * yy)
        image[mask] = (colour[None, :] * (shade * texture)[mask][:, None]).astype(np.float32)
    image += rng.normal(0, 3.0, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)
