"""Evaluation of a promptable model on a COCO dataset: ``maskmill eval``.

Interactive metrics, per ground-truth mask, from simulated clicks:

* 1-click mIoU: one foreground click at the mask's interior point farthest from its boundary;
  the best of the three multimask outputs (``one_click_miou_best``) and the one the IoU head
  ranks first (``one_click_miou_top1``).
* NoC@85 / NoC@90: clicks until IoU >= 0.85 / 0.90, at most 20 (a mask never reaching it counts
  20). After the first click (top-ranked of three masks) each click goes to the interior point
  farthest from the boundary of the largest error region — foreground on a missed region,
  background on a spurious one — with all clicks so far and the previous low-res logits as
  prompts (single-mask output).
* box mIoU: the mask's bounding box as the prompt, single-mask output.

Box-prompt mask AP (the SAM paper's protocol, ground-truth boxes standing in for a detector):
the box prompt's masks above, each scored by its predicted IoU and labelled with its ground
truth's category, scored by pycocotools COCOeval, segm, per category (``useCats = 1``): AP
(IoU 0.50:0.95), AP50, AP75, and AP / AP50 of each category.

Automatic metric: the ``MaskGenerator``'s proposals (``PROPOSAL_OPTIONS``) scored by pycocotools
COCOeval, segm, class-agnostic (``useCats = 0``), AR@100 and AR@1000 averaged over IoU
0.50:0.95.

Masks are (H, W) bool arrays of the original image; clicks are XY pixels; boxes XYXY.

With an embedding cache (``maskmill eval --store``: the store's, ``engine.embeddings``) each
image is encoded once per image encoder, keyed like a store image (the first 16 hex digits of
the file's SHA-256); an image that its EXIF orientation turns is encoded every time (its cache
key would name the unturned pixels).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskmill.engine.embeddings import generate_masks, set_image
from maskmill.model import EncoderPrecision, Predictor, Sam
from maskmill.model.mask_generator import MaskGenerator
from maskmill.storage import rle
from maskmill.storage.embeddings import EmbeddingCache
from maskmill.storage.images import load_image, load_image_and_id

MAX_CLICKS = 20
# Proposal settings: every grid prompt's masks compete for the top 100 / 1000 by predicted IoU,
# with no score filter (SAM's proposal evaluation also relaxed the annotation-quality filters);
# NMS stays. A stability filter would measure how sharp a model's logits are (small models' are
# soft), not what it can find.
PROPOSAL_OPTIONS = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
NOC_THRESHOLDS = (0.85, 0.90)
METRIC_KEYS = (
    "one_click_miou_best",
    "one_click_miou_top1",
    "noc85",
    "noc90",
    "box_miou",
    "box_prompt_ap",
    "box_prompt_ap50",
    "box_prompt_ap75",
    "ar100",
    "ar1000",
)


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """XY of the pixel of an (H, W) bool mask farthest from its boundary (the image border
    counts as boundary), by an exact Euclidean distance transform; among equally far pixels the
    most central one.

    Raises:
        ValueError: for an empty mask.
    """
    if not mask.any():
        raise ValueError("interior_point of an empty mask")
    padded = np.pad(mask.astype(np.uint8), 1)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    # Ties (a band of equally deep pixels) go to the one nearest their mean: the middle.
    ys, xs = np.nonzero(distance >= distance.max() - 1e-4)
    nearest = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return float(xs[nearest]), float(ys[nearest])


def next_click(predicted: np.ndarray, target: np.ndarray) -> tuple[float, float, int]:
    """The corrective click for an (H, W) bool prediction of an (H, W) bool target: the centre
    (``interior_point``) of the largest connected error region; label 1 (foreground) when that
    region is missed foreground, 0 when it is spurious. A perfect prediction gets a foreground
    click at the target's centre."""
    best_area, best = 0, None
    for region, label in ((target & ~predicted, 1), (predicted & ~target, 0)):
        count, labels, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), 8)
        if count > 1:
            index = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
            if stats[index, cv2.CC_STAT_AREA] > best_area:
                best_area, best = stats[index, cv2.CC_STAT_AREA], (labels == index, label)
    if best is None:
        return (*interior_point(target), 1)
    return (*interior_point(best[0]), best[1])


