"""Synthetic, photo-like images generated from a seed: demo inputs, test data and the seed
dataset that pre-trains the shipped model, with no download.

``photo_like`` is a quick picture without masks. ``scene`` paints a labelled scene — textured,
shaded objects with shadows, overlapping each other, some made of parts (a fruit and its leaf, a
disc and its centre, a mug and its handle) — and returns exact instance and part masks: every
mask is the set of pixels its object or part shows in the image, after occlusion. ``write_coco``
writes such scenes as a COCO dataset (images + instances JSON) the rest of the engine reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

# COCO categories of write_coco: whole objects and their parts.
CATEGORY_OBJECT = 1
CATEGORY_PART = 2
# The kinds of object a scene paints, by name: with ``write_coco(kinds=True)`` each is a
# category of its own (ids 1..8, parts 9), so that concepts have names to learn.
KINDS = ("blob", "ellipse", "rect", "polygon", "fruit", "stack", "target", "mug")
# With ``kind_colours``, each kind's colour (RGB), as real categories have a look of their own
# (hazelnuts are brown); an object's own random colour still shifts it by a quarter.
KIND_COLOURS = {
    "blob": (200, 60, 50),
    "ellipse": (60, 170, 70),
    "rect": (60, 90, 200),
    "polygon": (220, 200, 60),
    "fruit": (150, 60, 170),
    "stack": (60, 190, 200),
    "target": (235, 140, 40),
    "mug": (120, 120, 120),
}


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


@dataclass
class Scene:
    """A generated image with its exact masks.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        instances: (N, H, W) bool visible mask of each whole object (occlusion applied), in
            painting order (later objects lie on top); objects hidden entirely are left out.
        parts: for each instance, a (P, H, W) bool array of its visible parts; P = 0 for objects
            of one piece. Parts of an object are disjoint and their union is the object's mask.
        kinds: for each instance, its kind of object (one of :data:`KINDS`).
    """

    image: np.ndarray
    instances: np.ndarray
    parts: list[np.ndarray] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def all_masks(self, min_area: int = 1) -> np.ndarray:
        """(M, H, W) bool: every instance and every part mask of at least ``min_area`` pixels."""
        masks = [m for m in self.instances if m.sum() >= min_area]
        masks += [p for parts in self.parts for p in parts if p.sum() >= min_area]
        if not masks:
            return np.zeros((0, *self.image.shape[:2]), dtype=bool)
        return np.stack(masks)


def scene(
    height: int = 512,
    width: int = 512,
    seed: int = 0,
    objects: tuple[int, int] = (3, 9),
    kind_colours: bool = False,
) -> Scene:
    """Paint a photo-like scene of textured objects, deterministically from ``seed``.

    Args:
        height, width: image size (H, W) in pixels.
        seed: the same seed gives the same image and masks.
        objects: inclusive range of how many objects to paint.
        kind_colours: paint each object in its kind's colour (:data:`KIND_COLOURS`) instead of
            a random one; shapes, textures and masks stay those of the same seed without.

    Returns:
        The :class:`Scene` with its exact instance and part masks.
    """
    if height < 16 or width < 16:
        raise ValueError(f"scene size must be at least 16 x 16 pixels, got {height} x {width}")
    if not 1 <= objects[0] <= objects[1]:
        raise ValueError(f"objects must be a range (low, high) with 1 <= low <= high: {objects}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = _background(rng, yy, xx)
    # Painter's algorithm on label maps: every pixel remembers the object and part on top.
    object_map = np.zeros((height, width), dtype=np.int32)
    part_map = np.zeros((height, width), dtype=np.int32)
    part_owner: list[int] = []  # part id - 1 -> object id
    object_kinds: dict[int, str] = {}
    n_objects = int(rng.integers(objects[0], objects[1] + 1))
    scale = min(height, width)
    for object_id in range(1, n_objects + 1):
        cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
        size = rng.uniform(0.06, 0.2) * scale
        kind, part_masks = _object_parts(rng, yy, xx, cy, cx, size)
        object_kinds[object_id] = kind
        whole = np.logical_or.reduce(part_masks)
        if not whole.any():
            continue
        _cast_shadow(rng, image, whole, size)
        for mask in part_masks:
            tint = KIND_COLOURS[kind] if kind_colours else None
            _paint(rng, image, mask, yy, xx, tint)
            object_map[mask] = object_id
            part_owner.append(object_id)
            part_map[mask] = len(part_owner)
    image = cv2.GaussianBlur(image, (0, 0), 0.7)  # lens softness; labels stay hard
    image += rng.normal(0.0, 2.5, size=image.shape).astype(np.float32)
    image = np.clip(image, 0, 255).astype(np.uint8)

    instances, parts, kinds = [], [], []
    for object_id in range(1, n_objects + 1):
        visible = object_map == object_id
        if not visible.any():
            continue
        own = [i + 1 for i, owner in enumerate(part_owner) if owner == object_id]
        own_parts = [part_map == p for p in own] if len(own) > 1 else []
        own_parts = [p for p in own_parts if p.any()]
        instances.append(visible)
        kinds.append(object_kinds[object_id])
        # An object whose other parts are all hidden shows as one piece.
        parts.append(np.stack(own_parts) if len(own_parts) > 1 else _no_parts(height, width))
    stacked = np.stack(instances) if instances else np.zeros((0, height, width), dtype=bool)
    return Scene(image=image, instances=stacked, parts=parts, kinds=kinds)


def write_coco(
    folder: str | Path,
    count: int,
    seed: int = 0,
    height: int = 512,
    width: int = 512,
    parts: bool = True,
    min_area: int = 64,
    kinds: bool = False,
) -> Path:
    """Write ``count`` scenes as a COCO dataset: ``folder/images/NNNNNN.png`` and
    ``folder/instances.json``.

    Scene ``i`` uses seed ``seed + i``. Annotations are compressed RLE; category 1 is a whole
    object, category 2 a part (with ``parent_id``, the annotation id of its object); masks below
    ``min_area`` pixels are left out. ``bbox`` is XYWH. With ``kinds``, whole objects are
    categorised by their kind instead (:data:`KINDS`, ids 1..8, parts 9) and painted in its
    colour (:data:`KIND_COLOURS`).

    Returns:
        The path of the instances JSON.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    part_category = len(KINDS) + 1 if kinds else CATEGORY_PART
    for index in range(count):
        generated = scene(height, width, seed=seed + index, kind_colours=kinds)
        file_name = f"{index:06d}.png"
        cv2.imwrite(str(folder / "images" / file_name), generated.image[:, :, ::-1])
        images.append({"id": index, "file_name": file_name, "height": height, "width": width})
        for instance, instance_parts, kind in zip(
            generated.instances, generated.parts, generated.kinds, strict=True
        ):
            if instance.sum() < min_area:
                continue
            category = KINDS.index(kind) + 1 if kinds else CATEGORY_OBJECT
            parent = _annotation(len(annotations) + 1, index, instance, category)
            annotations.append(parent)
            for part in instance_parts if parts else ():
                if part.sum() >= min_area:
                    entry = _annotation(len(annotations) + 1, index, part, part_category)
                    entry["parent_id"] = parent["id"]
                    annotations.append(entry)
    categories = [
        {"id": CATEGORY_OBJECT, "name": "object", "supercategory": "object"},
        {"id": CATEGORY_PART, "name": "part", "supercategory": "object"},
    ]
    if kinds:
        categories = [
            {"id": i + 1, "name": name, "supercategory": "object"} for i, name in enumerate(KINDS)
        ] + [{"id": part_category, "name": "part", "supercategory": "object"}]
    dataset = {
        "info": {"description": f"maskmill synthetic scenes, seeds {seed}..{seed + count - 1}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    path = folder / "instances.json"
    path.write_text(json.dumps(dataset))
    return path


# ------------------------------------------------------------------------------------ internals


def _no_parts(height: int, width: int) -> np.ndarray:
    return np.zeros((0, height, width), dtype=bool)


def _annotation(ann_id: int, image_id: int, mask: np.ndarray, category: int) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category,
        "segmentation": rle,
        "area": int(mask.sum()),
        "bbox": [x, y, w, h],
        "iscrowd": 0,
    }


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """(H, W) float32 noise in about [-1, 1], smooth at the scale of 1 / ``cells``."""
    grid = rng.uniform(-1, 1, size=(cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A lit table or wall: a colour gradient with low-frequency blotches and fine grain."""
    height, width = yy.shape
    base = rng.uniform(70, 230, size=3).astype(np.float32)
    light = 0.75 + 0.25 * (xx / width * rng.uniform(-1, 1) + yy / height * rng.uniform(-1, 1))
    blotch = 1.0 + 0.08 * _smooth_noise(rng, height, width, int(rng.integers(3, 8)))
    image = base[None, None, :] * (light * blotch)[..., None]
    if rng.random() < 0.4:  # wood grain or cloth weave
        frequency = rng.uniform(0.05, 0.4)
        angle = rng.uniform(0, np.pi)
        stripes = np.sin(frequency * (np.cos(angle) * xx + np.sin(angle) * yy))
        image *= (1.0 + rng.uniform(0.02, 0.08) * stripes)[..., None]
    return image.astype(np.float32)


def _rotated(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = xx - cx, yy - cy
    return c * dx + s * dy, -s * dx + c * dy


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0) -> np.ndarray:
    u, v = _rotated(yy, xx, cy, cx, angle)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _blob(rng, yy, xx, cy, cx, radius) -> np.ndarray:
    """A star-convex blob: radius modulated by a few low harmonics of the angle."""
    u, v = _rotated(yy, xx, cy, cx, rng.uniform(0, np.pi))
    aspect = rng.uniform(0.55, 1.0)
    theta = np.arctan2(v / aspect, u)
    r = np.ones_like(theta)
    for k in (2, 3, 4):
        r += rng.uniform(0, 0.12) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v / aspect) <= radius * r


def _rounded_rect(rng, yy, xx, cy, cx, ry, rx) -> np.ndarray:
    u, v = _rotated(yy, xx, cy, cx, rng.uniform(0, np.pi))
    power = rng.uniform(3.0, 8.0)
    return np.abs(u / rx) ** power + np.abs(v / ry) ** power <= 1.0


def _polygon(rng, height, width, cy, cx, radius) -> np.ndarray:
    corners = int(rng.integers(3, 8))
    angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
    radii = radius * rng.uniform(0.7, 1.0, corners)
    points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    canvas = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1)
    return canvas.astype(bool)


def _object_parts(rng, yy, xx, cy, cx, size) -> tuple[str, list[np.ndarray]]:
    """The object's kind (:data:`KINDS`) and disjoint (H, W) bool masks of its parts, painted in
    order (later on top)."""
    height, width = yy.shape
    kind = str(rng.choice(list(KINDS)))
    if kind == "blob":
        shapes = [_blob(rng, yy, xx, cy, cx, size)]
    elif kind == "ellipse":
        angle = rng.uniform(0, np.pi)
        shapes = [_ellipse(yy, xx, cy, cx, size * rng.uniform(0.4, 0.9), size, angle)]
    elif kind == "rect":
        shapes = [_rounded_rect(rng, yy, xx, cy, cx, size * rng.uniform(0.3, 0.9), size)]
    elif kind == "polygon":
        shapes = [_polygon(rng, height, width, cy, cx, size)]
    elif kind == "fruit":  # body, then a leaf or stem at its rim
        body = _blob(rng, yy, xx, cy, cx, size)
        angle = rng.uniform(0, 2 * np.pi)
        ly, lx = cy + 0.95 * size * np.sin(angle), cx + 0.95 * size * np.cos(angle)
        leaf = _ellipse(yy, xx, ly, lx, size * rng.uniform(0.1, 0.2), size * 0.4, angle)
        shapes = [body, leaf]
    elif kind == "stack":  # two or three touching discs, a snowman or a bead chain
        shapes, radius, angle = [], size * 0.6, rng.uniform(0, 2 * np.pi)
        py, px = cy, cx
        for _ in range(int(rng.integers(2, 4))):
            shapes.append(_ellipse(yy, xx, py, px, radius, radius * rng.uniform(0.9, 1.2)))
            step = radius * rng.uniform(1.3, 1.7)
            py, px = py + step * np.sin(angle), px + step * np.cos(angle)
            radius *= rng.uniform(0.65, 0.9)
    elif kind == "target":  # a disc and a distinct centre: a fried egg, a flower, a plate
        outer = _blob(rng, yy, xx, cy, cx, size)
        inner = _ellipse(yy, xx, cy, cx, size * rng.uniform(0.25, 0.5), size * 0.45)
        shapes = [outer, inner]
    else:  # mug: a rounded body and a ring handle on one side
        ry, rx = size * rng.uniform(0.6, 0.9), size * rng.uniform(0.45, 0.7)
        body = _ellipse(yy, xx, cy, cx, ry, rx) if rng.random() < 0.3 else None
        if body is None:
            u, v = xx - cx, yy - cy
            body = np.abs(u / rx) ** 6 + np.abs(v / ry) ** 6 <= 1.0
        side = 1.0 if rng.random() < 0.5 else -1.0
        hx, hr = cx + side * rx, ry * 0.45
        handle = _ellipse(yy, xx, cy, hx, hr, hr) & ~_ellipse(yy, xx, cy, hx, hr * 0.6, hr * 0.6)
        shapes = [handle, body]
    # Later parts cover earlier ones, so each part keeps only what it shows.
    parts: list[np.ndarray] = []
    for shape in shapes:
        parts = [p & ~shape for p in parts]
        parts.append(shape)
    return kind, [p for p in parts if p.any()]


def _cast_shadow(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, size: float):
    """Darken, in place, a blurred copy of ``mask`` shifted away from the light."""
    shift = size * rng.uniform(0.05, 0.2)
    angle = rng.uniform(0, 2 * np.pi)
    matrix = np.float32([[1, 0, shift * np.cos(angle)], [0, 1, shift * np.sin(angle)]])
    height, width = mask.shape
    shadow = cv2.warpAffine(mask.astype(np.float32), matrix, (width, height))
    shadow = cv2.GaussianBlur(shadow, (0, 0), max(1.0, size * 0.08))
    image *= (1.0 - rng.uniform(0.15, 0.4) * shadow)[..., None]


def _paint(
    rng,
    image: np.ndarray,
    mask: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
    tint: tuple[int, int, int] | None = None,
) -> None:
    """Fill ``mask`` of the float (H, W, 3) image with a shaded, textured colour, in place."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return
    y, x = yy[rows, cols], xx[rows, cols]
    cy, cx = y.mean(), x.mean()
    radius = max(2.0, float(np.sqrt(rows.size / np.pi)))
    colour = rng.uniform(15, 240, size=3).astype(np.float32)
    if tint is not None:  # drawn anyway, so the random sequence is the same with or without
        colour = 0.75 * np.asarray(tint, np.float32) + 0.25 * colour
    # Rounded-object shading lit from one side, with a specular highlight on glossy objects.
    ly, lx = rng.uniform(-0.5, 0.5, size=2)
    d2 = ((y - cy) / radius - ly) ** 2 + ((x - cx) / radius - lx) ** 2
    shade = 1.0 - rng.uniform(0.15, 0.5) * np.clip(d2 / 2.0, 0, 1)
    pattern = rng.choice(["flat", "stripes", "spots", "grain"])
    frequency = rng.uniform(0.1, 0.6)
    if pattern == "stripes":
        angle = rng.uniform(0, np.pi)
        texture = 1.0 + 0.15 * np.sin(frequency * (np.cos(angle) * x + np.sin(angle) * y))
    elif pattern == "spots":
        texture = 1.0 + 0.12 * np.sin(frequency * x) * np.sin(frequency * y)
    elif pattern == "grain":
        texture = 1.0 + rng.normal(0.0, 0.08, size=rows.size)
    else:
        texture = np.ones(rows.size)
    pixels = colour[None, :] * (shade * texture)[:, None]
    if rng.random() < 0.5:
        highlight = np.exp(-d2 * rng.uniform(8, 20)) * rng.uniform(60, 140)
        pixels += highlight[:, None]
    image[rows, cols] = pixels.astype(np.float32)
