"""Concept head: scores mask candidates against named concepts ("hazelnut", "car").

SAM's mask decoder is class-agnostic. The concept head adds what a labelled dataset needs: given
the image embedding and a candidate mask, how well the mask is an instance of each concept. It
works on the model's own features (the image embedding pooled inside the mask and in a ring
around it, :func:`mask_pooled_features`), so it costs nothing beyond the image encoder that
prompting already ran, and it is trained from the categories people gave masks in a store (see
``engine/training/concepts.py``).

Scores are independent per concept (a sigmoid of a scaled cosine, as SigLIP does), so a mask
can be an instance of no concept at all (background, a part, two objects at once) and a
vocabulary can grow without the scores of the other concepts changing meaning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .text_encoder import TextEncoder

# Ring of context around a mask, in embedding cells (one cell = patch_size input pixels).
CONTEXT_CELLS = 2


def mask_pooled_features(
    image_features: torch.Tensor,
    masks: torch.Tensor,
    input_size: tuple[int, int],
    image_size: int,
) -> torch.Tensor:
    """The image embedding averaged inside each mask and in a ring around it.

    Args:
        image_features: (1, C, h, w) image embedding (``Predictor.get_image_embedding()``).
        masks: (N, H, W) bool or float masks on the original image, (H, W) its size.
        input_size: (H_in, W_in) of the resized image inside the padded model input.
        image_size: side S of the square model input the embedding covers.

    Returns:
        (N, 2C) float32: C channels averaged inside the mask, then C averaged over the ring of
        ``CONTEXT_CELLS`` cells just outside it (zeros where a mask has no ring).
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {tuple(masks.shape)}")
    features = image_features[0].float()
    channels, grid_h, grid_w = features.shape
    if masks.shape[0] == 0:
        return features.new_zeros((0, 2 * channels))
    weights = masks.to(features.device, torch.float32)[:, None]
    # Original image -> resized input -> padded S x S input -> embedding grid: the mask's share
    # of each cell.
    weights = F.interpolate(weights, size=tuple(input_size), mode="area")
    weights = F.pad(weights, (0, image_size - input_size[1], 0, image_size - input_size[0]))
    weights = F.adaptive_avg_pool2d(weights, (grid_h, grid_w))[:, 0]  # (N, h, w)
    kernel = 2 * CONTEXT_CELLS + 1
    grown = F.max_pool2d(weights[:, None], kernel, stride=1, padding=CONTEXT_CELLS)[:, 0]
    ring = (grown - weights).clamp_min(0)
    flat = features.flatten(1).T  # (h*w, C)

    def average(w: torch.Tensor) -> torch.Tensor:
        w = w.flatten(1)
        return (w @ flat) / w.sum(1, keepdim=True).clamp_min(1e-6)

    return torch.cat([average(weights), average(ring)], dim=1)


class UnknownConceptError(ValueError, KeyError):
    """A concept name a concept head does not know (a ``KeyError`` and a ``ValueError``: bad
    input, reported as one line by the CLI)."""

    def __str__(self) -> str:  # KeyError's own would quote the message
        return str(self.args[0]) if self.args else ""


def concept_key(name: str) -> str:
    """How concept names compare: case-folded, inner whitespace collapsed ("Hazel  nut" and
    "hazel nut" are one concept)."""
    return " ".join(str(name).split()).casefold()


class ConceptHead(nn.Module, TextEncoder):
    """Scores (N, feature_dim) mask features against K learned concepts.

    As a :class:`~maskmill.model.text_encoder.TextEncoder` it knows its own names only.

    ``features -> standardise -> MLP -> unit vector z``; concept k has a learned unit vector
    ``e_k``; ``logit = scale * <z, e_k> + bias`` and the score is its sigmoid.

    Attributes:
        names: the K concept names, in the order of the logits' columns.
        category_ids: a category id per name (the store's), or None.
        threshold: the score above which ``Predictor.predict_concept`` reports an instance
            (chosen when the head is trained).
    """

    def __init__(
        self,
        feature_dim: int,
        names: Sequence[str],
        embed_dim: int = 64,
        hidden_dim: int = 256,
        category_ids: Sequence[int | None] | None = None,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        names = [str(n).strip() for n in names]
        if not names:
            raise ValueError("a concept head needs at least one concept name")
        keys = [concept_key(n) for n in names]
        if len(set(keys)) != len(keys) or not all(keys):
            raise ValueError(f"concept names must be distinct and non-empty, got {names}")
        if category_ids is not None and len(category_ids) != len(names):
            raise ValueError(f"{len(category_ids)} category ids for {len(names)} concept names")
        self.feature_dim = feature_dim
        self.embed_dim = embed_dim
        self.hidden_dim = hidden_dim
        self.names = names
        self.category_ids = list(category_ids) if category_ids is not None else [None] * len(names)
        self.threshold = float(threshold)
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.mlp = nn.Sequential(
            nn.Linear(feature_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(hidden_dim, embed_dim),
        )
        generator = torch.Generator().manual_seed(0)
        self.concepts = nn.Parameter(torch.randn(len(names), embed_dim, generator=generator) * 0.1)
        self.logit_scale = nn.Parameter(torch.tensor(10.0))
        self.logit_bias = nn.Parameter(torch.tensor(-5.0))

    # ------------------------------------------------------------------------------ concepts

    def index(self, name: str) -> int:
        """Column of concept ``name`` (compared by :func:`concept_key`).

        Raises:
            UnknownConceptError: naming the concept and the ones this head knows.
        """
        key = concept_key(name)
        for i, known in enumerate(self.names):
            if concept_key(known) == key:
                return i
        raise UnknownConceptError(
            f"unknown concept {name!r}; this model knows {', '.join(map(repr, self.names))}"
        )

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(K, embed_dim) unit concept vectors of known names.

        Raises:
            UnknownConceptError: a name this head does not know.
        """
        rows = [self.index(text) for text in texts]
        return F.normalize(self.concepts[rows].detach(), dim=1)

    # ------------------------------------------------------------------------------- scoring

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim) mask features -> (N, embed_dim) unit vectors."""
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(
                f"features must be (N, {self.feature_dim}), got {tuple(features.shape)}"
            )
        standard = (features - self.feature_mean) / self.feature_std
        return F.normalize(self.mlp(standard), dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim) mask features -> (N, K) logits, one column per concept."""
        concepts = F.normalize(self.concepts, dim=1)
        return self.logit_scale * self.embed(features) @ concepts.T + self.logit_bias

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(N, K) scores in [0, 1]: the sigmoid of :meth:`forward`."""
        return torch.sigmoid(self(features))

    # --------------------------------------------------------------------------- persistence

    def config_dict(self) -> dict[str, Any]:
        """What :meth:`from_config` needs to rebuild this head (JSON-serialisable)."""
        return {
            "feature_dim": self.feature_dim,
            "embed_dim": self.embed_dim,
            "hidden_dim": self.hidden_dim,
            "names": list(self.names),
            "category_ids": list(self.category_ids),
            "threshold": self.threshold,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ConceptHead:
        """A head with random weights shaped as ``config`` (from :meth:`config_dict`).

        Raises:
            ValueError: a key is missing or has a wrong type.
        """
        try:
            return cls(
                feature_dim=int(config["feature_dim"]),
                names=list(config["names"]),
                embed_dim=int(config["embed_dim"]),
                hidden_dim=int(config["hidden_dim"]),
                category_ids=config.get("category_ids"),
                threshold=float(config.get("threshold", 0.5)),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"concept head config is malformed: {error!r}") from None
