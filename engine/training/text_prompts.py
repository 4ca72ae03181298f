"""Train a model's CLIP text prompts (``model.text_head``) on a store's masks.

As the SAM paper did: for every training mask, the CLIP *image* embedding of its crop stands in
for the phrase that would name it (CLIP aligns images and phrases), and at inference the CLIP
*text* embedding of a phrase takes its place. Three losses train the head; the SAM model itself
stays frozen, so its masks for points and boxes do not change:

- **prompt**: the crop's embedding, as one sparse prompt token, must make the frozen mask
  decoder draw the mask (SAM's focal + dice loss on the best of the three outputs);
- **align**: the mask's pooled features, mapped into CLIP's space, must point where CLIP's
  embedding of the crop points (1 - cosine), for masks and for background candidates alike;
- **names**: where masks have categories, a sigmoid score of each mask against CLIP's text
  embedding of each category name (as SigLIP), background candidates scoring no name; this
  sets the scale and bias that make ``find_instances``' threshold mean something.

Crops are the mask's box grown by ``context`` on each side, so CLIP sees the object as a
photo of it would show it; masks whose box is smaller than ``min_side`` pixels are left out
(CLIP sees nothing in them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.nn import functional as F

from maskmill.model import Predictor, Sam
from maskmill.model.concept_head import concept_key
from maskmill.model.concepts import candidate_features, candidate_generator
from maskmill.model.losses import mask_loss
from maskmill.model.mask_decoder import DecoderImage
from maskmill.model.prompt_simulation import low_res_targets, prepare_masks
from maskmill.model.text_encoder import ClipEncoder
from maskmill.model.text_prompt_head import TextPromptHead

from .concepts import concept_vocabulary

# Masks the prompt loss is measured on before and after training (the first ones).
PROMPT_LOSS_MASKS = 64


@dataclass
class TextPromptTrainingConfig:
    """How a text prompt head trains.

    Attributes:
        steps: AdamW steps.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        masks_per_step: examples drawn per step for the align and names losses.
        prompt_masks_per_step: masks among them the decoder draws for the prompt loss (the
            costly part: a decoder pass and its backward per mask).
        max_images: most images encoded for one training (spread evenly by the caller).
        max_masks_per_image: most masks of one image used (the largest first).
        negatives_per_image: background candidates per image (overlapping no mask).
        negative_iou: a candidate below this IoU with every mask is background.
        points_per_side: the candidate grid (``find_instances``' own by default).
        min_side: masks whose box is smaller than this many pixels on a side are left out.
        context: a crop is the mask's box grown by this share of its size on each side.
        hidden_dim: width of the head's hidden layers.
        seed: seed of the head, the draws and dropout.
    """

    steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-2
    masks_per_step: int = 32
    prompt_masks_per_step: int = 8
    max_images: int = 64
    max_masks_per_image: int = 32
    negatives_per_image: int = 16
    negative_iou: float = 0.3
    points_per_side: int = 16
    min_side: int = 8
    context: float = 0.1
    hidden_dim: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        positive = {
            "steps": self.steps,
            "lr": self.lr,
            "masks_per_step": self.masks_per_step,
            "prompt_masks_per_step": self.prompt_masks_per_step,
            "max_images": self.max_images,
            "max_masks_per_image": self.max_masks_per_image,
            "points_per_side": self.points_per_side,
        }
        wrong = [f"{k}={v!r}" for k, v in positive.items() if not v > 0]
        if not 0.0 < self.negative_iou <= 1.0 or self.context < 0 or self.negatives_per_image < 0:
            wrong.append("negative_iou/context/negatives_per_image")
        if wrong:
            raise ValueError(f"TextPromptTrainingConfig: out of range: {', '.join(wrong)}")


@dataclass
class TextPromptExamples:
    """Training examples of a text prompt head (N examples, P of them masks).

    Attributes:
        clip: (N, D) CLIP image embeddings of the crops.
        features: (N, F) pooled mask features.
        labels: (N,) category column, -1 for a background candidate, -2 for a mask without a
            category.
        image_index: (P,) image of each mask (examples 0..P-1 are the masks).
        targets: (P, h, w) bool masks on the decoder's low-resolution grid.
        decoder_images: the decoder's image side of each image.
        names: the K category names (label order).
        images: images the examples came from.
    """

    clip: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor
    image_index: torch.Tensor
    targets: torch.Tensor
    decoder_images: list[DecoderImage]
    names: list[str]
    images: int

    @property
    def masks(self) -> int:
        return int(self.image_index.shape[0])


def crop_box(
    bbox: Sequence[float], height: int, width: int, context: float
) -> tuple[int, int, int, int]:
    """XYXY integer crop of an XYWH box grown by ``context`` of its size on each side, inside
    an (H, W) image."""
    x, y, w, h = (float(v) for v in bbox)
    x0, y0 = max(0, int(x - context * w)), max(0, int(y - context * h))
    x1 = min(width, int(np.ceil(x + w + context * w)))
    y1 = min(height, int(np.ceil(y + h + context * h)))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def text_prompt_examples(
    model: Sam,
    clip: ClipEncoder,
    samples: Sequence[dict[str, Any]],
    images: Sequence[np.ndarray],
    config: TextPromptTrainingConfig,
    progress: Callable[[int, int], None] | None = None,
) -> TextPromptExamples:
    """Crops, features and targets of the samples' masks and of background candidates.

    Args:
        model: the frozen model whose features and decoder the head learns on.
        clip: the CLIP the head maps to.
        samples: ``{"masks": [RLE], "categories": [name | None], ...}`` per image
            (``storage.queries.training_set``).
        images: (H, W, 3) uint8 RGB image of each sample.
        config: what to use of each image.
        progress: optional callable(done, total) after each image.
    """
    names, _ = concept_vocabulary(samples)
    column = {concept_key(n): i for i, n in enumerate(names)}
    predictor = Predictor(model)
    generator = candidate_generator(model, points_per_side=config.points_per_side)
    rng = np.random.default_rng(config.seed)
    mask_parts: dict[str, list[Any]] = {"clip": [], "features": [], "labels": [], "targets": []}
    background: dict[str, list[Any]] = {"clip": [], "features": []}
    image_index: list[int] = []
    decoder_images: list[DecoderImage] = []
    for done, (sample, image) in enumerate(zip(samples, images, strict=True), start=1):
        height, width = image.shape[:2]
        categories = list(sample.get("categories") or [None] * len(sample["masks"]))
        boxes = mask_utils.toBbox(list(sample["masks"])) if sample["masks"] else np.zeros((0, 4))
        usable = [i for i, box in enumerate(boxes) if min(box[2], box[3]) >= config.min_side]
        usable = sorted(usable, key=lambda i: -boxes[i][2] * boxes[i][3])
        usable = usable[: config.max_masks_per_image]
        if not usable:
            continue
        with torch.inference_mode():
            predictor.set_image(image)
            embedding = predictor.image_embedding
            candidates = generator.generate_embedded(embedding)
        truths = [sample["masks"][i] for i in usable]
        negatives = []
        if candidates and config.negatives_per_image:
            rles = [c["segmentation"] for c in candidates]
            ious = np.asarray(mask_utils.iou(rles, list(sample["masks"]), [0] * len(boxes)))
            ious = ious.reshape(len(rles), len(boxes)).max(axis=1)
            pool = np.flatnonzero(ious < config.negative_iou)
            pool = [i for i in pool if min(candidates[i]["bbox"][2:]) >= config.min_side]
            take = min(len(pool), config.negatives_per_image)
            if take:
                negatives = [candidates[i] for i in rng.choice(pool, take, replace=False)]
        with torch.inference_mode():
            features = candidate_features(
                model, embedding, truths + [c["segmentation"] for c in negatives]
            )
        crops = [
            image[y0:y1, x0:x1]
            for x0, y0, x1, y1 in (
                crop_box(box, height, width, config.context)
                for box in [boxes[i] for i in usable] + [c["bbox"] for c in negatives]
            )
        ]
        embedded = clip.encode_crops(crops)
        count = len(usable)
        mask_parts["clip"].append(embedded[:count])
        mask_parts["features"].append(features[:count])
        mask_parts["labels"].append(
            torch.tensor(
                [column[concept_key(categories[i])] if categories[i] else -2 for i in usable],
                dtype=torch.long,
            )
        )
        decoded = mask_utils.decode(truths).transpose(2, 0, 1)
        # The decoder's output grid: the masks in the model input frame, pooled to S / 4.
        framed = prepare_masks(decoded.astype(bool), model.image_size)
        side = model.prompt_encoder.mask_input_size[0]
        mask_parts["targets"].append(low_res_targets(framed, side))
        background["clip"].append(embedded[count:])
        background["features"].append(features[count:])
        image_index.extend([len(decoder_images)] * count)
        # Outside inference mode (as a plain no-grad tensor) so the head's loss can flow
        # through the frozen decoder into the prompt token.
        with torch.no_grad():
            decoder_images.append(_decoder_image(model, embedding.features.clone()))
        if progress is not None:
            progress(done, len(samples))
    if not image_index:
        raise ValueError(
            f"no mask at least {config.min_side} px on a side to learn text prompts from"
        )
    negatives_count = sum(len(t) for t in background["clip"])
    # Clones: tensors made in inference mode cannot take part in autograd.
    return TextPromptExamples(
        clip=torch.cat(mask_parts["clip"] + background["clip"]).clone(),
        features=torch.cat(mask_parts["features"] + background["features"]).clone(),
        labels=torch.cat(mask_parts["labels"] + [torch.full((negatives_count,), -1)]),
        image_index=torch.tensor(image_index, dtype=torch.long),
        targets=torch.cat(mask_parts["targets"]),
        decoder_images=decoder_images,
        names=names,
        images=len(decoder_images),
    )


def _decoder_image(model: Sam, features: torch.Tensor) -> DecoderImage:
    """The decoder's image side for prompts without a mask (``Predictor.decoder_image``)."""
    prompt_encoder = model.prompt_encoder
    return model.mask_decoder.prepare_image(
        features + prompt_encoder.no_mask_dense_embedding(1), prompt_encoder.get_dense_pe()
    )


def train_text_prompt_head(
    model: Sam,
    clip: ClipEncoder,
    examples: TextPromptExamples,
    config: TextPromptTrainingConfig | None = None,
) -> tuple[TextPromptHead, dict[str, float]]:
    """A text prompt head fitted to ``examples`` (module doc); the model stays as it is.

    Returns:
        The head (eval mode) and its figures: ``text_examples``, ``text_masks``,
        ``text_loss_first`` / ``text_loss_last`` (the mean over the first and last tenth of
        the steps) and ``text_prompt_loss_before`` / ``_after`` (the decoder part on the same
        masks, up to :data:`PROMPT_LOSS_MASKS`, before and after training).
    """
    config = config or TextPromptTrainingConfig()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = model.device
    head = TextPromptHead(
        text_dim=examples.clip.shape[1],
        prompt_dim=int(model.prompt_encoder.embed_dim),
        feature_dim=examples.features.shape[1],
        hidden_dim=config.hidden_dim,
        clip_name=clip.name,
    ).to(device)
    with torch.no_grad():
        head.feature_mean.copy_(examples.features.mean(0))
        if len(examples.features) > 1:
            head.feature_std.copy_(examples.features.std(0).clamp_min(1e-4))
        head.clip_probe.copy_(clip.probe())
    names = clip.encode_text(examples.names).to(device) if examples.names else None
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    clip_targets = examples.clip.to(device)
    features = examples.features.to(device)
    labels = examples.labels.to(device)
    total = len(labels)
    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    measured = torch.arange(min(examples.masks, PROMPT_LOSS_MASKS), device=device)
    with torch.no_grad():
        prompt_before = _prompt_loss(model, head.eval(), examples, measured, device).item()
    head.train()
    losses = []
    try:
        for _ in range(config.steps):
            batch = torch.randperm(total, generator=generator)[: config.masks_per_step].to(device)
            embedded = head.embed_masks(features[batch])
            loss = (1 - (embedded * clip_targets[batch]).sum(1)).mean()
            if names is not None:
                named = batch[labels[batch] != -2]  # masks without a category say nothing
                if len(named):
                    targets = F.one_hot(labels[named].clamp_min(0), len(examples.names)).float()
                    targets[labels[named] < 0] = 0.0
                    loss = loss + F.binary_cross_entropy_with_logits(
                        head(features[named], names), targets
                    )
            masks = batch[batch < examples.masks][: config.prompt_masks_per_step]
            prompt = _prompt_loss(model, head, examples, masks, device)
            loss = loss + prompt
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        head.eval()
        with torch.no_grad():
            prompt_after = _prompt_loss(model, head, examples, measured, device).item()
    finally:
        for parameter, requires_grad in zip(model.parameters(), frozen, strict=True):
            parameter.requires_grad_(requires_grad)
    tenth = max(1, config.steps // 10)
    return head, {
        "text_examples": total,
        "text_masks": examples.masks,
        "text_loss_first": float(np.mean(losses[:tenth])),
        "text_loss_last": float(np.mean(losses[-tenth:])),
        "text_prompt_loss_before": prompt_before,
        "text_prompt_loss_after": prompt_after,
    }


def _prompt_loss(
    model: Sam,
    head: TextPromptHead,
    examples: TextPromptExamples,
    masks: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """SAM's mask loss of the frozen decoder prompted by the crops' tokens, best of three."""
    if masks.numel() == 0:
        return torch.zeros((), device=device)
    image_of = examples.image_index.to(device)[masks]
    total = torch.zeros((), device=device)
    for image in image_of.unique().tolist():
        chosen = masks[image_of == image]
        tokens = head.prompt_tokens(examples.clip[chosen.cpu()].to(device))
        logits, _ = model.mask_decoder.decode(examples.decoder_images[image], tokens, True)
        target = examples.targets[chosen.cpu()].to(device)[:, None].expand_as(logits)
        total = total + mask_loss(logits, target).min(dim=1).values.sum()
    return total / masks.numel()
