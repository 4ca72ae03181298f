"""Predictor: segment-anything's ``set_image`` / ``predict`` contract, plus batched paths."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import torch

from .mask_decoder import DecoderImage
from .sam import Sam
from .text_encoder import TextEncoder
from .transforms import resize_longest_side, scale_coords, to_rgb_uint8

# What the image encoder computes in: the model's own dtype, or torch.autocast to bf16 / fp16.
EncoderPrecision = Literal["fp32", "bf16", "fp16"]
ENCODER_PRECISIONS: tuple[str, ...] = get_args(EncoderPrecision)
_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def encoder_autocast_dtype(precision: str) -> torch.dtype | None:
    """The ``torch.autocast`` dtype of an encoder precision (``"fp32"``: None, no autocast);
    an unknown name is a ValueError that lists the known ones."""
    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(
            f"encoder precision must be one of {', '.join(ENCODER_PRECISIONS)}, got {precision!r}"
        )
    return _AUTOCAST_DTYPES[precision]


@dataclass
class ImageEmbedding:
    """An encoded image, ready for any number of prompts.

    Attributes:
        features: (1, C, h, w) image embedding.
        original_size: (H, W) of the user's image.
        input_size: (H, W) of the resized image inside the padded model input.
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    # The decoder's image side for prompts without a mask, prepared on first use.
    _decoder_image: DecoderImage | None = field(default=None, repr=False)


