"""The Segment Anything model: image encoder, prompt encoder and mask decoder."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .concept_head import ConceptHead
from .config import SamConfig
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(nn.Module):
    """SAM: ``image_encoder`` (run once per image), ``prompt_encoder`` and ``mask_decoder``
    (run once per prompt), and optionally a ``concept_head`` that names what a mask is.
    State-dict keys are segment-anything's, so official checkpoints load strictly (checkpoints
    keep the concept head apart). ``config`` holds the hyperparameters the model was built with.
    """

    mask_threshold: float = 0.0

    def __init__(
        self,
        config: SamConfig,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
    ) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # Not persistent: official checkpoints do not store them.
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)
        # Scores masks against named concepts; None until a store's categories trained one
        # (not part of the official state dict: checkpoints keep it apart).
        self.concept_head: ConceptHead | None = None

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def image_size(self) -> int:
        """Side of the square model input in pixels."""
        return self.image_encoder.img_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise (B, 3, H, W) RGB images in [0, 255] and zero-pad them bottom-right to
        (B, 3, S, S), S = ``image_size``. H and W must not exceed S."""
        images = (images - self.pixel_mean) / self.pixel_std
        h, w = images.shape[-2:]
        return F.pad(images, (0, self.image_size - w, 0, self.image_size - h))

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> torch.Tensor:
        """Upscale low-resolution logits to the original image, removing the padding.

        Args:
            masks: (B, M, h, w) logits on the padded model input grid (h = w = S / 4).
            input_size: (H, W) of the resized image before padding.
            original_size: (H, W) of the image given by the user.

        Returns:
            (B, M, H_orig, W_orig) logits.
        """
        masks = F.interpolate(
            masks, (self.image_size, self.image_size), mode="bilinear", align_corners=False
        )
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)