def mask_ious(predicted: np.ndarray, target: np.ndarray) -> np.ndarray:
    """IoU of (..., H, W) bool predictions with an (H, W) or (..., H, W) bool target: (...)."""
    intersection = np.logical_and(predicted, target).sum(axis=(-2, -1))
    union = np.logical_or(predicted, target).sum(axis=(-2, -1))
    return np.where(union > 0, intersection / np.maximum(union, 1), 1.0)


@dataclass
class InteractiveResult:
    """Per-mask interactive results of one image, each (M,): ``box`` is the IoU of the
    box-prompt mask, ``box_rles`` those masks (COCO compressed RLE, counts str) and
    ``box_scores`` their predicted IoU."""

    one_click_best: np.ndarray
    one_click_top1: np.ndarray
    noc: dict[float, np.ndarray]
    box: np.ndarray
    box_rles: list[dict[str, Any]]
    box_scores: np.ndarray


@torch.inference_mode()
def evaluate_interactive(
    predictor: Predictor,
    masks: np.ndarray,
    max_clicks: int = MAX_CLICKS,
    thresholds: tuple[float, ...] = NOC_THRESHOLDS,
    chunk: int = 16,
) -> InteractiveResult:
    """Click and box metrics for (M, H, W) bool ground-truth masks on the predictor's current
    image; masks go through the decoder ``chunk`` at a time.

    Raises:
        ValueError: when a mask is empty or its size is not the image's.
    """
    if masks.ndim != 3 or masks.shape[1:] != predictor.original_size:
        raise ValueError(
            f"masks must have shape (M, {predictor.original_size[0]}, "
            f"{predictor.original_size[1]}), got {masks.shape}"
        )
    if not masks.reshape(len(masks), -1).any(axis=1).all():
        raise ValueError("ground-truth masks must not be empty")
    parts = [
        _interactive_chunk(predictor, masks[i : i + chunk], max_clicks, thresholds)
        for i in range(0, len(masks), chunk)
    ]
    return InteractiveResult(
        one_click_best=np.concatenate([p.one_click_best for p in parts]),
        one_click_top1=np.concatenate([p.one_click_top1 for p in parts]),
        noc={t: np.concatenate([p.noc[t] for p in parts]) for t in thresholds},
        box=np.concatenate([p.box for p in parts]),
        box_rles=[r for p in parts for r in p.box_rles],
        box_scores=np.concatenate([p.box_scores for p in parts]),
    )


