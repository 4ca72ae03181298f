"""The annotation page's session: a person annotates a round of a store through a browser.

:class:`AnnotationSession` holds what one ``maskmill serve`` process works on: one round and
stage (``manual`` or ``semi``) of a store, the model, the writer lease and the image being
annotated. The web app (:mod:`engine.web.app`) is a thin layer of HTTP over its methods.

- Images are the store's (``storage.queries.image_infos``); the next image is the first, by id, with
  no committed shard in this round and stage (``StageWriter.done``). An image is done once its
  shard exists: after its first accepted mask or after "next image".
- The image embedding is computed once, when an image is opened; every click only runs the
  prompt encoder and mask decoder.
- Semi stage: the mask generator (``engine.stages.stage_generator``, at the model's own ``semi``
  preset) pre-fills the image with its confident masks (source ``model``), as
  :func:`engine.stages.semi_automatic` does; the person adds the missing ones and may delete bad
  ones.
- The person's masks go through the :class:`~engine.annotators.Annotator` contract
  (:class:`WebAnnotator`), and the image's shard is written through
  :class:`~storage.StageWriter` with records shaped like the stages' (``segmentation`` as COCO
  RLE, ``clicks`` ``[[x, y, label], ...]``, ``seconds``, ``predicted_iou``, ``source``
  ``web:<name>``). Each accept, undo or delete rewrites the image's shard whole (shard names are
  deterministic, so a rewrite replaces it).
- Clicks: label 1 foreground, 0 background, in pixels of the stored image; a box prompt is
  stored as its two corners with labels 2 (top-left) and 3 (bottom-right), the labels SAM's
  prompt encoder gives box corners.
- Seconds of a mask: from the first prediction of the object to its accept, measured here.

Every method is serialised by one lock: the predictor has one current image.
"""

from __future__ import annotations

import copy
import io
import math
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from maskmill.engine.annotators import AnnotatedMask, Annotation, Annotator, Click
from maskmill.engine.stages import read_stored_image, stage_generator, stage_metrics
from maskmill.model import Predictor, Sam, load_model
from maskmill.storage import StageWriter, Store, rle
from maskmill.storage.images import BadImageError, ImageInfo, load_stored_image
from maskmill.storage.queries import existing_masks, image_infos, stage_progress

STAGES = ("manual", "semi")
# Box corners in the clicks column: SAM's prompt-encoder labels for a box's two corners.
BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = 2, 3
MAX_POINTS = 64  # more clicks on one object is a stuck page, not annotation
# Images up to this many pixels go to the page as PNG, bigger ones as JPEG (encoding speed).
PNG_MAX_PIXELS = 4_000_000


