"""Mask decoder: prompt tokens + image embedding -> mask logits and predicted IoUs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .layer_norm_2d import LayerNorm2d
from .mlp import MLP
from .two_way_transformer import TwoWayTransformer


@dataclass
class DecoderImage:
    """The image side of the decoder, prepared once and shared by any number of prompts.

    Attributes:
        tokens: (B_img, h*w, C) image embedding plus dense prompt embedding, channels-last.
        pe: (1, h*w, C) positional encoding of the grid.
        size: (h, w).
        projections: first-layer image projections (see ``TwoWayAttentionBlock.project_image``).
    """

    tokens: torch.Tensor
    pe: torch.Tensor
    size: tuple[int, int]
    projections: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class MaskDecoder(nn.Module):
    """Predicts masks from an image embedding and prompt embeddings.

    One IoU token and ``1 + num_multimask_outputs`` mask tokens are prepended to the prompt
    tokens; after the two-way transformer each mask token drives a hypernetwork MLP whose output is
    dotted with the 4x upscaled image embedding. Mask 0 is the single-mask output used with
    unambiguous prompts, masks 1..3 the ambiguity-aware ones.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """segment-anything's call signature.

        Args:
            image_embeddings: (B_img, C, h, w), B_img = 1 (shared by all prompts) or B.
            image_pe: (1, C, h, w) positional encoding of the embedding grid.
            sparse_prompt_embeddings: (B, N, C) point and box tokens.
            dense_prompt_embeddings: (B or 1, C, h, w) mask-prompt embedding.
            multimask_output: return the 3 ambiguity-aware masks instead of the single one.

        Returns:
            masks (B, M, 4h, 4w) logits and iou_pred (B, M), M = 3 if multimask_output else 1.
        """
        image = self.prepare_image(image_embeddings + dense_prompt_embeddings, image_pe)
        return self.decode(image, sparse_prompt_embeddings, multimask_output)

    def prepare_image(self, src: torch.Tensor, image_pe: torch.Tensor) -> DecoderImage:
        """Prompt-independent work on (B_img, C, h, w) image + dense embeddings and the
        (1, C, h, w) positional encoding. Reusable for every prompt whose dense embedding is
        the same (prompts without a mask)."""
        h, w = src.shape[-2:]
        # Contiguous channels-last once, so no later op copies a transposed view.
        tokens = src.flatten(2).transpose(1, 2).contiguous()
        pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        projections = self.transformer.project_image(tokens, pe)
        return DecoderImage(tokens, pe, (h, w), projections)

    def decode(
        self, image: DecoderImage, sparse_prompt_embeddings: torch.Tensor, multimask_output: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks and IoUs for (B, N, C) prompt tokens on a prepared image; see ``forward``."""
        hs, image_tokens = self.run_transformer(image, sparse_prompt_embeddings)
        selected = self.output_indices(multimask_output)
        masks = self.predict_masks(hs, image_tokens, image.size, selected)
        return masks, self.predict_iou(hs, selected)

    def output_indices(self, multimask_output: bool) -> list[int]:
        """Mask outputs returned: 1..3 (ambiguity-aware) or 0 (single)."""
        return list(range(1, self.num_mask_tokens)) if multimask_output else [0]

    def run_transformer(
        self, image: DecoderImage, sparse_prompt_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-way transformer on the output tokens + (B, N, C) prompt tokens.

        Returns:
            tokens (B, 1 + num_mask_tokens + N, C) — IoU token first, then the mask tokens —
            and image tokens (B, h*w, C).
        """
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat(
            [output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings], dim=1
        )
        return self.transformer(image.tokens, image.pe, tokens, image.projections)

    def predict_iou(self, hs: torch.Tensor, selected: list[int]) -> torch.Tensor:
        """(B, len(selected)) predicted IoUs from the transformer's tokens."""
        return self.iou_prediction_head(hs[:, 0, :])[:, selected]

    def predict_masks(
        self,
        hs: torch.Tensor,
        image_tokens: torch.Tensor,
        size: tuple[int, int],
        selected: list[int],
    ) -> torch.Tensor:
        """(B, len(selected), 4h, 4w) mask logits from the transformer's outputs."""
        hyper_in = torch.stack(
            [self.output_hypernetworks_mlps[i](hs[:, 1 + i, :]) for i in selected], dim=1
        )
        return self.upscale_and_predict(image_tokens, size, hyper_in)

    def upscale_and_predict(
        self, image_tokens: torch.Tensor, size: tuple[int, int], hyper_in: torch.Tensor
    ) -> torch.Tensor:
        """``output_upscaling`` followed by the hypernetwork dot product, channels-last.

        The two stride-2, kernel-2 transposed convolutions are per-pixel linear maps to 2x2
        sub-pixels, so they run as matmuls on the (B, h*w, C) tokens the transformer returns —
        no NCHW transposes, and LayerNorm2d becomes a plain layer norm over the last axis. Same
        weights and result as applying ``output_upscaling`` to the NCHW map.

        Args:
            image_tokens: (B, h*w, C) image embedding after the transformer.
            size: (h, w).
            hyper_in: (B, M, C / 8) hypernetwork outputs, one per returned mask.

        Returns:
            (B, M, 4h, 4w) mask logits.
        """
        up1, norm, act1, up2, act2 = self.output_upscaling
        batch, tokens, channels = image_tokens.shape
        h, w = size
        mid, out = up1.weight.shape[1], up2.weight.shape[1]
        # ConvTranspose2d weight (C_in, C_out, 2, 2) -> (C_in, [di, dj, C_out])
        x = torch.addmm(
            up1.bias.repeat(4),
            image_tokens.reshape(-1, channels),
            up1.weight.permute(0, 2, 3, 1).reshape(channels, 4 * mid),
        )
        x = act1(
            F.layer_norm(x.view(batch, tokens, 4, mid), (mid,), norm.weight, norm.bias, norm.eps)
        )
        x = torch.addmm(
            up2.bias.repeat(4),
            x.reshape(-1, mid),
            up2.weight.permute(0, 2, 3, 1).reshape(mid, 4 * out),
        )
        x = act2(x)
        masks = x.reshape(batch, tokens * 16, out) @ hyper_in.transpose(1, 2)  # (B, h*w*16, M)
        # Axes: pixel (i, j), first sub-pixel (di, dj), second sub-pixel (ei, ej), mask m;
        # output row 4i + 2di + ei, column 4j + 2dj + ej.
        masks = masks.view(batch, h, w, 2, 2, 2, 2, -1).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return masks.reshape(batch, -1, 4 * h, 4 * w)
