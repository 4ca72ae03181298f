"""Annotators: one contract for people and programs.

An :class:`Annotator` is given an image, a :class:`~model.Predictor` with that image set, the
masks already on the image and, in the semi stage, a generator's pre-fill; it returns the new
masks it drew (each with its clicks, strokes and the seconds it took) and its verdict on each
pre-filled mask. A person behind a web page and :class:`SimulatedAnnotator` fulfil the same
contract, so the stages do not know which one they drive.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

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
        skipped_small: objects skipped for being below the annotator's minimum area.
        skipped_budget: objects not started because the image's time budget was spent.
    """

    masks: list[AnnotatedMask] = field(default_factory=list)
    abandoned: int = 0
    abandoned_clicks: int = 0
    abandoned_seconds: float = 0.0
    kept_prefill: list[int] = field(default_factory=list)
    prefill_kept: int = 0
    prefill_corrected: int = 0
    prefill_deleted: int = 0
    skipped_small: int = 0
    skipped_budget: int = 0

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
        prefill: Sequence[dict[str, Any]] = (),
    ) -> Annotation:
        """New masks for ``image``.

        Args:
            image_id: the image's id in the store.
            image: (H, W, 3) uint8 RGB, the image as stored (no EXIF turn).
            predictor: a predictor whose current image is ``image``.
            existing: COCO RLEs of the masks earlier rounds drew on the image (shown, not
                redone); the annotator adds what they miss.
            prefill: COCO RLEs of a generator's pre-filled masks (semi stage; empty otherwise).
                The annotator judges each: kept as is (its index in ``kept_prefill``),
                corrected (its corrected mask in ``masks``) or deleted; the stage stores the
                kept ones as the model's masks.
        """


@dataclass
class Correction:
    """Brush and eraser strokes that turned a model's mask into the accepted one.

    Attributes:
        mask: (H, W) bool, the corrected mask.
        stroke_pixels: pixels each stroke fixed, in order (a clear counts 0 pixels).
        cleared: True when the annotator cleared the model's mask and painted the object anew
            (the first stroke is the clear).
        seconds: the strokes' time by the annotator's time model.
    """

    mask: np.ndarray
    stroke_pixels: list[int]
    cleared: bool
    seconds: float

    @property
    def strokes(self) -> int:
        return len(self.stroke_pixels)


