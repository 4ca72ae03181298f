"""SAM's training algorithm: simulate an interactive session for each mask and compare every
prediction with the ground truth.

Per mask, 11 decoder passes: a first prompt (a foreground point or a noisy box, equally likely),
then 8 passes that each add one point sampled uniformly from the error region of the previous
prediction (foreground on false negatives, background on false positives) and 2 passes that add
no point (one at a random position among them, one at the end). Every pass after the first gets
the previous unthresholded low-res logits — of the output with the highest predicted IoU — as the
mask prompt (detached, as in SAM). Loss: 20 x focal + 1 x dice on the masks plus MSE between the
predicted and the actual IoU; a single point is ambiguous, so then the three multimask outputs are
predicted and only the lowest of their mask losses back-propagates; with several prompts the
single-mask output is trained.

All masks of one image go through the decoder together, sharing the (1, C, h, w) image
embedding. Coordinates are XY pixels of the model input frame (the resized image, padded
bottom-right to S x S, S = ``model.image_size``); masks are (H, W) = (row, column).

Pure torch, differentiable: call it with gradients enabled (``Predictor`` is inference-only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from .losses import iou_loss, mask_iou, mask_loss
from .prompt_encoder import LABEL_BACKGROUND, LABEL_FOREGROUND
from .sam import Sam
from .transforms import preprocess_shape, resize_longest_side, to_rgb_uint8


@dataclass(frozen=True)
class SimulationConfig:
    """How prompts are simulated (SAM's values by default).

    Attributes:
        point_iterations: passes that add a point from the error region (SAM: 8).
        no_point_iterations: passes with only the mask prompt (SAM: 2; one of them last).
        box_probability: chance that the first prompt is a box rather than a point.
        box_noise: standard deviation of the box-corner noise, as a fraction of the box side.
        box_noise_max: cap on that noise, in pixels of the model input.
    """

    point_iterations: int = 8
    no_point_iterations: int = 2
    box_probability: float = 0.5
    box_noise: float = 0.1
    box_noise_max: float = 20.0

    def __post_init__(self) -> None:
        if self.point_iterations < 0 or self.no_point_iterations < 0:
            raise ValueError("iteration counts must be >= 0")
        if not 0.0 <= self.box_probability <= 1.0:
            raise ValueError(f"box_probability must be in [0, 1], got {self.box_probability}")

    @property
    def iterations(self) -> int:
        """Decoder passes per mask, the first prompt included (SAM: 11)."""
        return 1 + self.point_iterations + self.no_point_iterations


@dataclass
class SimulationResult:
    """Loss of one image's masks and what the passes reached.

    Attributes:
        loss: scalar to back-propagate: mean over passes and masks of mask loss + IoU loss.
        mask_loss: scalar, the mask part of ``loss`` (detached).
        iou_loss: scalar, the IoU-head part of ``loss`` (detached).
        ious: (iterations, B) IoU of the fed-back mask with the ground truth after each pass,
            in low-res, rows in the caller's mask order.
    """

    loss: torch.Tensor
    mask_loss: torch.Tensor
    iou_loss: torch.Tensor
    ious: torch.Tensor


# ------------------------------------------------------------------------------ preparation


def prepare_image(model: Sam, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """An (H, W, 3) uint8 RGB image as the model's normalised, padded (1, 3, S, S) input, and the
    (H, W) of the resized image inside it (the same transforms as ``Predictor``)."""
    resized = resize_longest_side(to_rgb_uint8(image), model.image_size)
    tensor = torch.from_numpy(np.array(resized)).to(model.device)  # a writable copy
    tensor = tensor.permute(2, 0, 1)[None].to(model.pixel_mean.dtype)
    return model.preprocess(tensor), resized.shape[:2]


def prepare_masks(masks: np.ndarray | torch.Tensor, long_side: int) -> torch.Tensor:
    """(M, H, W) bool masks of the original image -> (M, S, S) bool in the model input frame
    (resized like the image, longest side S = ``long_side``, zero-padded bottom-right)."""
    masks = torch.as_tensor(np.asarray(masks) if isinstance(masks, np.ndarray) else masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (M, H, W), got {tuple(masks.shape)}")
    new_h, new_w = preprocess_shape(masks.shape[1], masks.shape[2], long_side)
    resized = masks[:, None].float()
    if (new_h, new_w) != tuple(masks.shape[1:]):
        resized = F.interpolate(resized, (new_h, new_w), mode="bilinear", align_corners=False)
    resized = resized[:, 0] >= 0.5
    return F.pad(resized, (0, long_side - new_w, 0, long_side - new_h))


def low_res_targets(masks: torch.Tensor, side: int) -> torch.Tensor:
    """(B, S, S) bool masks -> (B, side, side) bool: a cell is foreground when at least half of
    the pixels it covers are (the resolution the decoder predicts at, S / 4 for SAM)."""
    factor = masks.shape[-1] // side
    return F.avg_pool2d(masks[:, None].float(), factor)[:, 0] >= 0.5


# -------------------------------------------------------------------------------- sampling


def sample_points(region: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One pixel drawn uniformly from each (B, H, W) bool region: (B, 2) XY integer coordinates
    (column, row) as float. Every region must be non-empty."""
    if region.ndim != 3:
        raise ValueError(f"region must have shape (B, H, W), got {tuple(region.shape)}")
    flat = region.flatten(1)
    if not flat.any(dim=1).all():
        raise ValueError("cannot sample a point from an empty region")
    # The argmax of iid uniform scores over the region's pixels is a uniform draw among them.
    # Drawn on the CPU (where the seeded generator lives), so a GPU run draws the same clicks.
    scores = torch.rand(flat.shape, generator=generator).to(flat.device)
    index = torch.where(flat, scores, -1.0).argmax(dim=1)
    width = region.shape[-1]
    return torch.stack([index % width, index // width], dim=1).float()


def sample_error_points(
    predicted: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A corrective click per mask, uniform over its error region.

    Args:
        predicted: (B, H, W) bool prediction.
        target: (B, H, W) bool ground truth, each non-empty.
        valid: (H, W) bool pixels that belong to the image (not padding); all when None.
        generator: random source.

    Returns:
        (B, 2) XY coordinates and (B,) int64 labels: 1 (foreground) on a false negative,
        0 (background) on a false positive. A mask predicted exactly gets a foreground point on
        the ground truth.
    """
    if predicted.shape != target.shape:
        raise ValueError(f"predicted {predicted.shape} and target {target.shape} differ")
    error = predicted ^ target
    if valid is not None:
        error = error & valid
    has_error = error.flatten(1).any(dim=1)
    region = torch.where(has_error[:, None, None], error, target)
    coords = sample_points(region, generator)
    x, y = coords[:, 0].long(), coords[:, 1].long()
    rows = torch.arange(target.shape[0], device=target.device)
    labels = torch.where(target[rows, y, x], LABEL_FOREGROUND, LABEL_BACKGROUND)
    return coords, labels.long()


def noisy_boxes(
    masks: torch.Tensor,
    noise: float = 0.1,
    max_noise: float = 20.0,
    limits: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Bounding boxes of (B, H, W) bool masks with Gaussian corner noise: (B, 4) XYXY.

    Each coordinate moves by N(0, ``noise`` x box side), clipped to ``max_noise`` pixels, then the
    box is clipped to ``limits`` = (H, W) of the image (default: the mask size) and kept ordered.
    """
    if not masks.flatten(1).any(dim=1).all():
        raise ValueError("cannot box an empty mask")
    height, width = limits or masks.shape[-2:]
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    arange_y = torch.arange(masks.shape[1], device=masks.device)
    arange_x = torch.arange(masks.shape[2], device=masks.device)
    y0 = torch.where(rows, arange_y, masks.shape[1]).amin(1)
    y1 = torch.where(rows, arange_y, -1).amax(1)
    x0 = torch.where(cols, arange_x, masks.shape[2]).amin(1)
    x1 = torch.where(cols, arange_x, -1).amax(1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    side = torch.stack([x1 - x0, y1 - y0, x1 - x0, y1 - y0], dim=1).float() + 1
    jitter = torch.randn(boxes.shape, generator=generator).to(masks.device) * side * noise
    boxes = boxes + jitter.clamp(-max_noise, max_noise)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    low = torch.minimum(boxes[:, :2], boxes[:, 2:])
    high = torch.maximum(boxes[:, :2], boxes[:, 2:])
    return torch.cat([low, high], dim=1)


def iteration_schedule(
    config: SimulationConfig, generator: torch.Generator | None = None
) -> list[bool]:
    """Whether each pass after the first adds a point: ``point_iterations`` True and
    ``no_point_iterations`` False, one False last and the others at random positions."""
    if config.no_point_iterations == 0:
        return [True] * config.point_iterations
    middle = [True] * config.point_iterations + [False] * (config.no_point_iterations - 1)
    order = torch.randperm(len(middle), generator=generator).tolist()
    return [middle[i] for i in order] + [False]


# ------------------------------------------------------------------------------- the passes


def simulate(
    model: Sam,
    features: torch.Tensor,
    masks: torch.Tensor,
    input_size: tuple[int, int] | None = None,
    config: SimulationConfig | None = None,
    generator: torch.Generator | None = None,
) -> SimulationResult:
    """Run the prompt simulation for B masks of one image and return the loss.

    Args:
        model: the SAM model; only its prompt encoder and mask decoder are called here.
        features: (1, C, h, w) image embedding (with or without gradient).
        masks: (B, S, S) bool ground truth in the model input frame (see ``prepare_masks``),
            each with at least one pixel inside ``input_size``.
        input_size: (H, W) of the resized image inside the padded frame; clicks stay inside it.
        config: simulation settings (SAM's by default).
        generator: CPU random source, for reproducible prompts (the same on any device).

    Returns:
        The :class:`SimulationResult`.
    """
    config = config or SimulationConfig()
    side = model.image_size
    if masks.ndim != 3 or masks.shape[1:] != (side, side):
        raise ValueError(f"masks must have shape (B, {side}, {side}), got {tuple(masks.shape)}")
    if features.ndim != 4 or features.shape[0] != 1:
        raise ValueError(f"features must have shape (1, C, h, w), got {tuple(features.shape)}")
    height, width = input_size or (side, side)
    valid = torch.zeros((side, side), dtype=torch.bool, device=masks.device)
    valid[:height, :width] = True
    masks = masks.bool() & valid
    if not masks.flatten(1).any(dim=1).all():
        raise ValueError("every mask needs at least one pixel inside the image")
    batch = masks.shape[0]
    decoder, prompt_encoder = model.mask_decoder, model.prompt_encoder
    low_side = prompt_encoder.mask_input_size[0]
    targets = low_res_targets(masks, low_side)
    pe = prompt_encoder.get_dense_pe()

    # Rows whose first prompt is a point come first; the caller's order is restored at the end.
    is_box = torch.rand(batch, generator=generator) < config.box_probability
    order = torch.argsort(is_box.to(torch.uint8), stable=True)
    masks, targets = masks[order], targets[order]
    n_point = int((~is_box).sum())
    first_points = sample_points(masks[:n_point], generator)
    boxes = noisy_boxes(
        masks[n_point:], config.box_noise, config.box_noise_max, (height, width), generator
    )
    coords = torch.zeros((batch, 0, 2), device=masks.device)
    labels = torch.zeros((batch, 0), dtype=torch.long, device=masks.device)
    mask_prompt: torch.Tensor | None = None
    single = decoder.output_indices(False)
    multi = decoder.output_indices(True)
    losses_mask, losses_iou, ious = [], [], []

    for step, add_point in enumerate([True, *iteration_schedule(config, generator)]):
        if step > 0 and add_point:
            predicted = (
                F.interpolate(mask_prompt, (side, side), mode="bilinear", align_corners=False)[:, 0]
                > 0
            )
            new_coords, new_labels = sample_error_points(predicted, masks, valid, generator)
            coords = torch.cat([coords, new_coords[:, None]], dim=1)
            labels = torch.cat([labels, new_labels[:, None]], dim=1)
        point_coords = torch.cat([first_points[:, None], coords[:n_point]], dim=1)
        point_labels = torch.cat(
            [labels.new_full((n_point, 1), LABEL_FOREGROUND), labels[:n_point]], dim=1
        )
        # Point rows carry 1 + k points + 1 padding token, box rows k points + 2 corners: the
        # same token count, so both groups share one decoder call.
        sparse = [prompt_encoder((point_coords, point_labels), None, None)[0]] if n_point else []
        if n_point < batch:
            box_points = (coords[n_point:], labels[n_point:]) if coords.shape[1] else None
            sparse.append(prompt_encoder(box_points, boxes, None)[0])
        sparse_tokens = torch.cat(sparse, dim=0)
        if mask_prompt is None:
            dense = prompt_encoder.no_mask_dense_embedding(1)
        else:
            dense = prompt_encoder(None, None, mask_prompt)[1]
        image = decoder.prepare_image(features + dense, pe)
        hs, image_tokens = decoder.run_transformer(image, sparse_tokens)
        all_outputs = single + multi
        logits = decoder.predict_masks(hs, image_tokens, image.size, all_outputs)
        predicted_iou = decoder.predict_iou(hs, all_outputs)  # (B, 4)
        expanded = targets[:, None].expand_as(logits)
        per_mask = mask_loss(logits, expanded)  # (B, 4)
        actual_iou = mask_iou(logits.detach(), expanded)
        per_iou = iou_loss(predicted_iou, actual_iou)

        if step == 0 and n_point:
            # One point is ambiguous: the best of the multimask outputs trains, all IoUs train.
            ambiguous = per_mask[:n_point, 1:].min(dim=1).values
            row_mask = torch.cat([ambiguous, per_mask[n_point:, 0]])
            row_iou = torch.cat([per_iou[:n_point, 1:].mean(dim=1), per_iou[n_point:, 0]])
            chosen = predicted_iou[:n_point, 1:].argmax(dim=1) + 1
            chosen = torch.cat([chosen, chosen.new_zeros(batch - n_point)])
        else:
            row_mask, row_iou = per_mask[:, 0], per_iou[:, 0]
            chosen = torch.zeros(batch, dtype=torch.long, device=logits.device)
        losses_mask.append(row_mask)
        losses_iou.append(row_iou)
        rows = torch.arange(batch, device=logits.device)
        mask_prompt = logits[rows, chosen][:, None].detach()
        ious.append(actual_iou[rows, chosen])

    loss_mask = torch.stack(losses_mask).mean()
    loss_iou = torch.stack(losses_iou).mean()
    restore = torch.argsort(order)
    return SimulationResult(
        loss=loss_mask + loss_iou,
        mask_loss=loss_mask.detach(),
        iou_loss=loss_iou.detach(),
        ious=torch.stack(ious)[:, restore],
    )
