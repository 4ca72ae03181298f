"""Automatic mask generation: SAM's grid-prompting algorithm, with SA-1B annotation records.

Parameters, defaults and output fields are segment-anything's ``SamAutomaticMaskGenerator``'s;
the result is the same, computed faster:

* the predicted-IoU filter runs before any upsampling (it does not depend on resolution), so only
  surviving masks are upsampled;
* survivors are upsampled, scored, thresholded, boxed and RLE-encoded in chunks of
  ``upsample_chunk`` masks, so peak memory is bounded by the chunk and ``points_per_batch``, not
  by the grid;
* RLE and boxes come from pycocotools on whole chunks (C loops, no per-pixel Python); areas are
  counted on the chunk's masks while they are encoded;
* crops of all images go through the encoder in batches (``generate_batch``).

``MaskGenerator.from_preset(model, "auto" | "semi")`` keeps masks at the model's own thresholds,
stored with its weights (:mod:`maskmill.model.presets`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import box_area, nms

from .predictor import EncoderPrecision, ImageEmbedding, Predictor
from .presets import PRESET_NAMES, generator_presets
from .sam import Sam
from .transforms import scale_coords, to_rgb_uint8

# A box side within this many pixels of an inner crop edge marks a mask cut by the crop.
CROP_EDGE_TOLERANCE = 20.0


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n², 2) XY points evenly spaced in [0, 1]², cell centres, row-major."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(
    n_per_side: int, n_layers: int, scale_per_layer: int
) -> list[np.ndarray]:
    """Point grids of crop layers 0..n_layers, the side divided by ``scale_per_layer`` each."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    image_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes (XYXY, exclusive right/bottom) of every layer and their layer indexes.

    Layer 0 is the whole image; layer i has (2^i)² overlapping crops.
    """
    height, width = image_size
    short_side = min(height, width)
    boxes, layers = [[0, 0, width, height]], [0]

    def crop_length(length: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + length) / n_crops))

    for layer in range(n_layers):
        per_side = 2 ** (layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / per_side))
        crop_w = crop_length(width, per_side, overlap)
        crop_h = crop_length(height, per_side, overlap)
        x0s = [int((crop_w - overlap) * i) for i in range(per_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(per_side)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)])
            layers.append(layer + 1)
    return boxes, layers


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, 4) XYXY boxes with inclusive right/bottom pixel indexes, as
    segment-anything computes them for NMS; an empty mask gives [0, 0, 0, 0]."""
    n, height, width = masks.shape
    if n == 0:
        return torch.zeros(0, 4, device=masks.device, dtype=torch.int64)
    rows = masks.any(dim=2)  # (N, H)
    cols = masks.any(dim=1)  # (N, W)
    top = rows.int().argmax(dim=1)
    bottom = height - 1 - rows.flip(1).int().argmax(dim=1)
    left = cols.int().argmax(dim=1)
    right = width - 1 - cols.flip(1).int().argmax(dim=1)
    boxes = torch.stack([left, top, right, bottom], dim=1)
    return boxes * rows.any(dim=1, keepdim=True)


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at ``threshold ± offset``: (N, H, W) logits -> (N,).

    The high mask is inside the low one, so the IoU is the ratio of their areas."""
    # Summing bools as uint8 into int32 is ~6x faster on CPU than into int64.
    high = (logits > threshold + offset).flatten(1).view(torch.uint8).sum(1, dtype=torch.int32)
    low = (logits > threshold - offset).flatten(1).view(torch.uint8).sum(1, dtype=torch.int32)
    return high / low


def encode_rles(masks: torch.Tensor) -> list[dict[str, Any]]:
    """(N, H, W) bool -> COCO compressed RLEs (``counts`` as str), by pycocotools."""
    if masks.shape[0] == 0:
        return []
    # pycocotools wants (H, W, N) column-major: a C-contiguous (N, W, H) array, transposed.
    columns = np.ascontiguousarray(masks.transpose(1, 2).cpu().numpy().astype(np.uint8))
    rles = mask_utils.encode(columns.transpose(2, 1, 0))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def remove_small_regions(
    mask: np.ndarray, area_threshold: float, mode: str
) -> tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``"islands"``) smaller than
    ``area_threshold`` pixels in an (H, W) bool mask; returns the mask and whether it changed."""
    import cv2

    fill_holes = mode == "holes"
    working = (fill_holes ^ mask).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, 8)
    sizes = stats[1:, -1]  # row 0 is the background
    small = [i + 1 for i, size in enumerate(sizes) if size < area_threshold]
    if not small:
        return mask, False
    labels = [0] + small
    if not fill_holes:
        labels = [i for i in range(n_labels) if i not in labels]
        if not labels:  # every island is small: keep the largest
            labels = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, labels), True