class Predictor:
    """Computes the image embedding once, then masks for any prompts on that image.

    Coordinates are XY pixels of the original image; boxes are XYXY; sizes are (H, W).

    ``encoder_precision`` ``"bf16"`` or ``"fp16"`` runs the image encoder, most of the cost,
    under ``torch.autocast`` in that dtype on the model's device (bf16 on a GPU, or on a CPU
    with bf16 units); the embedding is handed on in the model's own dtype, so prompts, the
    decoder and everything downstream are unchanged. ``"fp32"`` (the default) encodes in the
    model's dtype.
    """

    def __init__(self, model: Sam, encoder_precision: EncoderPrecision = "fp32") -> None:
        encoder_autocast_dtype(encoder_precision)  # an unknown name is refused here
        self.encoder_precision = encoder_precision
        self.model = model
        self._embedding: ImageEmbedding | None = None

    # ----------------------------------------------------------------------------------- images

    @property
    def is_image_set(self) -> bool:
        return self._embedding is not None

    @property
    def image_embedding(self) -> ImageEmbedding:
        if self._embedding is None:
            raise RuntimeError("no image is set: call set_image() first")
        return self._embedding

    @property
    def original_size(self) -> tuple[int, int]:
        return self.image_embedding.original_size

    @property
    def input_size(self) -> tuple[int, int]:
        return self.image_embedding.input_size

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encode ``image`` and make it the current image.

        Args:
            image: (H, W, 3) uint8 in ``image_format`` order, any size; grey (H, W) and RGBA
                (H, W, 4) are converted.
            image_format: "RGB" or "BGR".
        """
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = to_rgb_uint8(image)
        if image_format == "BGR":
            image = image[..., ::-1]
        self._embedding = self.embed_images([image])[0]

    def set_image_embedding(self, embedding: ImageEmbedding) -> None:
        """Make an embedding from :meth:`embed_images` the current image."""
        self._embedding = embedding

    def get_image_embedding(self) -> torch.Tensor:
        """(1, C, h, w) embedding of the current image."""
        return self.image_embedding.features

    def reset_image(self) -> None:
        self._embedding = None

    @torch.inference_mode()
    def embed_images(
        self, images: Sequence[np.ndarray], batch_size: int = 4
    ) -> list[ImageEmbedding]:
        """Encode several RGB images, ``batch_size`` at a time through the encoder.

        Args:
            images: (H, W, 3) uint8 RGB arrays of any sizes (grey and RGBA converted).
            batch_size: images per encoder call.

        Returns:
            One :class:`ImageEmbedding` per image, in order.
        """
        size = self.model.image_size
        prepared, original_sizes, input_sizes = [], [], []
        for index, image in enumerate(images):
            rgb = to_rgb_uint8(image, name=f"images[{index}]")
            resized = resize_longest_side(rgb, size)
            tensor = torch.from_numpy(np.array(resized)).to(self.model.device)
            tensor = tensor.permute(2, 0, 1).to(self._dtype)
            prepared.append(self.model.preprocess(tensor[None])[0])
            original_sizes.append(rgb.shape[:2])
            input_sizes.append(resized.shape[:2])
        embeddings = []
        for start in range(0, len(prepared), batch_size):
            batch = torch.stack(prepared[start : start + batch_size])
            features = self._encode(batch)
            for offset in range(features.shape[0]):
                i = start + offset
                embeddings.append(
                    ImageEmbedding(
                        features=features[offset : offset + 1],
                        original_size=tuple(original_sizes[i]),
                        input_size=tuple(input_sizes[i]),
                    )
                )
        return embeddings

    # ---------------------------------------------------------------------------------- prompts

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        text_embedding: np.ndarray | torch.Tensor | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt on the current image.

        Args:
            point_coords: (N, 2) XY pixel coordinates in the original image.
            point_labels: (N,) labels, 1 foreground, 0 background.
            box: (4,) XYXY box in pixels of the original image.
            mask_input: (1, h, w) low-resolution logits from a previous call (h = w = 4 x the
                embedding side, 256 for SAM).
            multimask_output: three ambiguity-aware masks instead of one.
            return_logits: return logits instead of boolean masks.
            text_embedding: (D,) CLIP embedding of a phrase (``ClipEncoder.encode_text``),
                one more prompt token through the model's ``text_head`` (the SAM paper's text
                prompt); alone or with points, a box, a mask.

        Returns:
            masks (C, H, W) bool (or float logits), iou_predictions (C,), low_res_logits
            (C, h, w); C = 3 if multimask_output else 1.

        Raises:
            ValueError: naming the argument, for a missing, malformed or out-of-image prompt.
        """
        height, width = self.original_size
        coords = labels = boxes = masks = None
        if point_coords is not None or point_labels is not None:
            coords, labels = _check_points(point_coords, point_labels, height, width, batched=False)
            coords, labels = coords[None], labels[None]
        if box is not None:
            boxes = _check_boxes(box, height, width, batched=False)[None]
        if mask_input is not None:
            masks = _check_mask_input(mask_input, self._mask_input_side, batched=False)[None]
        text_tokens = None
        if text_embedding is not None:
            text_tokens = self.text_tokens(torch.as_tensor(text_embedding).reshape(1, -1))
        if coords is None and boxes is None and masks is None and text_tokens is None:
            raise ValueError(
                "no prompt given: pass point_coords/point_labels, box, mask_input or text_embedding"
            )
        out_masks, iou, low_res = self._predict_checked(
            coords, labels, boxes, masks, multimask_output, return_logits, text_tokens=text_tokens
        )
        return (
            out_masks[0].cpu().numpy(),
            iou[0].float().cpu().numpy(),
            low_res[0].float().cpu().numpy(),
        )

    def text_tokens(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """(K, D) CLIP embeddings -> (K, 1, prompt_dim) prompt tokens (the model's
        ``text_head``).

        Raises:
            ValueError: the model has no text head (it was not trained with a CLIP).
        """
        head = getattr(self.model, "text_head", None)
        if head is None:
            raise ValueError(
                "this model has no text prompts: train them with a CLIP (`maskmill fit-text`, "
                "or `maskmill run --clip-model ...`)"
            )
        with torch.inference_mode():
            tokens = head.prompt_tokens(text_embeddings.to(self.model.device))
        return tokens.to(self._dtype)

    def predict_concept(
        self,
        text: str | Sequence[str] | None = None,
        threshold: float | None = None,
        text_encoder: TextEncoder | None = None,
    ) -> list[dict]:
        """Every instance of a concept in the current image (``model.concepts.find_instances``).

        Args:
            text: a concept name ("hazelnut"), several, or None for every concept the model's
                concept head knows; names compare case-insensitively.
            threshold: lowest concept score reported; None: the head's own.
            text_encoder: a :class:`~maskmill.model.text_encoder.ClipEncoder` to find any
                phrase (open vocabulary, through the model's ``text_head``); None: the concepts
                the model learned from its store.

        Returns:
            SA-1B records (``segmentation`` COCO RLE, ``area``, ``bbox`` XYWH, ``predicted_iou``,
            ...) with ``category``, ``category_id`` and ``score``, highest score first.

        Raises:
            ValueError: the model has no concept head. KeyError: a concept it does not know.
        """
        from .concepts import find_instances  # concepts builds on this module

        names = [text] if isinstance(text, str) else (list(text) if text is not None else None)
        return find_instances(
            self.model, self.image_embedding, names, threshold=threshold, text_encoder=text_encoder
        )

    def predict_batch(
        self,
        point_coords: np.ndarray | torch.Tensor | None = None,
        point_labels: np.ndarray | torch.Tensor | None = None,
        boxes: np.ndarray | torch.Tensor | None = None,
        mask_input: np.ndarray | torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        upsample: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks for B prompts on the current image in one decoder call.

        Args:
            point_coords: (B, N, 2) XY pixels of the original image.
            point_labels: (B, N) labels: 1 foreground, 0 background, -1 padding (for prompts
                with fewer than N points).
            boxes: (B, 4) XYXY pixels.
            mask_input: (B, 1, h, w) low-resolution logits.
            multimask_output: three masks per prompt instead of one.
            return_logits: logits instead of boolean masks.
            upsample: upscale masks to the original image; False returns only low-res logits
                as ``masks`` too (saves B x C x H x W memory).

        Returns:
            torch tensors on the model's device: masks (B, C, H, W), iou_predictions (B, C),
            low_res_logits (B, C, h, w).
        """
        height, width = self.original_size
        coords = labels = boxes_t = masks = None
        if point_coords is not None or point_labels is not None:
            coords, labels = _check_points(point_coords, point_labels, height, width, batched=True)
        if boxes is not None:
            boxes_t = _check_boxes(boxes, height, width, batched=True)
        if mask_input is not None:
            masks = _check_mask_input(mask_input, self._mask_input_side, batched=True)
        given = [t.shape[0] for t in (coords, boxes_t, masks) if t is not None]
        if not given:
            raise ValueError("no prompt given: pass point_coords/point_labels, boxes or mask_input")
        if len(set(given)) > 1:
            raise ValueError(f"prompt batch sizes differ: {given} (points, boxes, mask_input)")
        return self._predict_checked(
            coords, labels, boxes_t, masks, multimask_output, return_logits, upsample
        )

    # -------------------------------------------------------------------------------- internals

    @property
    def _dtype(self) -> torch.dtype:
        return self.model.pixel_mean.dtype

    def _encode(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed pixels -> (B, C, h, w) features in the model's dtype."""
        autocast = encoder_autocast_dtype(self.encoder_precision)
        if autocast is None:
            return self.model.image_encoder(batch)
        device_type = self.model.device.type
        with torch.autocast(device_type=device_type, dtype=autocast):
            features = self.model.image_encoder(batch)
        return features.to(self._dtype)

    @property
    def _mask_input_side(self) -> int:
        return self.model.prompt_encoder.mask_input_size[0]

    @torch.inference_mode()
    def _predict_checked(
        self,
        coords: np.ndarray | None,
        labels: np.ndarray | None,
        boxes: np.ndarray | None,
        masks: np.ndarray | None,
        multimask_output: bool,
        return_logits: bool,
        upsample: bool = True,
        text_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embedding = self.image_embedding
        model, device, dtype = self.model, self.model.device, self._dtype
        size = model.image_size
        points = None
        if coords is not None:
            coords_t = torch.as_tensor(coords, dtype=dtype, device=device)
            labels_t = torch.as_tensor(labels, dtype=torch.int64, device=device)
            points = (scale_coords(coords_t, embedding.original_size, size), labels_t)
        boxes_t = None
        if boxes is not None:
            boxes_t = torch.as_tensor(boxes, dtype=dtype, device=device).reshape(-1, 2, 2)
            boxes_t = scale_coords(boxes_t, embedding.original_size, size).reshape(-1, 4)
        masks_t = None
        if masks is not None:
            masks_t = torch.as_tensor(masks, dtype=dtype, device=device)
        low_res, iou = self.decode(
            embedding, points, boxes_t, masks_t, multimask_output, text_tokens=text_tokens
        )
        if not upsample:
            return low_res, iou, low_res
        out = model.postprocess_masks(low_res, embedding.input_size, embedding.original_size)
        if not return_logits:
            out = out > model.mask_threshold
        return out, iou, low_res

    def decode(
        self,
        embedding: ImageEmbedding,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        multimask_output: bool,
        text_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder on prompts already in model-input coordinates.

        Args:
            embedding: the image.
            points: (B, N, 2) XY coordinates in the resized image and (B, N) labels.
            boxes: (B, 4) XYXY in the resized image.
            masks: (B, 1, h, w) mask logits.
            multimask_output: three masks per prompt instead of one.
            text_tokens: (B, T, prompt_dim) more sparse tokens (:meth:`text_tokens`).

        Returns:
            low-resolution logits (B, C, h, w) and predicted IoUs (B, C).
        """
        model = self.model
        sparse, dense = model.prompt_encoder(points, boxes, masks)
        if text_tokens is not None:
            if sparse.shape[1] == 0:  # text alone: the prompt batch is the text's
                sparse = sparse.new_empty((text_tokens.shape[0], 0, sparse.shape[2]))
            sparse = torch.cat([sparse, text_tokens.to(sparse.dtype)], dim=1)
        if masks is not None:
            image = model.mask_decoder.prepare_image(
                embedding.features + dense, model.prompt_encoder.get_dense_pe()
            )
        else:
            image = self.decoder_image(embedding)
        return model.mask_decoder.decode(image, sparse, multimask_output)

    def decoder_image(self, embedding: ImageEmbedding) -> DecoderImage:
        """The decoder's image side for prompts without a mask: the same for every such
        prompt, so prepared once per image and kept on the embedding."""
        if embedding._decoder_image is None:
            prompt_encoder = self.model.prompt_encoder
            embedding._decoder_image = self.model.mask_decoder.prepare_image(
                embedding.features + prompt_encoder.no_mask_dense_embedding(1),
                prompt_encoder.get_dense_pe(),
            )
        return embedding._decoder_image


# ---------------------------------------------------------------------------------- validation


def _as_float_array(value: object, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric, got {type(value).__name__}") from None
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _check_points(
    point_coords: object, point_labels: object, height: int, width: int, batched: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Validate points; return float coords and int labels of the same leading shape."""
    if point_coords is None:
        raise ValueError("point_labels given without point_coords")
    if point_labels is None:
        raise ValueError("point_coords given without point_labels")
    coords = _as_float_array(point_coords, "point_coords")
    labels = _as_float_array(point_labels, "point_labels")
    coords_shape = "(B, N, 2)" if batched else "(N, 2)"
    if coords.ndim != (3 if batched else 2) or coords.shape[-1] != 2:
        raise ValueError(f"point_coords must have shape {coords_shape}, got {coords.shape}")
    if coords.shape[-2] == 0 or (batched and coords.shape[0] == 0):
        raise ValueError("point_coords is empty; pass None for no points")
    if labels.shape != coords.shape[:-1]:
        raise ValueError(
            f"point_labels must have shape {coords.shape[:-1]} to match point_coords "
            f"{coords.shape}, got {labels.shape}"
        )
    allowed = (-1.0, 0.0, 1.0) if batched else (0.0, 1.0)
    bad = ~np.isin(labels, allowed)
    if bad.any():
        raise ValueError(
            f"point_labels must be {' or '.join(str(int(a)) for a in allowed)} "
            f"(1 foreground, 0 background{', -1 padding' if batched else ''}), "
            f"got {labels[bad][0]:g}"
        )
    real = labels != -1
    if batched and not real.any(axis=-1).all():
        raise ValueError("point_labels: a prompt has only padding points (-1)")
    x, y = coords[..., 0][real], coords[..., 1][real]
    outside = (x < 0) | (x > width) | (y < 0) | (y > height)
    if outside.any():
        index = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"point_coords: point ({x[index]:g}, {y[index]:g}) lies outside the image "
            f"(x in [0, {width}], y in [0, {height}])"
        )
    return coords.astype(np.float32), labels.astype(np.int64)


def _check_boxes(box: object, height: int, width: int, batched: bool) -> np.ndarray:
    name = "boxes" if batched else "box"
    boxes = _as_float_array(box, name)
    if not batched and boxes.shape == (1, 4):
        boxes = boxes[0]
    expected = "(B, 4)" if batched else "(4,)"
    if boxes.ndim != (2 if batched else 1) or boxes.shape[-1] != 4 or boxes.size == 0:
        raise ValueError(f"{name} must have shape {expected} XYXY, got {boxes.shape}")
    flat = boxes.reshape(-1, 4)
    inverted = (flat[:, 2] < flat[:, 0]) | (flat[:, 3] < flat[:, 1])
    if inverted.any():
        x0, y0, x1, y1 = flat[np.flatnonzero(inverted)[0]]
        raise ValueError(
            f"{name} must be XYXY with x0 <= x1 and y0 <= y1, got ({x0:g}, {y0:g}, {x1:g}, {y1:g})"
        )
    outside = (flat[:, 0] < 0) | (flat[:, 1] < 0) | (flat[:, 2] > width) | (flat[:, 3] > height)
    if outside.any():
        x0, y0, x1, y1 = flat[np.flatnonzero(outside)[0]]
        raise ValueError(
            f"{name} ({x0:g}, {y0:g}, {x1:g}, {y1:g}) extends outside the image "
            f"({width} x {height} pixels)"
        )
    return boxes.astype(np.float32)


def _check_mask_input(mask_input: object, side: int, batched: bool) -> np.ndarray:
    masks = _as_float_array(mask_input, "mask_input")
    expected = (masks.shape[0], 1, side, side) if batched and masks.ndim == 4 else (1, side, side)
    if masks.shape != expected or masks.shape[0] == 0:
        shape = f"(B, 1, {side}, {side})" if batched else f"(1, {side}, {side})"
        raise ValueError(
            f"mask_input must have shape {shape} (low-resolution logits from a previous "
            f"prediction), got {masks.shape}"
        )
    return masks.astype(np.float32)
