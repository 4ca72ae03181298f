"""SAM's training losses: focal and dice on mask logits, MSE on the IoU head.

All functions take logits and targets of the same shape (..., H, W) and reduce over the last two
axes, so a (B, M, H, W) stack gives one loss per mask: (B, M).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

FOCAL_WEIGHT = 20.0  # SAM: focal : dice = 20 : 1
DICE_WEIGHT = 1.0


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape"
        )
    if logits.ndim < 2:
        raise ValueError(f"masks must have shape (..., H, W), got {tuple(logits.shape)}")


def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al.), mean over pixels: (..., H, W) -> (...)."""
    _check(logits, targets)
    targets = targets.to(logits.dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(dim=(-2, -1))


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice coefficient of sigmoid(logits): (..., H, W) -> (...)."""
    _check(logits, targets)
    prob = logits.sigmoid().flatten(-2)
    targets = targets.to(logits.dtype).flatten(-2)
    numerator = 2 * (prob * targets).sum(-1) + smooth
    denominator = prob.sum(-1) + targets.sum(-1) + smooth
    return 1 - numerator / denominator


def mask_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SAM's mask loss, 20 x focal + 1 x dice: (..., H, W) -> (...)."""
    return FOCAL_WEIGHT * focal_loss(logits, targets) + DICE_WEIGHT * dice_loss(logits, targets)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """IoU of ``logits > threshold`` with the boolean targets: (..., H, W) -> (...).

    An empty prediction of an empty target counts as IoU 1.
    """
    _check(logits, targets)
    predicted = (logits > threshold).flatten(-2)
    targets = targets.bool().flatten(-2)
    intersection = (predicted & targets).sum(-1)
    union = (predicted | targets).sum(-1)
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union).float())


def iou_loss(predicted_iou: torch.Tensor, actual_iou: torch.Tensor) -> torch.Tensor:
    """Elementwise squared error of the IoU head against the masks' actual IoU (no gradient
    through the target)."""
    return (predicted_iou - actual_iou.detach().to(predicted_iou.dtype)) ** 2
