"""Random-Fourier-feature positional encoding."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingRandom(nn.Module):
    """Encodes normalised (x, y) positions with a fixed random Gaussian projection.

    The encoding of a position p in [0, 1]^2 is ``[sin(2π(2p-1)G), cos(2π(2p-1)G)]``, with G a
    (2, num_pos_feats) matrix, so it has ``2 * num_pos_feats`` channels.
    """

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats))
        )

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 2) positions in [0, 1], XY order -> (..., 2 * num_pos_feats)."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of every cell centre of an (H, W) grid: (C, H, W)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        y_embed = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        x_embed = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([x_embed[None, :].expand(h, w), y_embed[:, None].expand(h, w)], dim=-1)
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(
        self, coords_input: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """(B, N, 2) XY pixel positions in an image of size (H, W) -> (B, N, C)."""
        h, w = image_size
        scale = coords_input.new_tensor([1.0 / w, 1.0 / h])
        return self._pe_encoding(coords_input.float() * scale)
