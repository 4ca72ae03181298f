"""Image embeddings through the store's embedding cache (``storage.embeddings``): the one place
the engine encodes an image it knows the id of.

The image encoder is most of a model's cost, and the engine meets the same image in every stage,
in evaluation and on the annotation page, and again after each retrain (which leaves the encoder
frozen by default). So an embedding is looked up by (encoder digest, image id, view) first and
only encoded on a miss, then written for the next user:

- :func:`open_embedding_cache` binds a store to a model's encoder (``model.sam.encoder_digest``,
  computed once per call: bind once per stage, actor or session, not per image);
- :func:`image_embeddings` gives the embeddings of an image's views (the whole image and/or
  crops, XYXY pixel boxes), encoding the misses in batches;
- :func:`set_image` makes an image the predictor's current one (``Predictor.set_image`` with the
  cache);
- :func:`generate_masks` is ``MaskGenerator.generate`` with the cache, crops included (each crop
  is a view of its own).

Masks are the same whether the embedding was just computed or read back: on a miss the features
are rounded to float16 (what is stored) and back before use, so the first pass and every later
one use exactly the same numbers. With the cache off (``cache`` None) the model's own float32
features are used, as ``Predictor.set_image`` does; those masks differ from the cached ones only
by the float16 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from maskmill.model import ImageEmbedding, MaskGenerator, Predictor, Sam
from maskmill.model.sam import encoder_digest
from maskmill.model.transforms import preprocess_shape, to_rgb_uint8
from maskmill.storage.embeddings import CachedEmbedding, EmbeddingCache, view_key
from maskmill.storage.store import Store


def open_embedding_cache(store: Store | None, model: Sam) -> EmbeddingCache | None:
    """The cache of ``model``'s image encoder in ``store``; None (no cache) when ``store`` is
    None, which is how a caller passes the opt-out (``embedding_cache=False``) down."""
    if store is None:
        return None
    return EmbeddingCache(store, encoder_digest(model))


@torch.inference_mode()
def image_embeddings(
    predictor: Predictor,
    image_id: str | None,
    image: np.ndarray,
    crop_boxes: Sequence[Sequence[int]],
    cache: EmbeddingCache | None,
    batch_size: int = 4,
) -> list[ImageEmbedding]:
    """The embeddings of views of an image, in the order of ``crop_boxes``.

    Args:
        predictor: encodes the misses (``Predictor.embed_images``) with its model, at its
            ``encoder_precision`` (which the cache keys the views by).
        image_id: the images table's id of ``image`` (the cache key); None: no cache.
        image: (H, W, 3) uint8 RGB (grey and RGBA converted), the stored pixel grid.
        crop_boxes: XYXY integer pixel boxes (exclusive right/bottom) of the views;
            ``[0, 0, W, H]`` is the whole image.
        cache: the model's cache (:func:`open_embedding_cache`), or None: encode every view
            and keep the model's own features.
        batch_size: views per encoder call.

    Returns:
        One ``ImageEmbedding`` per box: features (1, C, h, w) in the model's dtype on its
        device, ``original_size`` (H, W) of the view, ``input_size`` (H, W) of the resized
        view.
    """
    image = to_rgb_uint8(image)
    height, width = image.shape[:2]
    model = predictor.model
    side = model.image_size
    # The encoder's precision is part of the key: a bf16 embedding is not an fp32 one.
    views = [_view(box, height, width, side, predictor.encoder_precision) for box in crop_boxes]
    found: list[ImageEmbedding | None] = [None] * len(views)
    if cache is not None and image_id is not None:
        for index, (box, view) in enumerate(zip(crop_boxes, views, strict=True)):
            entry = cache.get(image_id, view)
            if entry is not None and _fits(entry, box, model):
                found[index] = _from_entry(entry, model)
    missing = [i for i, embedding in enumerate(found) if embedding is None]
    crops = [_crop(image, crop_boxes[i]) for i in missing]
    encoded = predictor.embed_images(crops, batch_size=batch_size) if crops else []
    for index, embedding in zip(missing, encoded, strict=True):
        if cache is not None and image_id is not None:
            embedding = _store(cache, image_id, views[index], embedding)
        found[index] = embedding
    return found  # type: ignore[return-value]  # every slot is filled above


def image_embedding(
    predictor: Predictor, image_id: str | None, image: np.ndarray, cache: EmbeddingCache | None
) -> ImageEmbedding:
    """The whole image's embedding (:func:`image_embeddings` of ``[0, 0, W, H]``)."""
    height, width = image.shape[:2]
    return image_embeddings(predictor, image_id, image, [[0, 0, width, height]], cache)[0]


