"""Pictures of masks over their image, for people to look at."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# Distinct, colour-blind-friendly mask colours (Okabe-Ito).
PALETTE = np.array(
    [[0, 114, 178], [230, 159, 0], [0, 158, 115], [204, 121, 167], [86, 180, 233], [213, 94, 0]],
    dtype=np.float32,
)


def render_overlay(
    image: np.ndarray,
    mask: np.ndarray,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
    colour_index: int = 0,
    title: str | None = None,
) -> np.ndarray:
    """Draw one mask, with its outline and the prompt, over an image.

    Args:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) bool.
        points: (N, 2) XY pixels; labels (N,) 1 foreground (green), 0 background (red).
        box: (4,) XYXY pixels.
        colour_index: which palette colour fills the mask.
        title: text written in the top-left corner.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    colour = PALETTE[colour_index % len(PALETTE)]
    out = image.astype(np.float32)
    out[mask] = 0.45 * out[mask] + 0.55 * colour
    # Outline: mask pixels with a non-mask 4-neighbour.
    padded = np.pad(mask, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    out[mask & ~interior] = 255.0
    picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    radius = max(3, round(max(image.shape[:2]) / 120))
    if box is not None:
        draw.rectangle([float(v) for v in box], outline=(255, 255, 0), width=max(1, radius // 2))
    if points is not None:
        for (x, y), label in zip(points, labels, strict=True):
            fill = (40, 220, 60) if label == 1 else (230, 40, 40)
            draw.ellipse(
                [x - radius, y - radius, x + radius, y + radius], fill=fill, outline=(255, 255, 255)
            )
    if title:
        draw.rectangle([0, 0, 8 + 7 * len(title), 18], fill=(0, 0, 0))
        draw.text((4, 3), title, fill=(255, 255, 255))
    return np.asarray(picture)