@dataclass
class _Masks:
    """Columns of kept masks; boxes XYXY inclusive, in full-image pixels."""

    rles: list[dict[str, Any]] = field(default_factory=list)
    areas: list[torch.Tensor] = field(default_factory=list)  # pixels, counted while encoding
    boxes: list[torch.Tensor] = field(default_factory=list)
    iou_preds: list[torch.Tensor] = field(default_factory=list)
    stability: list[torch.Tensor] = field(default_factory=list)
    points: list[torch.Tensor] = field(default_factory=list)
    crop_boxes: list[torch.Tensor] = field(default_factory=list)

    def extend(self, other: _Masks) -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).extend(getattr(other, name))

    def columns(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rles": self.rles}
        for name in ("areas", "boxes", "iou_preds", "stability", "points", "crop_boxes"):
            parts = getattr(self, name)
            out[name] = torch.cat(parts) if parts else torch.zeros(0)
        return out


def _select(columns: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    keep_list = keep.tolist()
    out = {name: value[keep] for name, value in columns.items() if name != "rles"}
    out["rles"] = [columns["rles"][i] for i in keep_list]
    return out


def generator_parameters() -> frozenset[str]:
    """The keyword parameters of :class:`MaskGenerator` (what presets and options may set)."""
    # The encoder's precision is how the run computes, not a generator threshold: runs set it
    # by their own option (``encoder_precision``), never through generator options.
    return frozenset(inspect.signature(MaskGenerator).parameters) - {"model", "encoder_precision"}


class MaskGenerator:
    """Generates masks for a whole image by prompting the model with a grid of points.

    Parameters are those of segment-anything's ``SamAutomaticMaskGenerator`` (same names and
    defaults), plus:

    Args:
        max_mask_area_fraction: drop masks covering at least this fraction of the image (SA-1B
            used 0.95); None keeps them, as segment-anything does.
        upsample_chunk: masks upsampled to full resolution at a time (bounds peak memory).
        encoder_batch_size: images / crops per image-encoder call.
        encoder_precision: what the image encoder computes in (``Predictor``): ``"fp32"``, or
            ``"bf16"`` / ``"fp16"`` autocast.
    """

    def __init__(
        self,
        model: Sam,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        max_mask_area_fraction: float | None = None,
        upsample_chunk: int = 16,
        encoder_batch_size: int = 4,
        encoder_precision: EncoderPrecision = "fp32",
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        if points_per_side is not None:
            point_grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        if len(point_grids) != crop_n_layers + 1:
            raise ValueError(
                f"point_grids has {len(point_grids)} grids; crop_n_layers={crop_n_layers} needs "
                f"{crop_n_layers + 1}"
            )
        if points_per_batch < 1 or upsample_chunk < 1 or encoder_batch_size < 1:
            raise ValueError("points_per_batch, upsample_chunk and encoder_batch_size must be >= 1")
        if max_mask_area_fraction is not None and not 0 < max_mask_area_fraction <= 1:
            raise ValueError(
                f"max_mask_area_fraction must be in (0, 1], got {max_mask_area_fraction}"
            )
        self.model = model
        self.predictor = Predictor(model, encoder_precision)
        self.point_grids = [np.asarray(grid, dtype=np.float64) for grid in point_grids]
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.min_mask_region_area = min_mask_region_area
        self.max_mask_area_fraction = max_mask_area_fraction
        self.upsample_chunk = upsample_chunk
        self.encoder_batch_size = encoder_batch_size

    @classmethod
    def from_preset(cls, model: Sam, preset: str = "auto", **overrides: Any) -> MaskGenerator:
        """A generator at the model's own thresholds: ``generator_presets(model)[preset]``
        (``auto`` or ``semi``, see :mod:`maskmill.model.presets`), then ``overrides``."""
        if preset not in PRESET_NAMES:
            raise ValueError(f"preset must be one of {PRESET_NAMES}, got {preset!r}")
        return cls(model, **{**generator_presets(model)[preset], **overrides})

    # ----------------------------------------------------------------------------------- public

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """SA-1B annotation records for every mask found in an (H, W, 3) uint8 RGB image.

        Each record: ``segmentation`` (COCO RLE, ``counts`` str), ``area`` (int), ``bbox``
        (XYWH, pycocotools' box of the RLE), ``predicted_iou``, ``stability_score``,
        ``point_coords`` ([[x, y]] in image pixels), ``crop_box`` (XYWH).
        """
        return self.generate_batch([image])[0]

    @torch.inference_mode()
    def generate_batch(self, images: Sequence[np.ndarray]) -> list[list[dict[str, Any]]]:
        """:meth:`generate` for several images; their crops share image-encoder batches."""
        images = [to_rgb_uint8(image, name=f"images[{i}]") for i, image in enumerate(images)]
        jobs = []  # (image index, crop box, layer)
        for index, image in enumerate(images):
            boxes, layers = generate_crop_boxes(
                image.shape[:2], self.crop_n_layers, self.crop_overlap_ratio
            )
            jobs.extend((index, box, layer) for box, layer in zip(boxes, layers, strict=True))
        per_image: list[list[_Masks]] = [[] for _ in images]
        crop_counts = [0] * len(images)
        for start in range(0, len(jobs), self.encoder_batch_size):
            chunk = jobs[start : start + self.encoder_batch_size]
            crops = [images[i][y0:y1, x0:x1] for i, (x0, y0, x1, y1), _ in chunk]
            embeddings = self.predictor.embed_images(crops, batch_size=len(crops))
            for (index, crop_box, layer), embedding in zip(chunk, embeddings, strict=True):
                per_image[index].append(
                    self._process_crop(embedding, crop_box, layer, images[index].shape[:2])
                )
                crop_counts[index] += 1
        return [
            self._finish(crops, image.shape[:2], crop_counts[i])
            for i, (crops, image) in enumerate(zip(per_image, images, strict=True))
        ]

    @torch.inference_mode()
    def generate_embedded(self, embedding: ImageEmbedding) -> list[dict[str, Any]]:
        """:meth:`generate` for an image already encoded (``Predictor.image_embedding``), so a
        caller that holds the embedding does not run the encoder again. Whole image only:
        crop layers need embeddings of their crops.

        Raises:
            ValueError: when ``crop_n_layers`` > 0.
        """
        if self.crop_n_layers > 0:
            raise ValueError("generate_embedded covers the whole image only (crop_n_layers=0)")
        return self.generate_from_crops([embedding])

    def crop_boxes(self, image_size: tuple[int, int]) -> list[list[int]]:
        """The crops :meth:`generate` encodes for an image of ``image_size`` (H, W): XYXY
        pixel boxes (exclusive right/bottom), the whole image first, then each crop layer's."""
        boxes, _ = generate_crop_boxes(image_size, self.crop_n_layers, self.crop_overlap_ratio)
        return boxes

    @torch.inference_mode()
    def generate_from_crops(self, embeddings: Sequence[ImageEmbedding]) -> list[dict[str, Any]]:
        """:meth:`generate` for an image whose crops are already encoded (a caller that keeps
        embeddings, e.g. a cache, runs no encoder here): ``embeddings[i]`` is the crop
        ``crop_boxes(image_size)[i]`` cut from the image (``image[y0:y1, x0:x1]``) and encoded,
        so ``embeddings[0]`` is the whole image and its ``original_size`` is the image's (H, W).
        Same records as :meth:`generate` on the same embeddings.

        Raises:
            ValueError: the number of embeddings or a crop's (H, W) does not match.
        """
        if not embeddings:
            raise ValueError("generate_from_crops needs the whole image's embedding at least")
        height, width = embeddings[0].original_size
        boxes, layers = generate_crop_boxes(
            (height, width), self.crop_n_layers, self.crop_overlap_ratio
        )
        if len(embeddings) != len(boxes):
            raise ValueError(
                f"{len(embeddings)} crop embeddings given; crop_n_layers={self.crop_n_layers} "
                f"needs {len(boxes)} for a {height}x{width} (H x W) image"
            )
        crops = []
        for index, (embedding, box, layer) in enumerate(
            zip(embeddings, boxes, layers, strict=True)
        ):
            x0, y0, x1, y1 = box
            if tuple(embedding.original_size) != (y1 - y0, x1 - x0):
                raise ValueError(
                    f"embeddings[{index}] is of a {embedding.original_size} (H, W) image; crop "
                    f"{box} (XYXY) is {(y1 - y0, x1 - x0)}"
                )
            crops.append(self._process_crop(embedding, box, layer, (height, width)))
        return self._finish(crops, (height, width), len(boxes))

    # -------------------------------------------------------------------------------- internals

    def _process_crop(
        self,
        embedding: ImageEmbedding,
        crop_box: list[int],
        layer: int,
        image_size: tuple[int, int],
    ) -> dict[str, Any]:
        crop_h, crop_w = embedding.original_size
        points = self.point_grids[layer] * np.array([[crop_w, crop_h]])
        kept = _Masks()
        for start in range(0, len(points), self.points_per_batch):
            batch = points[start : start + self.points_per_batch]
            kept.extend(self._process_batch(embedding, batch, crop_box, image_size))
        columns = kept.columns()
        if not columns["rles"]:
            return columns
        keep = nms(columns["boxes"].float(), columns["iou_preds"], self.box_nms_thresh)
        return _select(columns, keep)

    def _process_batch(
        self,
        embedding: ImageEmbedding,
        points: np.ndarray,
        crop_box: list[int],
        image_size: tuple[int, int],
    ) -> _Masks:
        model, device = self.model, self.model.device
        crop_h, crop_w = embedding.original_size
        coords = torch.as_tensor(points, dtype=torch.float32, device=device)
        model_coords = scale_coords(coords, embedding.original_size, model.image_size)
        labels = torch.ones(len(points), 1, dtype=torch.int64, device=device)
        sparse, _ = model.prompt_encoder((model_coords[:, None, :], labels), None, None)
        decoder = model.mask_decoder
        image = self.predictor.decoder_image(embedding)
        hs, image_tokens = decoder.run_transformer(image, sparse)
        selected = decoder.output_indices(multimask_output=True)
        iou_preds = decoder.predict_iou(hs, selected)  # (P, 3)
        # Predicted IoU does not depend on resolution: filter before computing any mask, and
        # upscale only the prompts with a surviving mask. Order stays segment-anything's
        # (point-major, then mask).
        keep = torch.ones_like(iou_preds, dtype=torch.bool)
        if self.pred_iou_thresh > 0.0:
            keep = iou_preds > self.pred_iou_thresh
        prompts = keep.any(dim=1)
        if not prompts.any():  # a trained model's batch of background points: nothing survives
            return _Masks()
        if not prompts.all():
            hs, image_tokens, keep = hs[prompts], image_tokens[prompts], keep[prompts]
            iou_preds = iou_preds[prompts]
        low_res = decoder.predict_masks(hs, image_tokens, image.size, selected)
        point_index = torch.arange(len(points), device=device)[prompts]
        point_index = point_index[:, None].expand(-1, len(selected))[keep]
        low_res, iou_preds = low_res[keep], iou_preds[keep]

        x0, y0 = crop_box[0], crop_box[1]
        image_h, image_w = image_size
        crop_t = torch.tensor(crop_box, dtype=torch.float32, device=device)
        image_box = torch.tensor([0, 0, image_w, image_h], dtype=torch.float32, device=device)
        offset = torch.tensor([x0, y0, x0, y0], device=device)
        pad = (x0, image_w - crop_w - x0, y0, image_h - crop_h - y0)
        out = _Masks()
        threshold = model.mask_threshold
        for start in range(0, low_res.shape[0], self.upsample_chunk):
            stop = start + self.upsample_chunk
            logits = model.postprocess_masks(
                low_res[None, start:stop], embedding.input_size, embedding.original_size
            )[0]
            chunk_iou = iou_preds[start:stop]
            chunk_points = point_index[start:stop]
            stability = stability_score(logits, threshold, self.stability_score_offset)
            if self.stability_score_thresh > 0.0:
                keep = stability >= self.stability_score_thresh
                logits, chunk_iou = logits[keep], chunk_iou[keep]
                chunk_points, stability = chunk_points[keep], stability[keep]
            masks = logits > threshold
            del logits
            boxes = masks_to_boxes(masks) + offset  # full-image pixels
            near_crop = torch.isclose(boxes.float(), crop_t, atol=CROP_EDGE_TOLERANCE, rtol=0)
            near_image = torch.isclose(boxes.float(), image_box, atol=CROP_EDGE_TOLERANCE, rtol=0)
            keep = ~(near_crop & ~near_image).any(dim=1)
            if not keep.all():
                masks, boxes, chunk_iou = masks[keep], boxes[keep], chunk_iou[keep]
                chunk_points, stability = chunk_points[keep], stability[keep]
            if masks.shape[0] == 0:
                continue
            if any(pad):
                masks = torch.nn.functional.pad(masks, pad, value=False)
            out.rles.extend(encode_rles(masks))
            out.areas.append(masks.flatten(1).sum(1, dtype=torch.int64).cpu())
            out.boxes.append(boxes.cpu())
            out.iou_preds.append(chunk_iou.float().cpu())
            out.stability.append(stability.float().cpu())
            out.points.append(coords[chunk_points].cpu() + torch.tensor([x0, y0]))
            out.crop_boxes.append(torch.tensor([crop_box] * masks.shape[0]))
        return out

    def _finish(
        self, crops: list[dict[str, Any]], image_size: tuple[int, int], n_crops: int
    ) -> list[dict[str, Any]]:
        crops = [c for c in crops if c["rles"]]
        if not crops:
            return []
        columns = {
            name: [r for c in crops for r in c[name]]
            if name == "rles"
            else torch.cat([c[name] for c in crops])
            for name in crops[0]
        }
        if n_crops > 1:
            # Across crops, the mask from the smaller crop wins.
            scores = 1 / box_area(columns["crop_boxes"].float())
            columns = _select(columns, nms(columns["boxes"].float(), scores, self.crop_nms_thresh))
        if self.min_mask_region_area > 0:
            columns = self._remove_small_regions(columns)
        records = []
        areas = columns["areas"].tolist()
        bboxes = mask_utils.toBbox(columns["rles"]) if columns["rles"] else []
        image_area = image_size[0] * image_size[1]
        for i, rle in enumerate(columns["rles"]):
            area = int(areas[i])
            if self.max_mask_area_fraction is not None and (
                area >= self.max_mask_area_fraction * image_area
            ):
                continue
            x0, y0, x1, y1 = columns["crop_boxes"][i].tolist()
            records.append(
                {
                    "segmentation": rle,
                    "area": area,
                    "bbox": [float(v) for v in bboxes[i]],
                    "predicted_iou": float(columns["iou_preds"][i]),
                    "point_coords": [[float(v) for v in columns["points"][i].tolist()]],
                    "stability_score": float(columns["stability"][i]),
                    "crop_box": [x0, y0, x1 - x0, y1 - y0],
                }
            )
        return records

    def _remove_small_regions(self, columns: dict[str, Any]) -> dict[str, Any]:
        """Fill small holes, drop small islands, then NMS again (changed masks lose ties).

        One mask is decoded at a time, so memory does not grow with the number of masks."""
        area = self.min_mask_region_area
        boxes, unchanged, new_rles, areas = [], [], [], []
        for rle in columns["rles"]:
            mask = mask_utils.decode(rle).astype(bool)
            mask, holes_changed = remove_small_regions(mask, area, "holes")
            mask, islands_changed = remove_small_regions(mask, area, "islands")
            changed = holes_changed or islands_changed
            tensor = torch.from_numpy(mask)[None]
            boxes.append(masks_to_boxes(tensor))
            unchanged.append(0.0 if changed else 1.0)
            new_rles.append(encode_rles(tensor)[0] if changed else rle)
            areas.append(int(mask.sum()))
        keep = nms(
            torch.cat(boxes).float(),
            torch.tensor(unchanged),
            max(self.box_nms_thresh, self.crop_nms_thresh),
        )
        columns = dict(
            columns,
            rles=new_rles,
            boxes=torch.cat(boxes),
            areas=torch.tensor(areas, dtype=torch.int64),
        )
        return _select(columns, keep)
