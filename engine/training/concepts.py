"""Train a model's concept head on the categories people gave masks in a store.

What it learns from: on each training image, the concept candidates the model itself proposes
(``model.concepts.candidate_generator``, the same ones ``find_instances`` scores at inference),
labelled by the image's categorised masks:

- a candidate overlapping a mask at mask IoU >= ``positive_iou`` is an instance of that mask's
  category;
- a candidate overlapping no mask at IoU >= ``negative_iou`` is an instance of no concept
  (background, a part, two objects at once): the negatives the scores must learn to reject;
- in between, or matching a mask without a category, it is left out (neither is known).

The stored masks themselves are positives too. Features are the model's own
(:func:`maskmill.model.concept_head.mask_pooled_features`), computed once with the image encoder
as it is; the head alone trains (seconds on a CPU), with independent sigmoid scores per
concept (binary cross-entropy).

Categories are taken as complete per image: an image with some categorised masks is assumed
to have all its instances of those categories annotated (as COCO and the annotation rounds
do); images without any categorised mask are not used.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.nn import functional as F

from maskmill.model import Predictor, Sam
from maskmill.model.concept_head import ConceptHead, concept_key
from maskmill.model.concepts import candidate_features, candidate_generator


@dataclass
class ConceptTrainingConfig:
    """How a concept head trains.

    Attributes:
        steps: full-batch AdamW steps (the examples are a few thousand feature vectors).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        positive_iou: candidate-to-mask IoU from which a candidate is an instance (COCO's AP50
            criterion).
        negative_iou: IoU below which (to every mask) a candidate is an instance of nothing.
        max_images: most images encoded for one training (sampled evenly by id order).
        points_per_side: candidate grid on training images, by default the one
            ``find_instances`` uses, so the head learns on the candidates it will score (on
            fruit photos a grid of 8 gave AP50 0.34 against 0.41 at 16).
        embed_dim: dimension of the concept space.
        hidden_dim: width of the head's hidden layer.
        seed: seed of the head's initialisation and dropout.
    """

    steps: int = 400
    lr: float = 1e-3
    weight_decay: float = 1e-2
    positive_iou: float = 0.5
    negative_iou: float = 0.3
    max_images: int = 64
    points_per_side: int = 16
    embed_dim: int = 64
    hidden_dim: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.negative_iou <= self.positive_iou <= 1.0:
            raise ValueError(
                "ConceptTrainingConfig: need 0 < negative_iou <= positive_iou <= 1, got "
                f"{self.negative_iou} and {self.positive_iou}"
            )
        if self.steps < 1 or self.max_images < 1 or self.lr <= 0:
            raise ValueError("ConceptTrainingConfig: steps, max_images and lr must be positive")


@dataclass
class ConceptExamples:
    """Training examples of a concept head.

    Attributes:
        features: (N, F) mask features.
        labels: (N,) concept index, or -1 for "no concept" (a negative).
        names: the K concept names (index order).
        category_ids: the store's category id per name (or None).
        images: images the examples came from.
    """

    features: torch.Tensor
    labels: torch.Tensor
    names: list[str]
    category_ids: list[int | None]
    images: int


def concept_vocabulary(samples: Iterable[dict[str, Any]]) -> tuple[list[str], list[int | None]]:
    """Concept names (sorted, first spelling of each :func:`concept_key`) and their category ids
    (the smallest stored with the name) from samples' ``categories`` / ``category_ids``."""
    names: dict[str, str] = {}
    ids: dict[str, int | None] = {}
    for sample in samples:
        names_given = sample.get("categories") or []
        ids_given = sample.get("category_ids") or [None] * len(names_given)
        for name, category_id in zip(names_given, ids_given, strict=False):
            if not name:
                continue
            key = concept_key(name)
            names.setdefault(key, str(name).strip())
            if category_id is not None:
                known = ids.get(key)
                ids[key] = int(category_id) if known is None else min(known, int(category_id))
            else:
                ids.setdefault(key, None)
    keys = sorted(names)
    return [names[k] for k in keys], [ids.get(k) for k in keys]