class SessionError(Exception):
    """A request the session refuses; ``status`` is the HTTP status the web app answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class WebAnnotator(Annotator):
    """The person behind the annotation page, as an :class:`~engine.annotators.Annotator`.

    The page's accepts, undos and deletes edit this annotator's :class:`Annotation` of each
    image; :meth:`annotate` hands it over, so the session builds the image's records exactly as
    the stages do from any annotator.

    Args:
        name: the person's name; the masks' ``source`` is ``web:<name>``.
    """

    def __init__(self, name: str = "web") -> None:
        self.source = f"web:{name}"
        self._annotations: dict[str, Annotation] = {}

    def work(self, image_id: str) -> Annotation:
        """The annotation in progress on ``image_id`` (created empty), for the page to edit."""
        return self._annotations.setdefault(image_id, Annotation())

    def annotate(
        self,
        image_id: str,
        image: np.ndarray,
        predictor: Predictor,
        existing: Sequence[dict[str, Any]],
    ) -> Annotation:
        """What the person accepted on ``image_id`` so far (a copy; the person did the work)."""
        return copy.deepcopy(self.work(image_id))


@dataclass
class Prediction:
    """The last masks shown for the object being drawn.

    Attributes:
        masks: (C, H, W) bool, C = 3 (ambiguous masks) or 1.
        scores: (C,) predicted IoUs.
        low_res: (C, h, w) logits, fed back as the mask prompt of the next click.
        clicks: the prompt that made them: points, then box corners (see module doc).
    """

    masks: np.ndarray
    scores: np.ndarray
    low_res: np.ndarray
    clicks: list[Click]


@dataclass
class _OpenImage:
    """The image being annotated and the work on it."""

    row: ImageInfo
    image: np.ndarray  # (H, W, 3) uint8 RGB, the stored pixel grid
    prefill: list[dict[str, Any]]  # generator records (semi stage), source "model"
    existing: list[dict[str, Any]]  # RLEs of earlier rounds' masks (shown, not editable)
    encoded: tuple[bytes, str] | None = None  # the image as the page gets it, and its type
    prediction: Prediction | None = None
    object_started: float | None = None  # time.monotonic() of the object's first prediction
    object_clicks: int = 0  # predictions asked for the object (for abandoned objects)
    history: list[tuple[str, Any]] = field(default_factory=list)  # edits, for undo


class AnnotationSession:
    """One round and stage of a store, annotated by a person through the web page.

    Use as a context manager: entering takes the writer lease of the round and stage (a second
    writer, e.g. another ``maskmill serve`` or a running stage, is refused with
    ``storage.WriterConflictError``) and leaving gives it back.

    Args:
        store: the store (``Store`` or URL).
        round_: round number, >= 1.
        stage: ``manual`` or ``semi``.
        model: the model the page prompts.
        model_version: the stored model's version (``models/v<N>``), or None for a model from
            outside the store; written to the masks' ``model_version``.
        annotator: the person (default ``WebAnnotator("web")``).
        generator_options: ``MaskGenerator`` options of the semi stage's pre-fill, over the
            stage grid and the model's ``semi`` preset; ignored for ``manual``.
        model_meta: the stored model's meta, for the round's metrics (held-out mIoU).
    """

    def __init__(
        self,
        store: Store | str,
        round_: int,
        stage: str,
        model: Sam,
        model_version: int | None = None,
        annotator: WebAnnotator | None = None,
        generator_options: dict[str, Any] | None = None,
        model_meta: dict[str, Any] | None = None,
    ) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if int(round_) < 1:
            raise ValueError(f"round must be >= 1 (round 0 is ground truth), got {round_}")
        self.store = store if isinstance(store, Store) else Store(store)
        self.round = int(round_)
        self.stage = stage
        self.model = model
        self.model_version = model_version
        self.model_meta = model_meta or {}
        self.annotator = annotator or WebAnnotator()
        self.predictor = Predictor(model)
        self.generator = None
        if stage == "semi":
            self.generator = stage_generator(model, "semi", generator_options)
        owner = f"{socket.gethostname()}:{os.getpid()} (maskmill serve, {self.annotator.source})"
        self.writer = StageWriter(self.store, self.round, stage, owner=owner)
        self.images: dict[str, ImageInfo] = {}
        self.finished: dict[str, Any] | None = None  # the rounds row, once every image is done
        self._open: _OpenImage | None = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> AnnotationSession:
        self.writer.__enter__()
        try:
            self.images = image_infos(self.store)
        except BaseException:
            self.writer.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Give the writer lease back (idempotent)."""
        with self._lock:
            self.writer.__exit__(None, None, None)

    # -------------------------------------------------------------------------------- queries

    def state(self) -> dict[str, Any]:
        """The page's view: the image being annotated (the next one opened if none) and its
        masks, or ``done`` when every image of the round has its shard."""
        with self._lock:
            if self._open is None:
                self._open_next()
            return self._state()

    def image_bytes(self, image_id: str) -> tuple[bytes, str]:
        """(encoded bytes, media type) of a store image, decoded on the stored pixel grid (no
        EXIF turn, the grid masks refer to) and re-encoded as PNG (JPEG when large)."""
        with self._lock:
            row = self._row(image_id)
            if self._open is not None and self._open.row.image_id == image_id:
                if self._open.encoded is None:
                    self._open.encoded = _encode(self._open.image)
                return self._open.encoded
            try:
                return _encode(load_stored_image(row))
            except BadImageError as error:
                raise SessionError(404, f"image {image_id} cannot be read: {error}") from None

    # ------------------------------------------------------------------------------- prompts

    def predict(
        self,
        image_id: str,
        points: Sequence[Sequence[float]] = (),
        box: Sequence[float] | None = None,
        mask_input_from_previous: bool = False,
        previous_index: int | None = None,
        multimask: bool | None = None,
    ) -> dict[str, Any]:
        """Masks for a prompt on the open image.

        Args:
            image_id: the open image (else 409).
            points: ``[[x, y, label], ...]``: XY pixels of the image, label 1 fg / 0 bg.
            box: XYXY pixels, or None.
            mask_input_from_previous: feed the previous prediction's logits (mask
                ``previous_index``, default its best) back as the mask prompt (SAM's loop).
            previous_index: which previous mask to feed back.
            multimask: three ambiguous masks; default: only for a single point without a box or
                mask prompt (where a click is ambiguous), one mask otherwise.

        Returns:
            ``masks`` (each a COCO compressed RLE ``{size: [h, w], counts: str}``, the store's
            own encoding), ``scores``, ``best`` (index of the top score),
            ``decode_ms`` (prompt encoder + decoder + upsampling, this call).

        Raises:
            SessionError: 404 unknown image, 409 not the open image or no previous
                prediction, 422 a malformed prompt (the predictor's message).
        """
        with self._lock:
            work = self._current(image_id)
            height, width = work.image.shape[:2]
            coords = np.asarray([p[:2] for p in points], np.float64).reshape(-1, 2)
            labels = np.asarray([p[2] for p in points], np.int64).reshape(-1)
            box_array = None if box is None else np.asarray(box, np.float64).reshape(4)
            mask_input = None
            if mask_input_from_previous:
                previous = work.prediction
                if previous is None:
                    raise SessionError(409, "mask_input_from_previous: no previous prediction")
                index = (
                    int(np.argmax(previous.scores)) if previous_index is None else previous_index
                )
                if not 0 <= index < len(previous.scores):
                    raise SessionError(
                        422,
                        f"previous_index {index} is out of range: the previous prediction has "
                        f"{len(previous.scores)} masks",
                    )
                mask_input = previous.low_res[index : index + 1]
            if multimask is None:
                multimask = len(coords) == 1 and box_array is None and mask_input is None
            started = time.perf_counter()
            try:
                with torch.inference_mode():
                    masks, scores, low_res = self.predictor.predict(
                        coords if len(coords) else None,
                        labels if len(coords) else None,
                        box=box_array,
                        mask_input=mask_input,
                        multimask_output=multimask,
                    )
            except ValueError as error:
                raise SessionError(422, str(error)) from None
            decode_ms = (time.perf_counter() - started) * 1000
            clicks: list[Click] = [
                (float(x), float(y), int(lab)) for (x, y), lab in zip(coords, labels, strict=True)
            ]
            if box_array is not None:
                x0, y0, x1, y1 = (float(v) for v in box_array)
                clicks += [(x0, y0, BOX_TOP_LEFT), (x1, y1, BOX_BOTTOM_RIGHT)]
            work.prediction = Prediction(masks, scores, low_res, clicks)
            if work.object_started is None:
                work.object_started = time.monotonic()
            work.object_clicks += 1
            return {
                "image_id": image_id,
                "height": height,
                "width": width,
                "masks": [rle.encode(m) for m in masks],
                "scores": [float(s) for s in scores],
                "best": int(np.argmax(scores)),
                "decode_ms": decode_ms,
            }

    # --------------------------------------------------------------------------------- edits

    def accept(self, image_id: str, mask: int | None = None) -> dict[str, Any]:
        """Accept mask ``mask`` (default the best) of the last prediction: it joins the image's
        annotation with the prediction's clicks and the seconds since the object's first
        prediction, and the image's shard is rewritten. Returns the new state."""
        with self._lock:
            work = self._current(image_id)
            prediction = work.prediction
            if prediction is None:
                raise SessionError(409, "nothing to accept: click on an object first")
            index = int(np.argmax(prediction.scores)) if mask is None else mask
            if not 0 <= index < len(prediction.scores):
                raise SessionError(
                    422,
                    f"mask {index} is out of range: the prediction has "
                    f"{len(prediction.scores)} masks",
                )
            segmentation = rle.encode(prediction.masks[index])
            if not int(rle.areas([segmentation])[0]):
                raise SessionError(422, f"mask {index} is empty: nothing to accept")
            seconds = time.monotonic() - (work.object_started or time.monotonic())
            accepted = AnnotatedMask(
                segmentation,
                list(prediction.clicks),
                float(seconds),
                float(prediction.scores[index]),
            )
            self.annotator.work(image_id).masks.append(accepted)
            work.history.append(("accept", None))
            self._reset_object(work)
            self._write(work)
            return self._state()

    def undo(self, image_id: str) -> dict[str, Any]:
        """Undo the last accept or delete on the open image; rewrites its shard."""
        with self._lock:
            work = self._current(image_id)
            if not work.history:
                raise SessionError(409, "nothing to undo on this image")
            kind, payload = work.history.pop()
            annotation = self.annotator.work(image_id)
            if kind == "accept":
                annotation.masks.pop()
            else:  # a delete: put the mask back where it was
                where, position, item = payload
                (work.prefill if where == "model" else annotation.masks).insert(position, item)
            self._write(work)
            return self._state()

    def delete(self, image_id: str, index: int) -> dict[str, Any]:
        """Delete mask ``index`` of the image's masks as the state lists them (pre-filled first,
        then the person's); rewrites its shard."""
        with self._lock:
            work = self._current(image_id)
            annotation = self.annotator.work(image_id)
            total = len(work.prefill) + len(annotation.masks)
            if not 0 <= index < total:
                raise SessionError(
                    422, f"index {index} is out of range: the image has {total} masks"
                )
            if index < len(work.prefill):
                work.history.append(("delete", ("model", index, work.prefill.pop(index))))
            else:
                position = index - len(work.prefill)
                work.history.append(("delete", ("web", position, annotation.masks.pop(position))))
            self._write(work)
            return self._state()

    def clear(self, image_id: str) -> dict[str, Any]:
        """Drop the object being drawn (its clicks count as abandoned). Returns the state."""
        with self._lock:
            work = self._current(image_id)
            self._abandon(work)
            return self._state()

    def next_image(self, image_id: str) -> dict[str, Any]:
        """Finish the open image (its shard is written, also with no masks) and open the next
        one. When none is left, the round's row is written to the rounds table."""
        with self._lock:
            work = self._current(image_id)
            self._abandon(work)
            self._write(work)
            self._open = None
            self._open_next()
            return self._state()

    # ------------------------------------------------------------------------------ internals

    def _row(self, image_id: str) -> ImageInfo:
        # A dict lookup, never a path: ids that are not the store's are simply unknown.
        row = self.images.get(image_id) if isinstance(image_id, str) else None
        if row is None:
            raise SessionError(404, f"no image {image_id!r} in this store")
        return row

    def _current(self, image_id: str) -> _OpenImage:
        self._row(image_id)
        if self._open is None:
            self._open_next()
        if self._open is None or self._open.row.image_id != image_id:
            current = self._open.row.image_id if self._open else None
            raise SessionError(
                409, f"image {image_id} is not the one being annotated (that is {current})"
            )
        return self._open

    def _open_next(self) -> None:
        """Open the first image without a shard: read it, embed it, pre-fill it (semi)."""
        self.writer.lease.check()  # renews the lease on a long session; raises if it is lost
        for image_id in sorted(self.images):
            row = self.images[image_id]
            if self.writer.done(image_id):
                continue
            image = read_stored_image(self.writer, row)  # None: failure recorded
            if image is None:
                continue
            prefill = []
            with torch.inference_mode():
                if self.generator is not None:
                    prefill = [{**r, "source": "model"} for r in self.generator.generate(image)]
                self.predictor.set_image(image)  # the embedding: once per image
            existing = existing_masks(self.store, [image_id], self.round)[image_id]
            self._open = _OpenImage(row, image, prefill, existing)
            return
        self._open = None
        if self.finished is None:
            self.finished = self.writer.finish(
                model_version=self.model_version,
                metrics=stage_metrics(self.store, self.round, self.stage, self.model_meta),
            )

    def _abandon(self, work: _OpenImage) -> None:
        """Count a drawn but not accepted object as abandoned (the Annotation's fields)."""
        if work.prediction is not None:
            annotation = self.annotator.work(work.row.image_id)
            annotation.abandoned += 1
            annotation.abandoned_clicks += work.object_clicks
            annotation.abandoned_seconds += time.monotonic() - (work.object_started or 0)
        self._reset_object(work)

    @staticmethod
    def _reset_object(work: _OpenImage) -> None:
        work.prediction = None
        work.object_started = None
        work.object_clicks = 0

    def _records(self, work: _OpenImage) -> list[dict[str, Any]]:
        """The image's mask records, as ``engine.stages`` builds them: pre-fill, then the
        annotator's masks (through the Annotator contract)."""
        image_id = work.row.image_id
        annotation = self.annotator.annotate(image_id, work.image, self.predictor, work.existing)
        records = [dict(r) for r in work.prefill]
        records.extend(annotation.records(self.annotator.source))
        for index, record in enumerate(records):
            record.update(image_id=image_id, index=index)
        return records

    def _write(self, work: _OpenImage) -> None:
        self.writer.write_masks(
            work.row.image_id, self._records(work), model_version=self.model_version
        )

    def _state(self) -> dict[str, Any]:
        ids = sorted(self.images)
        base = {
            "round": self.round,
            "stage": self.stage,
            "annotator": self.annotator.source,
            "model_version": self.model_version,
            "total": len(ids),
        }
        work = self._open
        if work is None:
            return {**base, "done": True, "image": None, "masks": [], "existing": []}
        image_id = work.row.image_id
        masks = []
        for record in self._records(work):
            masks.append(
                {
                    "index": record["index"],
                    "source": record["source"],
                    "predicted_iou": record.get("predicted_iou"),
                    "clicks": record.get("clicks"),
                    "seconds": record.get("seconds"),
                    "mask": _rle(record["segmentation"]),
                }
            )
        return {
            **base,
            "done": False,
            "image": {
                "image_id": image_id,
                "url": f"/api/images/{image_id}",
                "width": work.row.width,
                "height": work.row.height,
                "position": ids.index(image_id) + 1,
            },
            "masks": masks,
            "existing": [_rle(r) for r in work.existing],
            "can_undo": bool(work.history),
        }