def _interactive_chunk(
    predictor: Predictor, masks: np.ndarray, max_clicks: int, thresholds: tuple[float, ...]
) -> InteractiveResult:
    count = len(masks)
    first = np.array([interior_point(m) for m in masks], dtype=np.float32)
    out, scores, low_res = predictor.predict_batch(
        first[:, None], np.ones((count, 1)), multimask_output=True
    )
    out, scores = out.cpu().numpy(), scores.float().cpu().numpy()
    ious = mask_ious(out, masks[:, None])  # (M, 3)
    top = scores.argmax(axis=1)
    rows = np.arange(count)
    one_click_best, one_click_top1 = ious.max(axis=1), ious[rows, top]

    noc = {t: np.full(count, max_clicks, dtype=np.float64) for t in thresholds}
    current, current_iou = out[rows, top], one_click_top1.copy()
    logits = low_res[torch.as_tensor(rows), torch.as_tensor(top)][:, None]
    coords, labels = first[:, None], np.ones((count, 1), dtype=np.int64)
    for clicks in range(1, max_clicks + 1):
        for t in thresholds:
            reached = (current_iou >= t) & (noc[t] == max_clicks)
            noc[t][reached] = clicks
        active = np.flatnonzero(current_iou < max(thresholds))
        if clicks == max_clicks or active.size == 0:
            break
        new = np.array([next_click(current[i], masks[i]) for i in active], dtype=np.float32)
        coords_a = np.concatenate([coords[active], new[:, None, :2]], axis=1)
        labels_a = np.concatenate([labels[active], new[:, None, 2].astype(np.int64)], axis=1)
        out_a, _, low_a = predictor.predict_batch(
            coords_a, labels_a, mask_input=logits[torch.as_tensor(active)], multimask_output=False
        )
        # Rows that are done keep their prompts; only active rows get the new click.
        coords = np.concatenate([coords, coords[:, -1:]], axis=1)
        labels = np.concatenate([labels, labels[:, -1:]], axis=1)
        coords[active], labels[active] = coords_a, labels_a
        current[active] = out_a[:, 0].cpu().numpy()
        current_iou[active] = mask_ious(current[active], masks[active])
        logits[torch.as_tensor(active)] = low_a
    boxes = np.array([_mask_box(m) for m in masks], dtype=np.float32)
    out_box, box_scores, _ = predictor.predict_batch(boxes=boxes, multimask_output=False)
    box_masks = out_box[:, 0].cpu().numpy()
    box_iou = mask_ious(box_masks, masks)
    # Kept as RLE for box-prompt AP (COCOeval), so the box prompts are predicted once.
    box_rles = [rle.encode(m) for m in box_masks]
    scores = box_scores[:, 0].float().cpu().numpy()
    return InteractiveResult(one_click_best, one_click_top1, noc, box_iou, box_rles, scores)


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """XYXY pixel box enclosing an (H, W) bool mask (right/bottom edges exclusive)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def average_recall(
    gt: COCO, detections: list[dict[str, Any]], image_ids: list[int]
) -> dict[str, float]:
    """Class-agnostic segm AR@100 and AR@1000 (IoU 0.50:0.95, all areas) by COCOeval.

    ``detections`` are COCO results: ``image_id``, ``segmentation`` (RLE), ``score``.
    """
    if not detections:
        return {"ar100": 0.0, "ar1000": 0.0}
    category = gt.getCatIds()[0]
    results = [{**d, "category_id": category} for d in detections]
    dt = _quiet(lambda: gt.loadRes(results))
    evaluator = COCOeval(gt, dt, "segm")
    evaluator.params.useCats = 0
    evaluator.params.imgIds = list(image_ids)
    evaluator.params.maxDets = [100, 1000]
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    recall = evaluator.eval["recall"]  # (T, K, A, M); K = 1 class-agnostic, A[0] = all areas
    values = {}
    for index, name in enumerate(("ar100", "ar1000")):
        r = recall[:, 0, 0, index]
        values[name] = float(r[r > -1].mean()) if (r > -1).any() else 0.0
    return values


def box_prompt_ap(gt: COCO, results: list[dict[str, Any]], image_ids: list[int]) -> dict[str, Any]:
    """Mask AP of box-prompt masks: :func:`mask_ap` with the prefix ``box_prompt``."""
    return mask_ap(gt, results, image_ids, "box_prompt")


def mask_ap(
    gt: COCO, results: list[dict[str, Any]], image_ids: list[int], prefix: str
) -> dict[str, Any]:
    """Mask AP by COCOeval (segm, per category: ``useCats = 1``).

    ``results`` are COCO results: ``image_id``, ``category_id``, ``segmentation`` (RLE),
    ``score``. Returns ``<prefix>_ap`` (IoU 0.50:0.95), ``<prefix>_ap50``, ``<prefix>_ap75``
    (NaN without results) and ``<prefix>_ap_per_category``: ``{name: {"ap", "ap50"}}`` for
    each category with ground truth among ``image_ids`` (100 detections per image, all areas).
    """
    nan = float("nan")
    out: dict[str, Any] = {
        f"{prefix}_ap": nan,
        f"{prefix}_ap50": nan,
        f"{prefix}_ap75": nan,
        f"{prefix}_ap_per_category": {},
    }
    if not results:
        return out
    dt = _quiet(lambda: gt.loadRes(results))
    evaluator = COCOeval(gt, dt, "segm")
    evaluator.params.imgIds = list(image_ids)
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _quiet(evaluator.summarize)
    for key, value in zip(("ap", "ap50", "ap75"), evaluator.stats[:3], strict=True):
        out[f"{prefix}_{key}"] = float(value) if value > -1 else nan  # -1: no ground truth
    # (T IoU thresholds, R recall points, K categories, A areas (all first), M max dets).
    precision = evaluator.eval["precision"]
    per_category: dict[str, dict[str, float]] = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        every, at50 = precision[:, :, k, 0, -1], precision[0, :, k, 0, -1]
        if not (every > -1).any():
            continue  # no ground truth of this category among the images
        name = str(gt.cats[category_id].get("name", category_id))
        name = f"{name} ({category_id})" if name in per_category else name
        per_category[name] = {
            "ap": float(every[every > -1].mean()),
            "ap50": float(at50[at50 > -1].mean()),
        }
    out[f"{prefix}_ap_per_category"] = per_category
    return out


def evaluate_concepts(
    model: Sam,
    annotations: str | Path,
    images: str | Path,
    max_images: int | None = None,
    progress: bool = False,
    text_encoder: Any = None,
    encoder_precision: EncoderPrecision = "fp32",
) -> dict[str, Any]:
    """Mask AP of concept prompting on a COCO dataset: for every image and every category the
    model's concept head knows (names compared by ``concept_key``), every instance
    ``find_instances`` reports (threshold 0, so the scores rank them all), scored by COCOeval.
    With a CLIP ``text_encoder`` (``model.text_encoder.ClipEncoder``) every category of the
    dataset is a phrase, found through the model's text head (open vocabulary).
    ``encoder_precision``: what the image encoder computes in (``Predictor``).

    Returns :func:`mask_ap`'s keys with the prefix ``concept`` plus ``concept_categories``
    (the dataset's categories the head knows), ``concept_unknown`` (those it does not: they
    get no detections, so AP 0 where they have ground truth), ``images``.

    Raises:
        ValueError: the model has no concept head, or it shares no category with the dataset.
    """
    from tqdm import tqdm

    from maskmill.model.concept_head import concept_key
    from maskmill.model.concepts import find_instances, require_concept_head, require_text_head

    gt, image_ids = load_coco(annotations, max_images)
    if text_encoder is not None:
        require_text_head(model, text_encoder)
        known = {concept_key(c["name"]): c["name"] for c in gt.dataset["categories"]}
    else:
        known = {concept_key(name): name for name in require_concept_head(model).names}
    category_of: dict[str, int] = {}  # head's name -> the dataset's category id
    unknown = []
    for category in gt.dataset["categories"]:
        name = known.get(concept_key(category["name"]))
        if name is None:
            unknown.append(category["name"])
        else:
            category_of.setdefault(name, int(category["id"]))
    if not category_of:
        raise ValueError(
            f"{annotations}: none of its categories is a concept the model knows "
            f"({', '.join(sorted(known.values()))})"
        )
    predictor = Predictor(model, encoder_precision)
    results: list[dict[str, Any]] = []
    for image_id in tqdm(image_ids, disable=not progress, unit="img"):
        info = gt.imgs[image_id]
        image = load_image(str(Path(images) / info["file_name"]))
        with torch.inference_mode():
            predictor.set_image(image)
            found = find_instances(
                model,
                predictor.image_embedding,
                list(category_of),
                threshold=0.0,
                text_encoder=text_encoder,
            )
        results.extend(
            {
                "image_id": image_id,
                "category_id": category_of[record["category"]],
                "segmentation": record["segmentation"],
                "score": record["score"],
            }
            for record in found
        )
    metrics = mask_ap(gt, results, image_ids, "concept")
    metrics["concept_categories"] = sorted(category_of)
    metrics["concept_unknown"] = sorted(unknown)
    metrics["images"] = len(image_ids)
    return metrics


def _quiet(function) -> Any:
    """Run a pycocotools step without its progress prints (``--json`` output stays JSON)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return function()


