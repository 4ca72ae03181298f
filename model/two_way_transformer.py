"""Two-way transformer of the mask decoder."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .two_way_attention_block import TwoWayAttentionBlock


class TwoWayTransformer(nn.Module):
    """Updates prompt tokens and the image embedding by attending each to the other.

    The image side is channels-last tokens (B_img, h*w, C); B_img is 1 (shared by every prompt,
    broadcast as a view) or B.
    """

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self,
        image_tokens: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        first_layer_image_projections: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
        | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_tokens: (B_img, h*w, C) image embedding, channels-last, B_img = 1 or B.
            image_pe: (1, h*w, C) its positional encoding.
            point_embedding: (B, N_tokens, C) output and prompt tokens.
            first_layer_image_projections: see ``TwoWayAttentionBlock.project_image``.

        Returns:
            tokens (B, N_tokens, C) and image tokens (B, h*w, C).
        """
        queries, keys = point_embedding, image_tokens
        for i, layer in enumerate(self.layers):
            queries, keys = layer(
                queries,
                keys,
                query_pe=point_embedding,
                key_pe=image_pe,
                image_projections=first_layer_image_projections if i == 0 else None,
            )
        attn_out = self.final_attn_token_to_image.attend_few_queries(
            queries + point_embedding, keys + image_pe, keys
        )
        queries = self.norm_final_attn(queries + attn_out)
        return queries, keys

    def project_image(
        self, image_tokens: torch.Tensor, image_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt-independent first-layer projections of (B_img, h*w, C) image tokens."""
        return self.layers[0].project_image(image_tokens, image_pe)
