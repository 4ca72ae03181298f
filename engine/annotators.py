"""Annotators: one contract for people and programs.

An :class:`Annotator` is given an image, a :class:`~model.Predictor` with that image set, and the
masks already on the image; it returns the new masks it drew, each with its click log and the
seconds it took. A person behind a web page and :class:`SimulatedAnnotator` fulfil the same
contract, so the stages do not know which one they drive.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from maskmill.engine.evaluate import interior_point, next_click
from maskmill.model import Predictor
from maskmill.storage import rle

Click = tuple[float, float, int]  # x, y (pixels of the image), label: 1 foreground, 0 background


@dataclass
class AnnotatedMask:
    """One mask an annotator accepted.

    Attributes:
        segmentation: COCO compressed RLE (``counts`` str) on the image's pixel grid.
        clicks: every click that led to it, in order.
        seconds: time spent on it (simulated annotators: their time model, not compute time),
            strokes included.
        predicted_iou: the model's IoU prediction for the mask it drew.
        strokes: brush and eraser strokes that corrected the model's mask.
        stroke_seconds: the part of ``seconds`` spent on strokes.
        model_iou: IoU of the model's mask before any stroke with the mask accepted (1.0 when
            nothing was corrected); None where unknown.
        category: the object's category name, where the annotator gave one.
    """

    segmentation: dict[str, Any]
    clicks: list[Click]
    seconds: float
    predicted_iou: float | None = None
    strokes: int = 0
    stroke_seconds: float = 0.0
    model_iou: float | None = None
    category: str | None = None


@dataclass
class Annotation:
    """What an annotator did on one image.

    Attributes:
        masks: the accepted masks, in the order they were drawn.
        abandoned: objects given up on (no mask stored for them).
        abandoned_clicks: clicks spent on abandoned objects.
        abandoned_seconds: time spent on abandoned objects.
        kept_prefill: indexes of the generator's pre-filled masks kept as they are (semi).
        prefill_kept / prefill_corrected / prefill_deleted: the annotator's verdicts on the
            pre-fill (a corrected one is in ``masks``, with its strokes).
    """

    masks: list[AnnotatedMask] = field(default_factory=list)
    abandoned: int = 0
    abandoned_clicks: int = 0
    abandoned_seconds: float = 0.0
    kept_prefill: list[int] = field(default_factory=list)
    prefill_kept: int = 0
    prefill_corrected: int = 0
    prefill_deleted: int = 0

    def records(self, source: str) -> list[dict[str, Any]]:
        """The accepted masks as mask records for the store (``storage.writer.masks_table``)."""
        return [
            {
                "segmentation": mask.segmentation,
                "clicks": [list(c) for c in mask.clicks],
                "seconds": mask.seconds,
                "predicted_iou": mask.predicted_iou,
                "strokes": mask.strokes,
                "stroke_seconds": mask.stroke_seconds,
                "model_iou": mask.model_iou,
                "category": mask.category,
                "source": source,
            }
            for mask in self.masks
        ]


class Annotator(abc.ABC):
    """Draws the masks missing on an image with the help of a promptable model."""

    #: the id stored in the masks table's ``source`` column
    source: str

    @abc.abstractmethod
    def annotate(
        self,
        image_id: str,
        image: np.ndarray,
        predictor: Predictor,
        existing: Sequence[dict[str, Any]],
    ) -> Annotation:
        """New masks for ``image``.

        Args:
            image_id: the image's id in the store.
            image: (H, W, 3) uint8 RGB, the image as stored (no EXIF turn).
            predictor: a predictor whose current image is ``image``.
            existing: COCO RLEs of the masks already on the image (other rounds, a generator's
                pre-fill); the annotator adds what they miss.
        """


class SimulatedAnnotator(Annotator):
    """A person simulated from ground truth.

    Objects are taken largest first; an object already covered by an existing (or newly drawn)
    mask at IoU >= ``covered_iou`` is skipped. For each other object: the first click at its
    interior point farthest from its boundary, each next click at the centre of the largest
    error region (``engine.evaluate``'s click placement, the one ``maskmill eval`` uses); the
    mask is accepted when its IoU with the object reaches ``accept_iou``, and the object is
    given up after ``max_clicks`` clicks.

    The first click asks for three masks and keeps the one the IoU head ranks first (what an
    annotation tool shows); later clicks refine it, feeding back its low-resolution logits as the
    mask prompt (SAM's interactive loop).

    Time model (a person's time, deterministic): ``object_seconds`` to find and start an object
    plus ``click_seconds`` per click.

    Args:
        ground_truth: ``image_id`` -> COCO RLEs of the image's objects.
        source: id written to the masks' ``source`` column.
    """

    def __init__(
        self,
        ground_truth: Callable[[str], Sequence[dict[str, Any]]],
        accept_iou: float = 0.9,
        max_clicks: int = 20,
        covered_iou: float = 0.5,
        click_seconds: float = 1.5,
        object_seconds: float = 3.0,
        source: str = "simulated",
    ) -> None:
        if not 0 < accept_iou <= 1 or not 0 < covered_iou <= 1:
            raise ValueError(
                f"accept_iou ({accept_iou}) and covered_iou ({covered_iou}) must be in (0, 1]"
            )
        if max_clicks < 1:
            raise ValueError(f"max_clicks must be at least 1, got {max_clicks}")
        self.ground_truth = ground_truth
        self.accept_iou = accept_iou
        self.max_clicks = max_clicks
        self.covered_iou = covered_iou
        self.click_seconds = click_seconds
        self.object_seconds = object_seconds
        self.source = source

    def annotate(
        self,
        image_id: str,
        image: np.ndarray,
        predictor: Predictor,
        existing: Sequence[dict[str, Any]],
    ) -> Annotation:
        height, width = image.shape[:2]
        objects = list(self.ground_truth(image_id))
        for index, obj in enumerate(objects):
            if list(obj["size"]) != [height, width]:
                raise ValueError(
                    f"image {image_id}: ground-truth mask {index} is {obj['size'][0]}x"
                    f"{obj['size'][1]} (h x w) but the image is {height}x{width}"
                )
        areas = rle.areas(objects)
        # Largest first; equal areas keep their stored order (stable sort: deterministic).
        order = sorted(range(len(objects)), key=lambda i: -int(areas[i]))
        covering = list(existing)
        result = Annotation()
        for i in order:
            if covering and iou_matrix(covering, [objects[i]]).max() >= self.covered_iou:
                continue
            target = rle.decode(objects[i])
            drawn = self._draw(predictor, target, objects[i])
            seconds = self.object_seconds + self.click_seconds * len(drawn[1])
            if drawn[0] is None:
                result.abandoned += 1
                result.abandoned_clicks += len(drawn[1])
                result.abandoned_seconds += seconds
                continue
            mask_rle, clicks, score = drawn
            result.masks.append(AnnotatedMask(mask_rle, clicks, seconds, score))
            covering.append(mask_rle)
        return result

    def _draw(
        self, predictor: Predictor, target: np.ndarray, target_rle: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, list[Click], float | None]:
        """Click until the mask matches ``target``: (accepted RLE or None, clicks, score)."""
        if not target.any():
            return None, [], None
        clicks: list[Click] = [(*interior_point(target), 1)]
        logits = None
        for _ in range(self.max_clicks):
            coords = np.array([c[:2] for c in clicks], np.float32)
            labels = np.array([c[2] for c in clicks], np.int64)
            if logits is None:
                masks, scores, low_res = predictor.predict(coords, labels, multimask_output=True)
            else:
                masks, scores, low_res = predictor.predict(
                    coords, labels, mask_input=logits, multimask_output=False
                )
            best = int(np.argmax(scores))
            mask, logits = masks[best], low_res[best : best + 1]
            mask_rle = rle.encode(mask)
            if iou_matrix([mask_rle], [target_rle])[0, 0] >= self.accept_iou:
                return mask_rle, clicks, float(scores[best])
            if len(clicks) == self.max_clicks:
                break
            clicks.append(next_click(mask, target))
        return None, clicks, None


def iou_matrix(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> np.ndarray:
    """(len(a), len(b)) IoU of COCO compressed RLEs, by pycocotools (no crowd semantics)."""
    if not a or not b:
        return np.zeros((len(a), len(b)), np.float64)
    ious = mask_utils.iou([_c(r) for r in a], [_c(r) for r in b], [0] * len(b))
    return np.asarray(ious, np.float64).reshape(len(a), len(b))


def _c(segmentation: dict[str, Any]) -> dict[str, Any]:
    """An RLE as pycocotools' C code takes it (counts as bytes)."""
    counts = segmentation["counts"]
    return {
        "size": list(segmentation["size"]),
        "counts": counts.encode() if isinstance(counts, str) else counts,
    }
