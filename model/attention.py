"""Multi-head attention between token sets, with an optional downscaled internal width."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Attention(nn.Module):
    """Attention of queries (B, N_q, C) over keys / values (B, N_k, C); returns (B, N_q, C).

    Queries, keys and values are projected to ``C / downsample_rate`` channels before the heads are
    split, which keeps the token-image cross attention of the mask decoder cheap.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(
                f"internal dim {self.internal_dim} is not divisible by num_heads {num_heads}"
            )
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, internal_dim) -> (B, heads, N, internal_dim / heads)."""
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention on already projected, head-split q, k, v; returns (B, N_q, C)."""
        out = F.scaled_dot_product_attention(q, k, v)
        b, heads, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, heads * d))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attend(
            self.split_heads(self.q_proj(q)),
            self.split_heads(self.k_proj(k)),
            self.split_heads(self.v_proj(v)),
        )

    # The mask decoder's cross attentions pair a few prompt tokens (~7) with thousands of image
    # tokens. Projecting every image token (N x C x C/2 multiply-adds per projection) costs more
    # than folding the projection into the few tokens instead, which is exact algebra:
    #   q_h . (W_k,h x + b_k,h) = (W_k,h^T q_h) . x + q_h . b_k,h
    #   sum_j a_j (W_v,h x_j + b_v,h) = W_v,h (sum_j a_j x_j) + b_v,h    (attention rows sum to 1)

    def attend_few_queries(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``forward`` for few queries (B, N_q, C) over many keys / values (B, N_k, C).

        The key projection is folded into the queries (its bias adds a constant per query row,
        which softmax ignores) and the value projection applied after attention, so the N_k
        image tokens are never projected.
        """
        batch, n_q, _ = q.shape
        heads = self.num_heads
        head_dim = self.internal_dim // heads
        q_heads = self.q_proj(q).view(batch, n_q, heads, head_dim)
        w_k = self.k_proj.weight.view(heads, head_dim, -1)  # (heads, d, C)
        q_image = torch.einsum("bnhd,hdc->bhnc", q_heads, w_k).reshape(batch, 1, heads * n_q, -1)
        context = F.scaled_dot_product_attention(
            q_image, k.unsqueeze(1), v.unsqueeze(1), scale=head_dim**-0.5
        )  # (B, 1, heads * N_q, C)
        w_v = self.v_proj.weight.view(heads, head_dim, -1)
        out = torch.einsum("bhnc,hdc->bnhd", context.view(batch, heads, n_q, -1), w_v)
        out = out + self.v_proj.bias.view(heads, head_dim)
        return self.out_proj(out.reshape(batch, n_q, self.internal_dim))

    def attend_few_keys(
        self,
        q: torch.Tensor | None,
        k: torch.Tensor,
        v: torch.Tensor,
        q_heads: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``forward`` for many queries (B, N_q, C) over few keys / values (B, N_k, C).

        The query projection is folded into the keys (its bias becomes a per-key bias) and the
        output projection into the values, so the N_q image tokens are multiplied only by the
        few (heads * N_k) folded keys and values. ``q_heads`` (1 or B, heads, N_q, d), already
        projected queries, replaces ``q`` when given (a per-image cache).
        """
        batch, n_k, _ = k.shape
        heads = self.num_heads
        head_dim = self.internal_dim // heads
        scale = head_dim**-0.5
        k_heads = self.k_proj(k).view(batch, n_k, heads, head_dim) * scale
        v_heads = self.v_proj(v).view(batch, n_k, heads, head_dim)
        # Scores are laid out (B, N_q, N_k, heads): softmax over N_k then runs along a strided
        # axis with the heads contiguous, several times faster on CPU than over a last axis of ~7.
        if q_heads is None:
            w_q = self.q_proj.weight.view(heads, head_dim, -1)  # (heads, d, C)
            k_image = torch.einsum("bkhd,hdc->bkhc", k_heads, w_q).reshape(batch, n_k * heads, -1)
            k_bias = torch.einsum("bkhd,hd->bkh", k_heads, self.q_proj.bias.view(heads, head_dim))
            scores = torch.baddbmm(
                k_bias.reshape(batch, 1, n_k * heads), q, k_image.transpose(1, 2)
            )  # (B, N_q, N_k * heads)
            n_q = q.shape[1]
        else:
            n_q = q_heads.shape[2]
            scores = q_heads @ k_heads.permute(0, 2, 3, 1)  # (B, heads, N_q, N_k)
            scores = scores.permute(0, 2, 3, 1)
        attn = scores.reshape(batch, n_q, n_k, heads).softmax(dim=2)
        w_out = self.out_proj.weight.view(-1, heads, head_dim)  # (C, heads, d)
        v_image = torch.einsum("bkhd,chd->bkhc", v_heads, w_out)
        # Each head's attention sums to 1, so the output bias is added exactly by adding
        # bias / heads to every folded value.
        v_image = (v_image + self.out_proj.bias / heads).reshape(batch, n_k * heads, -1)
        return attn.view(batch, n_q, n_k * heads) @ v_image