def concept_examples(
    model: Sam,
    samples: Sequence[dict[str, Any]],
    images: Sequence[np.ndarray],
    config: ConceptTrainingConfig,
    progress: Any = None,
) -> ConceptExamples:
    """Features and labels of every candidate and stored mask of the samples (module doc).

    Args:
        model: the model whose features and candidates the head learns on.
        samples: ``{"masks": [RLE], "categories": [name | None], "category_ids": [...]}`` per
            image (``storage.queries.training_set`` with categories).
        images: (H, W, 3) uint8 RGB image of each sample.
        config: IoU thresholds.
        progress: optional callable(done, total) after each image.
    """
    names, category_ids = concept_vocabulary(samples)
    column = {concept_key(n): i for i, n in enumerate(names)}
    predictor = Predictor(model)
    generator = candidate_generator(model, points_per_side=config.points_per_side)
    features, labels = [], []
    used = 0
    for done, (sample, image) in enumerate(zip(samples, images, strict=True), start=1):
        truth = [
            (rle, column.get(concept_key(name)) if name else None)
            for rle, name in zip(sample["masks"], sample.get("categories") or [], strict=False)
        ]
        if not any(label is not None for _, label in truth):
            continue
        used += 1
        with torch.inference_mode():
            predictor.set_image(image)
            embedding = predictor.image_embedding
            candidates = [c["segmentation"] for c in generator.generate_embedded(embedding)]
        truth_rles = [rle for rle, _ in truth]
        truth_labels = np.array([-2 if label is None else label for _, label in truth])
        candidate_labels = np.full(len(candidates), -1)
        if candidates:
            ious = np.asarray(mask_utils.iou(candidates, truth_rles, [0] * len(truth_rles)))
            ious = ious.reshape(len(candidates), len(truth_rles))
            best, match = ious.max(axis=1), ious.argmax(axis=1)
            candidate_labels = np.where(best >= config.positive_iou, truth_labels[match], -1)
            candidate_labels[(best >= config.negative_iou) & (best < config.positive_iou)] = -2
        rles = candidates + truth_rles
        all_labels = np.concatenate([candidate_labels, truth_labels])
        keep = all_labels != -2  # -2: unknown (uncategorised match or ambiguous overlap)
        if keep.any():
            chosen = [rle for rle, k in zip(rles, keep, strict=True) if k]
            features.append(candidate_features(model, embedding, chosen))
            labels.append(torch.from_numpy(all_labels[keep]))
        if progress is not None:
            progress(done, len(samples))
    feature_dim = 2 * int(model.prompt_encoder.embed_dim)
    return ConceptExamples(
        features=torch.cat(features) if features else torch.zeros((0, feature_dim)),
        labels=torch.cat(labels).long() if labels else torch.zeros(0, dtype=torch.long),
        names=names,
        category_ids=category_ids,
        images=used,
    )


def train_concept_head(
    examples: ConceptExamples, config: ConceptTrainingConfig | None = None
) -> tuple[ConceptHead, dict[str, float]]:
    """A concept head fitted to ``examples``; returns it (eval mode) and its training figures:
    ``concept_examples``, ``concept_positives``, ``concept_loss_first``, ``concept_loss_last``.

    Raises:
        ValueError: no concept names, or no positive example.
    """
    config = config or ConceptTrainingConfig()
    positives = int((examples.labels >= 0).sum())
    if not examples.names or positives == 0:
        raise ValueError("no categorised masks to learn concepts from")
    torch.manual_seed(config.seed)
    features = examples.features.float()
    head = ConceptHead(
        feature_dim=features.shape[1],
        names=examples.names,
        embed_dim=config.embed_dim,
        hidden_dim=config.hidden_dim,
        category_ids=examples.category_ids,
    )
    head.feature_mean.copy_(features.mean(0))
    if len(features) > 1:
        head.feature_std.copy_(features.std(0).clamp_min(1e-4))
    # One-hot over the concepts; a negative is all zeros.
    targets = F.one_hot(examples.labels.clamp_min(0), len(examples.names)).float()
    targets[examples.labels < 0] = 0.0
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    head.train()
    losses = []
    for _ in range(config.steps):
        loss = F.binary_cross_entropy_with_logits(head(features), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().item())
    head.eval()
    return head, {
        "concept_examples": len(features),
        "concept_positives": positives,
        "concept_loss_first": losses[0],
        "concept_loss_last": losses[-1],
    }