class SimulatedAnnotator(Annotator):
    """A person simulated from ground truth, who finishes every object it takes on.

    **Pre-fill (semi stage).** Each pre-filled mask is matched one-to-one to a ground-truth
    object not already covered by an ``existing`` mask (pairs by decreasing IoU, ties by
    pre-fill then object order). A pre-filled mask matched at IoU >= ``accept_iou`` is *kept*
    as is; one matched at IoU >= ``covered_iou`` but below ``accept_iou`` is *corrected* with
    strokes (below) into an annotator's mask with no click; any other (on no object, or a
    duplicate of a matched or covered one) is *deleted*.

    **Which objects.** The remaining objects are taken largest first. One already covered by
    a mask (existing, kept, corrected or newly drawn) at IoU >= ``covered_iou`` is left alone
    (it has a mask). One below ``min_object_area`` pixels is skipped (counted in
    ``Annotation.skipped_small``). With ``image_seconds_budget`` set, no object is started once
    the image's time reaches it (counted in ``Annotation.skipped_budget``; off by default).
    Nothing else is skipped: a weak model costs time, never a mask.

    **Clicks.** The first click at the object's interior point farthest from its boundary, each
    next one at the centre of the largest error region of the last mask (``engine.evaluate``'s
    click placement, the one ``maskmill eval`` uses). The first click asks for three masks and
    keeps the one the IoU head ranks first (what an annotation tool shows); later clicks refine
    it, feeding back its low-resolution logits as the mask prompt (SAM's interactive loop).
    Clicking stops when the mask's IoU with the object reaches ``accept_iou``, after
    ``max_clicks`` clicks, or when ``patience`` clicks in a row each failed to raise the best
    IoU so far by ``min_gain`` (a person stops clicking once clicks stop visibly helping:
    defaults 3 tries, 0.01 IoU, about the smallest change one sees along a boundary). The best
    mask seen is kept (undo back to it).

    **Strokes.** Unless that mask already has IoU >= ``correct_iou``, the annotator fixes its
    error regions: the 8-connected components of missed pixels (object & ~mask) and of spurious
    pixels (mask & ~object), largest first (ties: missed before spurious, then by OpenCV's
    label order). A brush stroke adds a missed component, an eraser stroke
    removes a spurious one, each exactly, until IoU >= ``correct_iou``. When clearing the mask
    and painting the object's components anew (largest first, same stop) costs strictly less
    time, the annotator does that instead (a speckled mask of a weak model). The corrected mask
    is accepted; its ``model_iou`` is the IoU of the model's mask with it.

    **Time model** (a person's time, deterministic and the same in every round, so seconds per
    mask compare across rounds)::

        stroke_seconds(p) = stroke_seconds_base + stroke_seconds_per_sqrt_px * sqrt(p)
                            for a brush or eraser stroke fixing p pixels
        clear             = stroke_seconds_base                       (counts as one stroke)
        mask seconds      = object_seconds + click_seconds * clicks + sum of its strokes' time

    A corrected pre-fill has no clicks: ``object_seconds`` (select it) plus its strokes. Kept
    and deleted pre-fill are not timed. The square root: a region's linear size, the length a
    brush sized to it travels. Defaults (1.5 s a click, 3 s to find and start an object, 1 s
    + 0.05 s x sqrt(px) a stroke: 6 s for a 100 x 100 px region) are round figures of a
    person's pace, not fitted to any data set.

    Args:
        ground_truth: ``image_id`` -> COCO RLEs of the image's objects.
        categories: ``image_id`` -> the category name of each of those objects (or None), in
            the same order: the annotator labels what it draws, as a person does with the
            page's category field, so the store's concepts grow with its rounds.
        accept_iou: IoU at which clicking has made the mask good enough, and at which a
            pre-filled mask is kept as is.
        max_clicks: clicks spent on an object at most.
        covered_iou: IoU with a mask at which an object counts as covered (already has a
            mask), and at which a pre-filled mask is worth correcting rather than deleting.
        correct_iou: IoU with the object the strokes bring the mask to.
        patience: clicks in a row without a gain of ``min_gain`` that end the clicking.
        min_gain: the IoU gain over the best mask so far that counts as progress.
        min_object_area: objects smaller (pixels) are skipped.
        image_seconds_budget: seconds after which no further object of an image is started
            (None: no budget).
        click_seconds, object_seconds, stroke_seconds_base, stroke_seconds_per_sqrt_px: the
            time model above.
        source: id written to the masks' ``source`` column.
    """

    def __init__(
        self,
        ground_truth: Callable[[str], Sequence[dict[str, Any]]],
        accept_iou: float = 0.9,
        max_clicks: int = 20,
        covered_iou: float = 0.5,
        correct_iou: float = 0.95,
        patience: int = 3,
        min_gain: float = 0.01,
        min_object_area: int = 64,
        image_seconds_budget: float | None = None,
        click_seconds: float = 1.5,
        object_seconds: float = 3.0,
        stroke_seconds_base: float = 1.0,
        stroke_seconds_per_sqrt_px: float = 0.05,
        source: str = "simulated",
        categories: Callable[[str], Sequence[str | None]] | None = None,
    ) -> None:
        for name, value in (
            ("accept_iou", accept_iou),
            ("covered_iou", covered_iou),
            ("correct_iou", correct_iou),
        ):
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if max_clicks < 1 or patience < 1 or min_object_area < 1:
            raise ValueError(
                f"max_clicks ({max_clicks}), patience ({patience}) and min_object_area "
                f"({min_object_area}) must be at least 1"
            )
        for name, value in (
            ("min_gain", min_gain),
            ("click_seconds", click_seconds),
            ("object_seconds", object_seconds),
            ("stroke_seconds_base", stroke_seconds_base),
            ("stroke_seconds_per_sqrt_px", stroke_seconds_per_sqrt_px),
        ):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if image_seconds_budget is not None and not image_seconds_budget > 0:
            raise ValueError(
                f"image_seconds_budget must be positive or None, got {image_seconds_budget}"
            )
        self.ground_truth = ground_truth
        self.categories = categories
        self.accept_iou = accept_iou
        self.max_clicks = max_clicks
        self.covered_iou = covered_iou
        self.correct_iou = correct_iou
        self.patience = patience
        self.min_gain = min_gain
        self.min_object_area = min_object_area
        self.image_seconds_budget = image_seconds_budget
        self.click_seconds = click_seconds
        self.object_seconds = object_seconds
        self.stroke_seconds_base = stroke_seconds_base
        self.stroke_seconds_per_sqrt_px = stroke_seconds_per_sqrt_px
        self.source = source

    def annotate(
        self,
        image_id: str,
        image: np.ndarray,
        predictor: Predictor,
        existing: Sequence[dict[str, Any]],
        prefill: Sequence[dict[str, Any]] = (),
    ) -> Annotation:
        height, width = image.shape[:2]
        objects = list(self.ground_truth(image_id))
        names = list(self.categories(image_id)) if self.categories is not None else []
        for name, masks in (("ground-truth", objects), ("pre-filled", prefill)):
            for index, segmentation in enumerate(masks):
                if list(segmentation["size"]) != [height, width]:
                    raise ValueError(
                        f"image {image_id}: {name} mask {index} is {segmentation['size'][0]}x"
                        f"{segmentation['size'][1]} (h x w) but the image is {height}x{width}"
                    )
        result = Annotation()
        covering = list(existing)
        spent = self._judge_prefill(objects, covering, list(prefill), result)
        areas = rle.areas(objects)
        # Largest first; equal areas keep their stored order (stable sort: deterministic).
        for i in sorted(range(len(objects)), key=lambda i: -int(areas[i])):
            if covering and rle.ious(covering, [objects[i]]).max() >= self.covered_iou:
                continue
            if areas[i] < self.min_object_area:
                result.skipped_small += 1
                continue
            if self.image_seconds_budget is not None and spent >= self.image_seconds_budget:
                result.skipped_budget += 1
                continue
            mask = self._draw(predictor, rle.decode(objects[i]), objects[i])
            if i < len(names):
                mask.category = names[i]
            spent += mask.seconds
            result.masks.append(mask)
            covering.append(mask.segmentation)
        return result

    def stroke_seconds(self, pixels: int) -> float:
        """Time of one brush or eraser stroke that fixes ``pixels`` pixels (see the class)."""
        return self.stroke_seconds_base + self.stroke_seconds_per_sqrt_px * math.sqrt(pixels)

    def correct(self, mask: np.ndarray, target: np.ndarray) -> Correction:
        """The strokes that bring an (H, W) bool ``mask`` to IoU >= ``correct_iou`` with the
        (H, W) bool, non-empty ``target``: fixing ``mask``'s error regions, or clearing it and
        painting ``target`` anew when that is strictly quicker (see the class)."""
        if mask.shape != target.shape:
            raise ValueError(f"mask is {mask.shape} (H, W) but the target is {target.shape}")
        if not target.any():
            raise ValueError("correct: the target is empty")
        fix = self._plan(mask, target)
        redo = self._plan(np.zeros_like(target), target)
        redo_seconds = self.stroke_seconds_base + redo[1]
        if fix[0] and redo_seconds < fix[1]:
            painted = _apply(np.zeros_like(target), redo[0])
            pixels = [0] + [region.area for region in redo[0]]
            return Correction(painted, pixels, True, redo_seconds)
        pixels = [region.area for region in fix[0]]
        return Correction(_apply(mask.copy(), fix[0]), pixels, False, fix[1])

    def _plan(self, mask: np.ndarray, target: np.ndarray) -> tuple[list[_Region], float]:
        """Error regions to fix, largest first, until IoU >= ``correct_iou``; and their time.

        A region changes the intersection (missed pixels) or the union (spurious pixels) by
        exactly its area, so the IoU after each stroke is counted, not recomputed."""
        regions: list[_Region] = []
        for error, add in ((target & ~mask, True), (mask & ~target, False)):
            count, labels, stats, _ = cv2.connectedComponentsWithStats(error.astype(np.uint8), 8)
            regions.extend(
                _Region(int(stats[i, cv2.CC_STAT_AREA]), add, labels, i) for i in range(1, count)
            )
        regions.sort(key=lambda region: -region.area)  # stable: the documented tie order
        intersection, union = int((mask & target).sum()), int((mask | target).sum())
        chosen: list[_Region] = []
        for region in regions:
            if intersection >= self.correct_iou * union:
                break
            chosen.append(region)
            if region.add:
                intersection += region.area
            else:
                union -= region.area
        return chosen, sum(self.stroke_seconds(region.area) for region in chosen)

    def _judge_prefill(
        self,
        objects: list[dict[str, Any]],
        covering: list[dict[str, Any]],
        prefill: list[dict[str, Any]],
        result: Annotation,
    ) -> float:
        """Keep, correct or delete each pre-filled mask (see the class), adding the kept and
        corrected ones to ``covering`` and the verdicts to ``result``; returns the seconds
        spent (corrections)."""
        if not prefill:
            return 0.0
        ious = rle.ious(prefill, objects)
        if covering and objects:
            # Objects earlier rounds covered are taken: a pre-fill on one is a duplicate.
            ious[:, rle.ious(covering, objects).max(axis=0) >= self.covered_iou] = 0.0
        pairs = sorted(
            ((p, o) for p, o in zip(*np.nonzero(ious >= self.covered_iou), strict=True)),
            key=lambda pair: (-ious[pair], pair[0], pair[1]),
        )
        match: dict[int, int] = {}
        taken: set[int] = set()
        for p, o in pairs:
            if p not in match and o not in taken:
                match[int(p)] = int(o)
                taken.add(int(o))
        spent = 0.0
        for p, segmentation in enumerate(prefill):
            if p not in match:
                result.prefill_deleted += 1
            elif ious[p, match[p]] >= self.accept_iou:
                result.prefill_kept += 1
                result.kept_prefill.append(p)
                covering.append(segmentation)
            else:
                result.prefill_corrected += 1
                model_mask = rle.decode(segmentation)
                fixed = self.correct(model_mask, rle.decode(objects[match[p]]))
                accepted = rle.encode(fixed.mask)
                seconds = self.object_seconds + fixed.seconds
                spent += seconds
                result.masks.append(
                    AnnotatedMask(
                        accepted,
                        [],
                        seconds,
                        strokes=fixed.strokes,
                        stroke_seconds=fixed.seconds,
                        model_iou=float(rle.ious([segmentation], [accepted])[0, 0]),
                    )
                )
                covering.append(accepted)
        return spent

    def _draw(
        self, predictor: Predictor, target: np.ndarray, target_rle: dict[str, Any]
    ) -> AnnotatedMask:
        """Click while it helps, then stroke: the accepted mask of a non-empty ``target``."""
        clicks: list[Click] = [(*interior_point(target), 1)]
        logits = None
        best_iou, best_mask, best_rle, best_score = -1.0, target, target_rle, 0.0
        stale = 0  # clicks in a row that did not raise the best IoU by min_gain
        while True:
            coords = np.array([c[:2] for c in clicks], np.float32)
            labels = np.array([c[2] for c in clicks], np.int64)
            if logits is None:
                masks, scores, low_res = predictor.predict(coords, labels, multimask_output=True)
            else:
                masks, scores, low_res = predictor.predict(
                    coords, labels, mask_input=logits, multimask_output=False
                )
            pick = int(np.argmax(scores))
            mask, logits = masks[pick], low_res[pick : pick + 1]
            mask_rle = rle.encode(mask)
            iou = float(rle.ious([mask_rle], [target_rle])[0, 0])
            stale = 0 if iou >= best_iou + self.min_gain else stale + 1
            if iou > best_iou:
                best_iou, best_mask, best_rle, best_score = iou, mask, mask_rle, float(scores[pick])
            if iou >= self.accept_iou or len(clicks) == self.max_clicks or stale >= self.patience:
                break
            clicks.append(next_click(mask, target))
        seconds = self.object_seconds + self.click_seconds * len(clicks)
        if best_iou >= self.correct_iou:
            return AnnotatedMask(best_rle, clicks, seconds, best_score, model_iou=1.0)
        fixed = self.correct(best_mask, target)
        accepted = rle.encode(fixed.mask)
        return AnnotatedMask(
            accepted,
            clicks,
            seconds + fixed.seconds,
            best_score,
            strokes=fixed.strokes,
            stroke_seconds=fixed.seconds,
            model_iou=float(rle.ious([best_rle], [accepted])[0, 0]),
        )


@dataclass
class _Region:
    """A connected error region: its area (pixels), whether a brush adds it (missed pixels) or
    an eraser removes it (spurious ones), and its label in ``labels``."""

    area: int
    add: bool
    labels: np.ndarray
    index: int


def _apply(mask: np.ndarray, regions: Sequence[_Region]) -> np.ndarray:
    """``mask`` (changed in place) with each region painted (brush) or erased (eraser)."""
    for region in regions:
        mask[region.labels == region.index] = region.add
    return mask
