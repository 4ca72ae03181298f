"""Mask decoder: prompt tokens + image embedding -> mask logits and predicted IoUs."""

from __future__ import annotations

import torch
from torch import nn

from .layer_norm_2d import LayerNorm2d
from .mlp import MLP
from .two_way_transformer import TwoWayTransformer


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
        first_layer_image_projections: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
        | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embeddings: (B_img, C, h, w), B_img = 1 (shared by all prompts) or B.
            image_pe: (1, C, h, w) positional encoding of the embedding grid.
            sparse_prompt_embeddings: (B, N, C) point and box tokens.
            dense_prompt_embeddings: (B or 1, C, h, w) mask-prompt embedding.
            multimask_output: return the 3 ambiguity-aware masks instead of the single one.
            first_layer_image_projections: optional cache from
                ``TwoWayTransformer.project_image(image_embeddings + dense, image_pe)``; only
                valid when the dense embedding is the same for every prompt (no mask prompt).

        Returns:
            masks (B, M, 4h, 4w) logits and iou_pred (B, M), M = 3 if multimask_output else 1.
        """
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat(
            [output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings], dim=1
        )
        src = image_embeddings + dense_prompt_embeddings
        b_img, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe, tokens, first_layer_image_projections)
        iou_token_out = hs[:, 0, :]
        selected = range(1, self.num_mask_tokens) if multimask_output else range(0, 1)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(-1, c, h, w))
        hyper_in = torch.stack(
            [self.output_hypernetworks_mlps[i](hs[:, 1 + i, :]) for i in selected], dim=1
        )
        b, c_up, h_up, w_up = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c_up, h_up * w_up)).reshape(b, -1, h_up, w_up)
        iou_pred = self.iou_prediction_head(iou_token_out)[:, list(selected)]
        return masks, iou_pred
