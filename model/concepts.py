"""Every instance of a concept in an image: grid candidates scored against the concept.

The candidates are the automatic generator's (a grid of point prompts, three masks per point),
kept loosely (:data:`CANDIDATE_OPTIONS`), because here the concept score, not the predicted
IoU alone, decides which survive. Each candidate is scored against the concepts by the model's
:class:`~maskmill.model.concept_head.ConceptHead` (the store's concepts), or, given a
:class:`~maskmill.model.text_encoder.ClipEncoder`, by its
:class:`~maskmill.model.text_prompt_head.TextPromptHead` against CLIP embeddings of any phrase;
duplicates of one concept are removed by NMS on that score, after scoring, so a confident union
of two objects cannot suppress one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import batched_nms

from .concept_head import ConceptHead, mask_pooled_features
from .mask_generator import MaskGenerator
from .predictor import ImageEmbedding
from .sam import Sam
from .text_encoder import ClipEncoder, TextEncoder
from .text_prompt_head import TextPromptHead

# Generator settings for concept candidates: SAM's grid of 32 x 32 would cost four times the
# decoder work for little more recall on a CPU; no NMS here (the concept score decides, see the
# module doc); thresholds well below any preset, so an object the model draws at all survives.
CANDIDATE_OPTIONS: dict[str, Any] = {
    "points_per_side": 16,
    "pred_iou_thresh": 0.1,
    "stability_score_thresh": 0.3,
    "box_nms_thresh": 1.0,
}
CONCEPT_NMS_THRESH = 0.5  # box IoU above which two masks of one concept are one instance
DECODE_CHUNK = 64  # masks decoded to full resolution at a time (bounds memory)


def require_concept_head(model: Sam) -> ConceptHead:
    """The model's concept head.

    Raises:
        ValueError: the model has none, saying how one is made.
    """
    head = getattr(model, "concept_head", None)
    if head is None:
        raise ValueError(
            "this model has no concept head: retrain it on a store whose masks have "
            "categories (`maskmill run`, or import-coco then retrain) to learn concepts"
        )
    return head


def require_text_head(model: Sam, encoder: ClipEncoder | None = None) -> TextPromptHead:
    """The model's CLIP text head, checked against ``encoder`` when one is given.

    Raises:
        ValueError: the model has none (saying how one is made), or ``encoder`` is another CLIP
            than the one it was trained with.
    """
    head = getattr(model, "text_head", None)
    if head is None:
        raise ValueError(
            "this model has no CLIP text prompts: train them with your CLIP weights "
            "(`maskmill fit-text`, or `maskmill run --clip-model ... --clip-weights ...`)"
        )
    if encoder is not None:
        head.check_encoder(encoder.probe(), getattr(encoder, "name", ""))
    return head


def candidate_generator(model: Sam, **overrides: Any) -> MaskGenerator:
    """The generator of concept candidates (:data:`CANDIDATE_OPTIONS`, then ``overrides``)."""
    return MaskGenerator(model, **{**CANDIDATE_OPTIONS, **overrides})


@torch.inference_mode()
def candidate_features(
    model: Sam, embedding: ImageEmbedding, segmentations: Sequence[dict[str, Any]]
) -> torch.Tensor:
    """(N, 2C) :func:`mask_pooled_features` of N COCO-RLE masks on the embedded image."""
    head_input = []
    for start in range(0, len(segmentations), DECODE_CHUNK):
        chunk = list(segmentations[start : start + DECODE_CHUNK])
        masks = torch.from_numpy(np.ascontiguousarray(mask_utils.decode(chunk).transpose(2, 0, 1)))
        head_input.append(
            mask_pooled_features(embedding.features, masks, embedding.input_size, model.image_size)
        )
    if not head_input:
        channels = embedding.features.shape[1]
        return torch.zeros((0, 2 * channels))
    return torch.cat(head_input)


@torch.inference_mode()
def find_instances(
    model: Sam,
    embedding: ImageEmbedding,
    concepts: Sequence[str] | None = None,
    threshold: float | None = None,
    generator: MaskGenerator | None = None,
    nms_thresh: float = CONCEPT_NMS_THRESH,
    text_encoder: TextEncoder | None = None,
) -> list[dict[str, Any]]:
    """Every instance of ``concepts`` in the embedded image.

    Args:
        model: a model with a concept head (or, with ``text_encoder``, a text head).
        embedding: the image (``Predictor.image_embedding``).
        concepts: names to look for (compared case-insensitively); None: all the head knows
            (a CLIP ``text_encoder`` needs them given).
        threshold: lowest score reported; None: the head's own (chosen when it was trained);
            0 reports every candidate's best concept (what average precision wants).
        generator: candidate generator (default :func:`candidate_generator`).
        nms_thresh: box IoU above which two masks of one concept are the same instance.
        text_encoder: a :class:`ClipEncoder` (open vocabulary through the model's text head);
            None or the model's own concept head: the concepts learned from its store.

    Returns:
        SA-1B records (``segmentation`` RLE, ``area``, ``bbox`` XYWH, ``predicted_iou``,
        ``stability_score``, ``point_coords``, ``crop_box``) plus ``category`` (the concept's
        name as the head knows it), ``category_id`` (the store's id, or None) and ``score``
        (the concept score in [0, 1]), by score, highest first. A mask is reported once, for
        its best-scoring concept.

    Raises:
        ValueError: the model has no concept head (no text head, or another CLIP). KeyError: a
            concept it does not know.
    """
    if text_encoder is not None and not isinstance(text_encoder, ConceptHead):
        if not concepts:
            raise ValueError("CLIP text prompts need the phrases to look for")
        text_head = require_text_head(model, text_encoder)
        names = list(dict.fromkeys(str(c).strip() for c in concepts))
        known = getattr(model, "concept_head", None)
        ids = [_category_id(known, name) for name in names]
        text = text_encoder.encode_text(names).to(model.device)

        def score(features: torch.Tensor) -> torch.Tensor:
            return text_head.scores(features, text)

        threshold = text_head.threshold if threshold is None else float(threshold)
    else:
        head = require_concept_head(model)
        picked = [head.index(n) for n in concepts] if concepts else list(range(len(head.names)))
        picked = list(dict.fromkeys(picked))
        names = [head.names[i] for i in picked]
        ids = [head.category_ids[i] for i in picked]

        def score(features: torch.Tensor) -> torch.Tensor:
            return head.scores(features)[:, picked]

        threshold = head.threshold if threshold is None else float(threshold)
    generator = generator or candidate_generator(model)
    candidates = generator.generate_embedded(embedding)
    if not candidates:
        return []
    features = candidate_features(model, embedding, [c["segmentation"] for c in candidates])
    scores = score(features.to(model.device)).float().cpu()  # (N, K')
    best, which = scores.max(dim=1)
    keep = torch.nonzero(best >= threshold).flatten()
    if keep.numel() == 0:
        return []
    boxes = torch.tensor([candidates[i]["bbox"] for i in keep.tolist()], dtype=torch.float32)
    boxes[:, 2:] += boxes[:, :2]  # XYWH -> XYXY
    kept = batched_nms(boxes, best[keep], which[keep], nms_thresh)
    out = []
    for position in kept.tolist():
        index = int(keep[position])
        column = int(which[index])
        out.append(
            {
                **candidates[index],
                "category": names[column],
                "category_id": ids[column],
                "score": float(best[index]),
            }
        )
    return out


def _category_id(head: ConceptHead | None, name: str) -> int | None:
    """The store's category id of ``name`` where the model's concept head knows it."""
    if head is None:
        return None
    try:
        return head.category_ids[head.index(name)]
    except KeyError:
        return None


@torch.inference_mode()
def label_records(
    model: Sam,
    embedding: ImageEmbedding,
    records: Sequence[dict[str, Any]],
    threshold: float | None = None,
) -> list[dict[str, Any]]:
    """Copies of mask ``records`` of the embedded image, each labelled with the concept head's
    best concept where its score reaches ``threshold`` (None: the head's own): ``category``,
    ``category_id`` and ``score`` set. Records the head is not sure of, and all of them when the
    model has no concept head, are returned unlabelled. A record that already has a category
    keeps it."""
    out = [dict(record) for record in records]
    head = getattr(model, "concept_head", None)
    if head is None or not out:
        return out
    threshold = head.threshold if threshold is None else float(threshold)
    features = candidate_features(model, embedding, [r["segmentation"] for r in out])
    best, which = head.scores(features.to(model.device)).float().cpu().max(dim=1)
    for record, score, column in zip(out, best.tolist(), which.tolist(), strict=True):
        if score >= threshold and record.get("category") is None:
            record.update(
                category=head.names[column],
                category_id=head.category_ids[column],
                score=float(score),
            )
    return out
