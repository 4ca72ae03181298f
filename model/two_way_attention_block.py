"""One layer of the two-way transformer: tokens attend to the image and the image to tokens."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .mlp_block import MLPBlock


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of the sparse tokens, token-to-image cross attention, an MLP on the tokens,
    and image-to-token cross attention.

    Shapes: queries (B, N_tokens, C), keys (B, h*w, C); the positional encodings have the same
    shapes and are re-added before every attention.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        image_projections: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            queries, keys, query_pe, key_pe: as in the class docstring.
            image_projections: optional head-split (k, v, q) projections of the image side for the
                two cross attentions — ``k_proj(keys + key_pe)``, ``v_proj(keys)`` of the
                token-to-image attention and ``q_proj(keys + key_pe)`` of the image-to-token one —
                computed once per image and reused across prompts (the keys do not depend on the
                prompt before the first layer's image update). Their batch axis may be 1.
        """
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        keys_pe = image_q_heads = None
        if image_projections is None:
            keys_pe = keys + key_pe
            attn_out = t2i.attend_few_queries(queries + query_pe, keys_pe, keys)
        else:
            # The image side is shared by every prompt (batch 1): broadcast it as a view.
            batch = queries.shape[0]
            k_heads, v_heads, image_q_heads = image_projections
            q_heads = t2i.split_heads(t2i.q_proj(queries + query_pe))
            attn_out = t2i.attend(
                q_heads, k_heads.expand(batch, -1, -1, -1), v_heads.expand(batch, -1, -1, -1)
            )
        queries = self.norm2(queries + attn_out)
        queries = self.norm3(queries + self.mlp(queries))
        attn_out = i2t.attend_few_keys(keys_pe, queries + query_pe, queries, q_heads=image_q_heads)
        keys = self.norm4(keys + attn_out)
        return queries, keys

    def project_image(
        self, keys: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompt-independent image projections ``forward`` accepts as ``image_projections``."""
        keys_pe = keys + key_pe
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        return (
            t2i.split_heads(t2i.k_proj(keys_pe)),
            t2i.split_heads(t2i.v_proj(keys)),
            i2t.split_heads(i2t.q_proj(keys_pe)),
        )
