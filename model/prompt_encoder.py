"""Prompt encoder: points and boxes to sparse tokens, a mask prompt to a dense embedding."""

from __future__ import annotations

import torch
from torch import nn

from .layer_norm_2d import LayerNorm2d
from .position_embedding_random import PositionEmbeddingRandom

# Point labels understood by the encoder. -1 marks padding ("not a point").
LABEL_PAD = -1
LABEL_BACKGROUND = 0
LABEL_FOREGROUND = 1


class PromptEncoder(nn.Module):
    """Encodes prompts for the mask decoder.

    Points are XY pixel coordinates in the resized, unpadded model input (``input_image_size`` is
    its padded (H, W)); boxes are XYXY in the same frame; a mask prompt is (B, 1, 4h, 4w) logits,
    where (h, w) is ``image_embedding_size``.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: background point, 1: foreground point, 2: box top-left, 3: box bottom-right.
        self.num_point_embeddings = 4
        self.point_embeddings = nn.ModuleList(
            nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings)
        )
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid: (1, embed_dim, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """(B, N, 2) XY points and (B, N) labels -> (B, N (+1 if pad), embed_dim)."""
        points = points + 0.5  # pixel centres
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), LABEL_PAD)], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        # Each label selects its learned embedding; padding also drops the positional part.
        embedding = torch.where(labels == LABEL_PAD, self.not_a_point_embed.weight, embedding)
        embedding = embedding + torch.where(
            labels == LABEL_BACKGROUND, self.point_embeddings[0].weight, 0.0
        )
        embedding = embedding + torch.where(
            labels == LABEL_FOREGROUND, self.point_embeddings[1].weight, 0.0
        )
        return embedding

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 4) XYXY boxes -> (B, 2, embed_dim) corner tokens."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        embedding = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_weights = torch.cat(
            [self.point_embeddings[2].weight, self.point_embeddings[3].weight]
        )
        return embedding + corner_weights

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, 1, 4h, 4w) mask logits -> (B, embed_dim, h, w)."""
        return self.mask_downscaling(masks)

    def no_mask_dense_embedding(self, batch_size: int) -> torch.Tensor:
        """Dense embedding used when there is no mask prompt: (B, embed_dim, h, w)."""
        h, w = self.image_embedding_size
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch_size, -1, h, w)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a batch of prompts; any of them may be None but not all.

        Args:
            points: (B, N, 2) XY coordinates and (B, N) labels (1 fg, 0 bg, -1 padding).
            boxes: (B, 4) XYXY boxes.
            masks: (B, 1, 4h, 4w) mask logits.

        Returns:
            sparse (B, N_tokens, embed_dim) and dense (B, embed_dim, h, w) embeddings.
        """
        if points is not None:
            batch_size = points[0].shape[0]
        elif boxes is not None:
            batch_size = boxes.shape[0]
        elif masks is not None:
            batch_size = masks.shape[0]
        else:
            batch_size = 1
        tokens = []
        if points is not None:
            coords, labels = points
            tokens.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            tokens.append(self._embed_boxes(boxes))
        if tokens:
            sparse = torch.cat(tokens, dim=1)
        else:
            sparse = self.not_a_point_embed.weight.new_empty((batch_size, 0, self.embed_dim))
        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            dense = self.no_mask_dense_embedding(batch_size)
        return sparse, dense