# ------------------------------------------------------------------------------- helpers


def _rle(segmentation: dict[str, Any]) -> dict[str, Any]:
    """A stored mask as the page takes it: COCO compressed RLE, ``counts`` a str."""
    counts = segmentation["counts"]
    return {
        "size": [int(v) for v in segmentation["size"]],
        "counts": counts.decode() if isinstance(counts, bytes) else counts,
    }


def _encode(image: np.ndarray) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    if image.shape[0] * image.shape[1] <= PNG_MAX_PIXELS:
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue(), "image/png"
    Image.fromarray(image).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue(), "image/jpeg"


def resolve_model(
    store: Store, round_: int, checkpoint: str | None = None
) -> tuple[Sam, int | None, dict[str, Any]]:
    """The model a session prompts: (model, stored version or None, meta).

    ``checkpoint`` if given (version None unless it is a stored model's file); else the store's
    model for round ``round_`` (the newest trained before it, else the newest); else the
    shipped default model (``model.load_model``).

    Raises:
        FileNotFoundError: none of those exists.
    """
    metas = store.model_metas()
    stored = [m for m in metas if m["uri"] == checkpoint] if checkpoint else []
    if not checkpoint and metas:
        before = [m for m in metas if int(m.get("round") or 0) < round_]
        stored = [(before or metas)[-1]]
        checkpoint = stored[0]["uri"]
    model, source = load_model(checkpoint)
    if stored:
        return model, int(stored[-1]["version"]), stored[-1]
    return model, None, {"source": source}


def default_round(store: Store, stage: str) -> int:
    """The round ``maskmill serve`` works on without ``--round``: the lowest round of ``stage``
    that has masks but no rounds-table row (unfinished), else one past the highest round in
    the store (1 for a store with only ground truth)."""
    started, finished = stage_progress(store)
    open_rounds = sorted(r for r, s in started - finished if s == stage)
    if open_rounds:
        return open_rounds[0]
    return max([r for r, _ in started | finished] + [0]) + 1


def finite(value: Any) -> bool:
    """True for an int or float that is not NaN or infinite (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
