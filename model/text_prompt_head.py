"""Text prompt head: CLIP's joint space to and from the model's prompts and masks.

Two maps, both trained on CLIP *image* embeddings of object crops and used with CLIP *text*
embeddings at inference, as the SAM paper trained its text prompts (CLIP aligns the two, so
what is learned on crops transfers to phrases):

- ``prompt_tokens``: a CLIP embedding -> one sparse prompt token of the mask decoder (the SAM
  paper's text prompt): ``Predictor.predict(text_embedding=...)`` draws the object a phrase
  names, alone or with points.
- ``embed_masks``: a mask's pooled features (``concept_head.mask_pooled_features``) -> a unit
  vector in CLIP's space, scored against phrases with ``sigmoid(scale * cos + bias)`` (as
  SigLIP): ``find_instances`` reports every instance of a phrase among grid candidates.

The head keeps the embedding of a fixed probe phrase under the CLIP it was trained with
(``clip_probe``), so a different CLIP given at inference is an error, not silent nonsense.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

# Cosine between the probe phrase's embeddings under two CLIP loads above which they are one
# model (fp16/bf16 and device differences stay far above; another model is far below).
SAME_ENCODER_COSINE = 0.99


class TextPromptHead(nn.Module):
    """Maps between a D-dimensional CLIP space and a SAM model's prompts and mask features.

    Attributes:
        text_dim: D, CLIP's embedding dimension.
        prompt_dim: the mask decoder's token dimension (256 for SAM).
        feature_dim: the dimension of mask features (2 x prompt_dim).
        clip_name: what CLIP it was trained with (for messages).
        threshold: the score above which ``find_instances`` reports an instance.
    """

    def __init__(
        self,
        text_dim: int,
        prompt_dim: int,
        feature_dim: int,
        hidden_dim: int = 256,
        clip_name: str = "",
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.text_dim = text_dim
        self.prompt_dim = prompt_dim
        self.feature_dim = feature_dim
        self.hidden_dim = hidden_dim
        self.clip_name = clip_name
        self.threshold = float(threshold)
        self.to_prompt = nn.Sequential(
            nn.Linear(text_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, prompt_dim)
        )
        self.to_text_space = nn.Sequential(
            nn.Linear(feature_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(hidden_dim, text_dim),
        )
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.register_buffer("clip_probe", torch.zeros(text_dim))
        self.logit_scale = nn.Parameter(torch.tensor(10.0))
        self.logit_bias = nn.Parameter(torch.tensor(-5.0))

    # ------------------------------------------------------------------------------- prompts

    def prompt_tokens(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """(K, D) CLIP embeddings -> (K, 1, prompt_dim) sparse prompt tokens."""
        self._check_text(text_embeddings)
        return self.to_prompt(F.normalize(text_embeddings.float(), dim=-1))[:, None]

    # -------------------------------------------------------------------------------- scoring

    def embed_masks(self, features: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim) mask features -> (N, D) unit vectors in CLIP's space."""
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(
                f"features must be (N, {self.feature_dim}), got {tuple(features.shape)}"
            )
        standard = (features.float() - self.feature_mean) / self.feature_std
        return F.normalize(self.to_text_space(standard), dim=-1)

    def forward(self, features: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim) mask features and (K, D) phrases -> (N, K) logits."""
        self._check_text(text_embeddings)
        texts = F.normalize(text_embeddings.float(), dim=-1)
        return self.logit_scale * self.embed_masks(features) @ texts.T + self.logit_bias

    def scores(self, features: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """(N, K) scores in [0, 1]: the sigmoid of :meth:`forward`."""
        return torch.sigmoid(self(features, text_embeddings))

    # -------------------------------------------------------------------------------- encoder

    def check_encoder(self, probe: torch.Tensor, name: str = "") -> None:
        """Raise ValueError unless ``probe`` (``ClipEncoder.probe()``) is this head's CLIP's."""
        probe = probe.to(self.clip_probe.device, torch.float32)
        if probe.shape != self.clip_probe.shape:
            raise ValueError(
                f"CLIP {name or '?'} embeds into {probe.shape[0]} dimensions; this model's text "
                f"prompts were trained with {self.clip_name or 'a CLIP'} ({self.text_dim})"
            )
        cosine = float(F.cosine_similarity(probe, self.clip_probe, dim=0))
        if cosine < SAME_ENCODER_COSINE:
            raise ValueError(
                f"CLIP {name or '?'} is not the one this model's text prompts were trained with "
                f"({self.clip_name or 'unknown'}; probe cosine {cosine:.3f})"
            )

    def _check_text(self, text_embeddings: torch.Tensor) -> None:
        if text_embeddings.ndim != 2 or text_embeddings.shape[1] != self.text_dim:
            raise ValueError(
                f"text embeddings must be (K, {self.text_dim}), got {tuple(text_embeddings.shape)}"
            )

    # ---------------------------------------------------------------------------- persistence

    def config_dict(self) -> dict[str, Any]:
        """What :meth:`from_config` needs to rebuild this head (JSON-serialisable)."""
        return {
            "text_dim": self.text_dim,
            "prompt_dim": self.prompt_dim,
            "feature_dim": self.feature_dim,
            "hidden_dim": self.hidden_dim,
            "clip_name": self.clip_name,
            "threshold": self.threshold,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TextPromptHead:
        """A head with random weights shaped as ``config`` (from :meth:`config_dict`).

        Raises:
            ValueError: a key is missing or has a wrong type.
        """
        try:
            return cls(
                text_dim=int(config["text_dim"]),
                prompt_dim=int(config["prompt_dim"]),
                feature_dim=int(config["feature_dim"]),
                hidden_dim=int(config["hidden_dim"]),
                clip_name=str(config.get("clip_name", "")),
                threshold=float(config.get("threshold", 0.5)),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"text prompt head config is malformed: {error!r}") from None