def set_image(
    predictor: Predictor, image_id: str | None, image: np.ndarray, cache: EmbeddingCache | None
) -> ImageEmbedding:
    """Make ``image`` (H, W, 3 uint8 RGB) the predictor's current image, its embedding from the
    cache when there (:func:`image_embedding`); returns the embedding."""
    embedding = image_embedding(predictor, image_id, image, cache)
    predictor.set_image_embedding(embedding)
    return embedding


def generate_masks(
    generator: MaskGenerator,
    image_id: str | None,
    image: np.ndarray,
    cache: EmbeddingCache | None,
) -> list[dict[str, Any]]:
    """``generator.generate(image)`` with the embeddings of the whole image and of every crop
    (``crop_n_layers`` > 0) from the cache where there: SA-1B records (``segmentation`` COCO
    RLE, ``bbox`` XYWH, ...). Also leaves the whole image current in ``generator.predictor``."""
    embeddings = crop_embeddings(generator, image_id, image, cache)
    return generator.generate_from_crops(embeddings)


def crop_embeddings(
    generator: MaskGenerator,
    image_id: str | None,
    image: np.ndarray,
    cache: EmbeddingCache | None,
) -> list[ImageEmbedding]:
    """The embeddings ``generator`` needs for ``image``: one per ``generator.crop_boxes``, the
    whole image first; the whole image becomes ``generator.predictor``'s current image."""
    image = to_rgb_uint8(image)
    boxes = generator.crop_boxes(image.shape[:2])
    embeddings = image_embeddings(
        generator.predictor, image_id, image, boxes, cache, generator.encoder_batch_size
    )
    generator.predictor.set_image_embedding(embeddings[0])
    return embeddings


# ------------------------------------------------------------------------------------ internals


def _view(box: Sequence[int], height: int, width: int, side: int, precision: str) -> str:
    """The cache's view key of ``box`` (XYXY) on an (height, width) image encoded at
    ``precision``."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"crop box {list(box)} (XYXY) is not inside the {width}x{height} image")
    whole = (x0, y0, x1, y1) == (0, 0, width, height)
    return view_key(None if whole else [x0, y0, x1, y1], side, precision)


def _crop(image: np.ndarray, box: Sequence[int]) -> np.ndarray:
    x0, y0, x1, y1 = (int(v) for v in box)
    return image[y0:y1, x0:x1]


def _fits(entry: CachedEmbedding, box: Sequence[int], model: Sam) -> bool:
    """Whether an entry is an embedding of this view by a model of this shape (else a stale or
    foreign entry: a miss, rewritten)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    side, channels = model.image_size, model.config.prompt_embed_dim
    grid = side // model.config.patch_size
    return (
        entry.original_size == (y1 - y0, x1 - x0)
        and entry.input_size == preprocess_shape(y1 - y0, x1 - x0, side)
        and entry.features.shape == (1, channels, grid, grid)
    )


def _from_entry(entry: CachedEmbedding, model: Sam) -> ImageEmbedding:
    features = torch.from_numpy(entry.features).to(model.device, model.pixel_mean.dtype)
    return ImageEmbedding(features, entry.original_size, entry.input_size)


def _store(
    cache: EmbeddingCache, image_id: str, view: str, embedding: ImageEmbedding
) -> ImageEmbedding:
    """Write a fresh embedding and return it as it will be read back (float16, then the
    model's dtype), so the first pass and the cached ones use the same numbers. Features that
    float16 cannot hold (beyond +-65504) are not cached: the model's own are used."""
    features = embedding.features
    half = features.detach().to("cpu", torch.float16)
    if not torch.isfinite(half).all():
        return embedding
    entry = CachedEmbedding(half.numpy(), embedding.original_size, embedding.input_size)
    cache.put(image_id, view, entry)
    return ImageEmbedding(
        half.to(features.device, features.dtype), embedding.original_size, embedding.input_size
    )
