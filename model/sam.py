"""The Segment Anything model: image encoder, prompt encoder and mask decoder."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn
from torch.nn import functional as F

from .concept_head import ConceptHead
from .config import SamConfig
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .text_prompt_head import TextPromptHead

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(nn.Module):
    """SAM: ``image_encoder`` (run once per image), ``prompt_encoder`` and ``mask_decoder``
    (run once per prompt), and optionally a ``concept_head`` that names what a mask is and a
    ``text_head`` that turns CLIP embeddings of phrases into prompts.
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
        # CLIP text prompts (model/text_prompt_head.py); None until trained with a CLIP.
        self.text_head: TextPromptHead | None = None

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


# The config fields that shape the image embedding (the rest are the decoder's).
ENCODER_CONFIG_FIELDS = (
    "encoder_embed_dim",
    "encoder_depth",
    "encoder_num_heads",
    "encoder_global_attn_indexes",
    "encoder_mlp_ratio",
    "image_size",
    "patch_size",
    "window_size",
    "prompt_embed_dim",
)


def encoder_digest(model: Sam) -> str:
    """SHA-256 (64 hex digits) of everything that decides ``model``'s image embeddings: the
    image encoder's state-dict tensors in key order (name, dtype, shape and bytes of each), the
    encoder's config fields (:data:`ENCODER_CONFIG_FIELDS`) and the pixel mean and std.

    The prompt encoder, mask decoder and concept head do not enter it: a retrain that leaves
    the encoder frozen keeps the digest, one that trains it changes it. Pure: reads the
    weights, changes nothing; about a second per GB of encoder weights on a CPU.
    """
    config = model.config
    header = {
        "config": {name: getattr(config, name) for name in ENCODER_CONFIG_FIELDS},
        "pixel_mean": model.pixel_mean.flatten().tolist(),
        "pixel_std": model.pixel_std.flatten().tolist(),
    }
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, default=list).encode())
    state = model.image_encoder.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # Raw bytes of any dtype (bfloat16 has no numpy twin): a uint8 view, no copy.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()
