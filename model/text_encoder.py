"""Text encoders: phrases -> unit vectors in a space where masks can be scored against them.

Two implementations share :class:`TextEncoder`'s one method, ``encode_text``:

- :class:`~maskmill.model.concept_head.ConceptHead`: the concepts a store's people labelled,
  learned during the engine's retrain; it knows its own names and nothing else.
- :class:`ClipEncoder`: CLIP through ``open_clip`` (``pip install 'maskmill[clip]'``), open
  vocabulary. maskmill never downloads weights: the user names a model and a weights file
  (``ViT-B-32`` + ``open_clip_pytorch_model.bin``) or a folder in Hugging Face's layout
  (``local-dir:/path/to/folder`` holding ``open_clip_config.json`` and the weights), e.g. one
  fetched once with ``huggingface-cli download laion/CLIP-ViT-B-32-laion2B-s34B-b79K``.

A model's :class:`~maskmill.model.text_prompt_head.TextPromptHead` maps its own mask features and
prompt tokens to and from one CLIP space; :meth:`ClipEncoder.probe` lets it check that the
encoder it is given is the one it was trained with.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

# The phrase whose embedding identifies a CLIP text space (see ``TextPromptHead.check_encoder``).
PROBE_TEXT = "a photo of an object"
LOCAL_DIR = "local-dir:"


class TextEncoder(ABC):
    """Phrases -> (K, D) unit vectors."""

    @abstractmethod
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(K, D) float32 unit vectors, one per phrase, in order."""


class ClipEncoderError(ValueError):
    """A CLIP model that cannot be used as given (missing extra, weights, or a download)."""


class ClipEncoder(TextEncoder):
    """An ``open_clip`` model, frozen: text phrases and image crops into its joint space.

    Build it with :meth:`load`; ``name`` says what was loaded (for messages and metadata).
    """

    def __init__(self, model: Any, tokenizer: Any, preprocess: Any, name: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.name = name

    @classmethod
    def load(
        cls,
        model: str,
        weights: str | None = None,
        device: str | torch.device = "cpu",
        random_weights: bool = False,
    ) -> ClipEncoder:
        """Load a CLIP model from local files only.

        Args:
            model: an open_clip model name (``ViT-B-32``; ``open_clip.list_models()``) or
                ``local-dir:/folder`` with ``open_clip_config.json`` and a weights file.
            weights: the weights file for a named model (a ``.bin``, ``.pt`` or
                ``.safetensors`` of open_clip's state dict); unused with ``local-dir:``.
            device: where the model runs.
            random_weights: build the architecture with random weights (tests only).

        Raises:
            ClipEncoderError: open_clip is not installed, a file is missing, the name is unknown
                or would need a download (``hf-hub:``, a pretrained tag).
        """
        try:
            import open_clip
        except ImportError:
            raise ClipEncoderError(
                "CLIP text prompts need open_clip: pip install 'maskmill[clip]'"
            ) from None
        if model.startswith("hf-hub:"):
            raise ClipEncoderError(
                f"{model}: maskmill does not download weights; fetch the repository once "
                "(huggingface-cli download ...) and pass local-dir:/path/to/it"
            )
        name = model
        pretrained = None
        if model.startswith(LOCAL_DIR):
            folder = Path(model[len(LOCAL_DIR) :]).expanduser()
            if not (folder / "open_clip_config.json").is_file():
                raise ClipEncoderError(f"{folder}: no open_clip_config.json in this folder")
            model = f"{LOCAL_DIR}{folder}"
            name = folder.name
        else:
            if model not in open_clip.list_models():
                raise ClipEncoderError(
                    f"unknown open_clip model {model!r}; see open_clip.list_models(), or pass "
                    "local-dir:/folder"
                )
            if weights is not None:
                path = Path(weights).expanduser()
                if not path.is_file():
                    raise ClipEncoderError(
                        f"{weights}: no such CLIP weights file (maskmill does not download: a "
                        "pretrained tag is not a file)"
                    )
                pretrained = str(path)
                name = f"{model} ({path.name})"
            elif not random_weights:
                raise ClipEncoderError(
                    f"{model}: give its weights file (--clip-weights FILE); maskmill does not "
                    "download them"
                )
        clip, _, preprocess = open_clip.create_model_and_transforms(
            model,
            pretrained=pretrained,
            load_weights=not random_weights,
            device=device,
            pretrained_image=False,
            pretrained_text=False,
        )
        return cls(clip, open_clip.get_tokenizer(model), preprocess, name)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        """D, the dimension of the joint space."""
        return int(self.encode_text([PROBE_TEXT]).shape[1])

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(K, D) float32 unit vectors of the phrases."""
        if isinstance(texts, str) or not texts:
            raise ValueError("encode_text takes a non-empty list of phrases")
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()

    @torch.inference_mode()
    def encode_crops(self, crops: Sequence[np.ndarray], batch_size: int = 32) -> torch.Tensor:
        """(N, D) float32 unit vectors of (h, w, 3) uint8 RGB image crops, through the model's
        own preprocessing (resize, centre crop, normalise)."""
        from PIL import Image

        out = []
        for start in range(0, len(crops), batch_size):
            batch = torch.stack(
                [self.preprocess(Image.fromarray(c)) for c in crops[start : start + batch_size]]
            ).to(self.device)
            out.append(F.normalize(self.model.encode_image(batch).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros((0, self.dim))

    def probe(self) -> torch.Tensor:
        """(D,) embedding of :data:`PROBE_TEXT`: what identifies this text space."""
        return self.encode_text([PROBE_TEXT])[0]