def load_coco(annotations: str | Path, max_images: int | None = None) -> tuple[COCO, list[int]]:
    """Read a COCO instances file; return it (restricted to the first ``max_images`` images in
    file order) and those image ids.

    Raises:
        ValueError: naming the file when it is missing, not JSON, or has no images.
    """
    path = Path(annotations)
    if not path.is_file():
        raise ValueError(f"{path}: no such annotations file")
    try:
        dataset = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON: {error}") from None
    if not isinstance(dataset, dict) or not dataset.get("images"):
        raise ValueError(f"{path}: a COCO file with an 'images' list is required")
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        keep = {image["id"] for image in dataset["images"][:max_images]}
        dataset = copy.copy(dataset)
        dataset["images"] = dataset["images"][:max_images]
        dataset["annotations"] = [a for a in dataset["annotations"] if a["image_id"] in keep]
    dataset.setdefault("categories", [{"id": 1, "name": "object"}])
    coco = COCO()
    coco.dataset = dataset
    _quiet(coco.createIndex)
    return coco, [image["id"] for image in dataset["images"]]


def evaluate_coco(
    model: Sam,
    annotations: str | Path,
    images: str | Path,
    max_images: int | None = None,
    points_per_side: int = 32,
    progress: bool = False,
    embedding_cache: EmbeddingCache | None = None,
    encoder_precision: EncoderPrecision = "fp32",
) -> dict[str, Any]:
    """All metrics of ``model`` on a COCO dataset (the keys of ``maskmill eval --json``).

    Args:
        model: the model to evaluate.
        annotations: COCO instances JSON (polygon or RLE segmentations).
        images: folder holding the images under their ``file_name``.
        max_images: evaluate the first N images of the file only.
        points_per_side: grid of the automatic generator.
        progress: show a tqdm bar over the images.
        embedding_cache: ``model``'s embedding cache (``engine.embeddings``); None: encode
            every image (module doc).
        encoder_precision: what the image encoder computes in (``Predictor``): ``"fp32"``,
            or ``"bf16"`` / ``"fp16"`` autocast (compare the two runs' metrics for parity).

    Returns:
        ``one_click_miou_best``, ``one_click_miou_top1``, ``noc85``, ``noc90``, ``box_miou``,
        ``box_prompt_ap``, ``box_prompt_ap50``, ``box_prompt_ap75``, ``ar100``, ``ar1000``
        (floats), ``box_prompt_ap_per_category`` (``{name: {"ap", "ap50"}}``, see
        :func:`box_prompt_ap`) and ``images``, ``masks`` (counts). Crowd annotations are not
        prompted (COCOeval treats them as crowd regions).
    """
    from tqdm import tqdm

    gt, image_ids = load_coco(annotations, max_images)
    predictor = Predictor(model, encoder_precision)
    generator = MaskGenerator(
        model,
        points_per_side=points_per_side,
        **PROPOSAL_OPTIONS,
        encoder_precision=encoder_precision,
    )
    per_mask: list[InteractiveResult] = []
    detections: list[dict[str, Any]] = []
    box_results: list[dict[str, Any]] = []  # the box prompts' masks, as COCO results
    for image_id in tqdm(image_ids, disable=not progress, unit="img"):
        info = gt.imgs[image_id]
        image, key = _read_image(str(Path(images) / info["file_name"]), embedding_cache)
        if image.shape[:2] != (info["height"], info["width"]):
            raise ValueError(
                f"{info['file_name']}: image is {image.shape[1]}x{image.shape[0]} but the "
                f"annotations say {info['width']}x{info['height']}"
            )
        anns = [a for a in gt.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        pairs = [(a, gt.annToMask(a).astype(bool)) for a in anns]
        pairs = [(a, m) for a, m in pairs if m.any()]
        with torch.inference_mode():
            set_image(predictor, key, image, embedding_cache)
        if pairs:
            result = evaluate_interactive(predictor, np.stack([m for _, m in pairs]))
            per_mask.append(result)
            for (ann, _), segmentation, score in zip(
                pairs, result.box_rles, result.box_scores, strict=True
            ):
                box_results.append(
                    {
                        "image_id": image_id,
                        "category_id": ann["category_id"],
                        "segmentation": segmentation,
                        "score": float(score),
                    }
                )
        for record in generate_masks(generator, key, image, embedding_cache):
            detections.append(
                {
                    "image_id": image_id,
                    "segmentation": record["segmentation"],
                    "score": float(record["predicted_iou"]),
                }
            )
    metrics: dict[str, Any] = {key: float("nan") for key in METRIC_KEYS}
    masks_count = sum(len(r.box) for r in per_mask)
    if per_mask:
        metrics["one_click_miou_best"] = _mean(per_mask, lambda r: r.one_click_best)
        metrics["one_click_miou_top1"] = _mean(per_mask, lambda r: r.one_click_top1)
        metrics["noc85"] = _mean(per_mask, lambda r: r.noc[0.85])
        metrics["noc90"] = _mean(per_mask, lambda r: r.noc[0.90])
        metrics["box_miou"] = _mean(per_mask, lambda r: r.box)
    metrics.update(box_prompt_ap(gt, box_results, image_ids))
    metrics.update(average_recall(gt, detections, image_ids))
    metrics["images"] = len(image_ids)
    metrics["masks"] = masks_count
    return metrics


def _read_image(path: str, cache: EmbeddingCache | None) -> tuple[np.ndarray, str | None]:
    """(H, W, 3) uint8 RGB of an image file, turned upright by its EXIF orientation, and its
    key in ``cache`` (:func:`storage.images.load_image_and_id`: None when the turn changed
    the pixels, or without a cache)."""
    image, key = load_image_and_id(path)  # a missing or bad file is refused here, named
    return image, key if cache is not None else None


def _mean(results: list[InteractiveResult], field) -> float:
    return float(np.concatenate([field(r) for r in results]).mean())


def format_table(metrics: dict[str, Any]) -> str:
    """The metrics as an aligned two-column terminal table."""
    labels = {
        "one_click_miou_best": "1-click mIoU (best of 3)",
        "one_click_miou_top1": "1-click mIoU (top-1 by IoU head)",
        "noc85": "NoC@85 (max 20)",
        "noc90": "NoC@90 (max 20)",
        "box_miou": "box mIoU",
        "box_prompt_ap": "box-prompt mask AP (GT boxes)",
        "box_prompt_ap50": "box-prompt mask AP50",
        "box_prompt_ap75": "box-prompt mask AP75",
        "box_prompt_ap_per_category": "",  # a line per category, below
        "ar100": "AR@100 (generator, class-agnostic)",
        "ar1000": "AR@1000 (generator, class-agnostic)",
        "concept_ap": "concept-prompt mask AP (--concepts)",
        "concept_ap50": "concept-prompt mask AP50",
        "concept_ap75": "concept-prompt mask AP75",
        "concept_ap_per_category": "",
        "images": "images",
        "masks": "masks",
    }
    rows: list[tuple[str, str]] = []
    for key, label in labels.items():
        if key not in metrics:  # e.g. the concept keys without --concepts
            continue
        value = metrics.get(key)
        if key.endswith("_ap_per_category"):
            for name, ap in (value or {}).items():
                rows.append((f"  AP / AP50 of {name}", f"{ap['ap']:.3f} / {ap['ap50']:.3f}"))
            continue
        text = f"{value:.2f}" if key.startswith("noc") else f"{value:.3f}"
        if key in ("images", "masks"):
            text = str(value)
        rows.append((label, text))
    width = max(len(label) for label, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{label:<{width}}  {text}" for label, text in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------- generator preset calibration


@dataclass
class PresetCalibration:
    """What :func:`calibrate_presets` decided, for the model's meta.

    Attributes:
        presets: ``{"auto": {...}, "semi": {...}}``, the new model's generator presets.
        quality_bar: per preset, the mean best IoU with a ground-truth object that the kept
            masks must reach (measured once, on the first model, and carried forward).
        report: per preset, ``{"calibrated": bool, "masks": n kept, "quality": mean IoU}``.
    """

    presets: dict[str, dict[str, Any]]
    quality_bar: dict[str, float]
    report: dict[str, dict[str, Any]]


def proposal_quality(
    model: Sam,
    samples: list[tuple[np.ndarray, list[dict[str, Any]]]],
    generator_options: dict[str, Any],
    stability_score_thresh: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every mask the generator proposes on ``samples`` (images with ground-truth RLEs), with no
    predicted-IoU filter: (predicted IoU, stability, best IoU with a ground-truth object), each
    (N,). NMS ranks by predicted IoU, so the masks a threshold ``t`` keeps are exactly those of
    these with predicted IoU > ``t``."""
    from maskmill.storage import rle

    options = {
        **generator_options,
        "pred_iou_thresh": 0.0,
        "stability_score_thresh": stability_score_thresh,
    }
    generator = MaskGenerator(model, **options)
    predicted, stability, best = [], [], []
    with torch.inference_mode():
        for image, truth in samples:
            records = generator.generate(image)
            if not records or not truth:
                continue
            ious = rle.ious([r["segmentation"] for r in records], list(truth))
            predicted += [r["predicted_iou"] for r in records]
            stability += [r["stability_score"] for r in records]
            best += list(np.asarray(ious).max(axis=1))
    return np.asarray(predicted), np.asarray(stability), np.asarray(best, dtype=np.float64)


def calibrate_presets(
    model: Sam,
    presets: dict[str, dict[str, Any]],
    samples: list[tuple[np.ndarray, list[dict[str, Any]]]],
    generator_options: dict[str, Any],
    quality_bar: dict[str, float] | None = None,
    base: Sam | None = None,
    min_masks: int = 5,
) -> PresetCalibration:
    """Re-express a base model's generator presets in ``model``'s own predicted-IoU units.

    A retrained model's IoU head shifts: the same threshold keeps different masks. The quality
    bar of a preset is the mean best IoU with a ground-truth object of the masks the base model
    keeps at it on the ``samples`` (measured once with ``base``, then carried in the
    metadata as ``quality_bar``). ``model``'s new ``pred_iou_thresh`` is the lowest at which
    its kept masks (same stability threshold) reach that bar, so a better model keeps more
    masks of the same quality; the threshold sits midway between the last mask kept and the
    first left out. A preset stays as it was when the bar cannot be measured or
    reached with at least ``min_masks`` masks.

    Args:
        model: the new model.
        presets: its base's presets (``generator_presets(base)``).
        samples: (H, W, 3) uint8 images with their reference COCO RLEs (the engine passes
            validation images with their annotated masks, never held-out ones).
        generator_options: the stages' grid (``engine.stages.STAGE_GENERATOR``).
        quality_bar: the bars carried from earlier calibrations; missing ones are measured
            with ``base``.
        base: the base model (needed only to measure a missing bar).
        min_masks: fewest kept masks a bar or a threshold is decided on.
    """
    bars = dict(quality_bar or {})
    new_presets = {name: dict(values) for name, values in presets.items()}
    report: dict[str, dict[str, Any]] = {}
    lowest_stability = min(float(p["stability_score_thresh"]) for p in presets.values())
    ours = proposal_quality(model, samples, generator_options, lowest_stability)
    theirs = None
    for name, preset in presets.items():
        iou_thresh = float(preset["pred_iou_thresh"])
        stability_thresh = float(preset["stability_score_thresh"])
        if name not in bars and base is not None:
            if theirs is None:
                theirs = proposal_quality(base, samples, generator_options, lowest_stability)
            predicted, stability, best = theirs
            kept = (predicted > iou_thresh) & (stability >= stability_thresh)
            if kept.sum() >= min_masks:
                bars[name] = float(best[kept].mean())
        predicted, stability, best = ours
        report[name] = {"calibrated": False}
        if name not in bars:
            continue
        usable = stability >= stability_thresh
        order = np.argsort(-predicted[usable], kind="stable")
        scores, quality = predicted[usable][order], best[usable][order]
        # Keeping the top k masks: mean quality of each prefix; the threshold sits just below
        # the k-th predicted IoU. Take the largest k that meets the bar.
        means = np.cumsum(quality) / np.arange(1, len(quality) + 1)
        enough = np.arange(1, len(means) + 1) >= min_masks
        meets = np.flatnonzero((means >= bars[name] - 1e-9) & enough)  # 1e-9: float sums
        if not len(meets):
            continue
        k = int(meets[-1]) + 1
        # Midway between the last mask kept and the first left out: the widest margin on
        # both sides, rather than a threshold pressed against these few images' scores.
        below = float(scores[k]) if k < len(scores) else 0.0
        threshold = float(np.floor((float(scores[k - 1]) + below) / 2 * 1000) / 1000)
        new_presets[name]["pred_iou_thresh"] = min(max(threshold, 0.0), 1.0)
        report[name] = {"calibrated": True, "masks": k, "quality": float(means[k - 1])}
    return PresetCalibration(new_presets, bars, report)
