"""The annotation page's session: people annotate a round of a store through a browser.

:class:`AnnotationSession` holds what one ``maskmill serve`` process works on: one round and
stage (``manual`` or ``semi``) of a store, the model, and one workspace per person (their own
predictor and open image, claim, undo history and working-time clock), keyed by the person's
account name (set by ``engine.web.app.AuthMiddleware``; ``user=None``: the session's own annotator,
the one person of a server without accounts). The web app (:mod:`engine.web.app`) is a thin
layer of HTTP over its methods.

- Images are the store's (``storage.queries.image_infos``). Many people, on this server and on
  others sharing the store, annotate one round and stage at once through per-image claims
  (:class:`~storage.claims.ImageClaims`, through a ``StageWriter(shared=True)`` per person):
  a person's next image is the first, by id, with no committed shard in this round and stage
  that nobody else holds. Each of the person's requests renews their claim (the page also
  sends a heartbeat while open); a claim nobody renews for ``claim_ttl_s`` expires and the
  image goes back to the queue, and its former holder's next request is refused (409, the
  image's work dropped). An image is written once, whole, when its person finishes it ("next
  image": its shard, also with no masks) and is done from then on. The round's row goes to the
  rounds table when its last image is done, written by whichever person finds none left.
- The image embedding is computed once, when an image is opened (or read from the store's
  embedding cache, ``engine.embeddings``, when this encoder met the image before); every click
  only runs the prompt encoder and mask decoder.
- Semi stage: the mask generator (``engine.stages.stage_generator``, at the model's own ``semi``
  preset) pre-fills the image with its confident masks (source ``model``), as
  :func:`engine.stages.semi_automatic` does; the person adds the missing ones and may delete bad
  ones.
- The person's masks go through the :class:`~engine.annotators.Annotator` contract
  (:class:`WebAnnotator`), and the image's shard is written through
  :class:`~storage.StageWriter` with records shaped like the stages' (``segmentation`` as COCO
  RLE, ``clicks`` ``[[x, y, label], ...]``, ``seconds``, ``predicted_iou``, ``source``
  ``web:<name>``). Accepts, undos and deletes change the person's annotation of the image;
  the shard is written when the image is finished.
- Clicks: label 1 foreground, 0 background, in pixels of the stored image; a box prompt is
  stored as its two corners with labels 2 (top-left) and 3 (bottom-right), the labels SAM's
  prompt encoder gives box corners.
- Correction: brush and eraser :class:`Stroke` s edit the object being drawn before it is
  accepted. A stroke is a polyline of integer XY pixels of the stored image drawn with a round
  pen of ``radius`` pixels: its pixels are exactly those ``cv2.line(..., thickness=2 * radius)``
  covers along each segment (a one-point stroke: the disc ``cv2.circle(..., radius, -1)``
  covers, the same pixels), on the stored pixel grid. The brush sets them, the eraser clears
  them. The object's mask is always *the model's mask with the object's strokes painted over
  it, in order*: a click after strokes recomputes the model's mask and paints the strokes again
  (a correction is never silently dropped), and the strokes apply to each of the ambiguous masks
  alike. A stroke with nothing drawn starts an object from an empty mask (painted by hand).
- Editing a stored mask: :meth:`AnnotationSession.edit` takes a mask of the image (pre-filled or
  the person's) back as the object being drawn; accepting it stores it as the person's mask with
  the new strokes (and the old mask's clicks, strokes and seconds); Esc, undo or "next image"
  puts the original back unchanged.
- Undo steps back the object's last action first (a stroke, or a click: the prediction before
  it comes back, logits included), then the image's accepts, deletes and edits.
- Per accepted mask the store gets ``strokes`` (strokes in the accepted mask; undone ones are
  not counted), ``stroke_seconds`` (working time of its strokes), ``model_iou`` (IoU of the
  model's mask the strokes were painted on with the accepted mask: 1.0 when nothing was
  corrected; for an edited pre-filled mask the pre-filled one; None for a mask painted from
  nothing) and ``category`` (typed or chosen from :func:`storage.queries.categories`; a name the
  store has not seen gets the next free ``category_id``).
- Seconds of a mask are *working time*: the sum of the gaps between the person's actions
  (predict, stroke, undo, edit, accept; the first gap runs from the previous action on the image,
  or from the image being opened, so finding and aiming at the object counts), each gap capped at
  :data:`IDLE_CAP_S`: a longer pause counts as that much (a person thinking, not away). Time that
  ends in a delete, an undo of an accept or "next image" belongs to no mask; an object dropped
  with Esc or "next image" adds its time to the image's ``abandoned_seconds``. The clock is
  injectable (``AnnotationSession(clock=...)``) so tests need no sleeping.

A person's requests are serialised by their workspace's lock (their predictor has one current
image); different people's run side by side.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import numbers
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from maskmill.engine.annotators import AnnotatedMask, Annotation, Annotator, Click
from maskmill.engine.embeddings import open_embedding_cache
from maskmill.engine.plan import model_for_round
from maskmill.engine.stages import (
    check_prefill_concepts,
    encode_and_prefill,
    read_stored_image,
    stage_generator,
    stage_metrics,
)
from maskmill.engine.web.lane import CLICK, EMBED, ComputeLane
from maskmill.model import EncoderPrecision, Predictor, Sam, encoder_autocast_dtype, load_model
from maskmill.storage import (
    CLAIM_TTL_S,
    ClaimLostError,
    ImageDoneError,
    StageWriter,
    Store,
    rle,
)
from maskmill.storage.images import BadImageError, ImageInfo, load_stored_image
from maskmill.storage.queries import (
    categories,
    existing_masks,
    image_infos,
    stage_figures,
    stage_progress,
)

STAGES = ("manual", "semi")
# Box corners in the clicks column: SAM's prompt-encoder labels for a box's two corners.
BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = 2, 3
MAX_POINTS = 64  # more clicks on one object is a stuck page, not annotation
# A gap between two actions of the person longer than this counts as this (module doc).
IDLE_CAP_S = 10.0
STROKE_MODES = ("brush", "eraser")
MAX_RADIUS = 512  # pixels; a wider pen is a fill, not a stroke
MAX_STROKE_POINTS = 2000  # the page splits longer strokes
MAX_STROKES = 1000  # on one object
MAX_CATEGORY_CHARS = 64
# Images up to this many pixels go to the page as PNG, bigger ones as JPEG (encoding speed).
PNG_MAX_PIXELS = 4_000_000


class SessionError(Exception):
    """A request the session refuses; ``status`` is the HTTP status the web app answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ImageLostError(SessionError):
    """The person's image is someone else's now (their claim expired and it went back to the
    queue): its work is dropped, and the page asks for its state again."""


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

    def drop(self, image_id: str) -> None:
        """Forget the work on ``image_id`` (the person lost the image to someone else)."""
        self._annotations.pop(image_id, None)

    def annotate(
        self,
        image_id: str,
        image: np.ndarray,
        predictor: Predictor,
        existing: Sequence[dict[str, Any]],
        prefill: Sequence[dict[str, Any]] = (),
    ) -> Annotation:
        """What the person accepted on ``image_id`` so far (a copy; the person did the work).
        The session keeps the pre-fill the person did not delete itself."""
        return copy.deepcopy(self.work(image_id))


@dataclass
class Prediction:
    """The last masks shown for the object being drawn.

    Attributes:
        masks: (C, H, W) bool, C = 3 (ambiguous masks) or 1.
        scores: (C,) predicted IoUs.
        low_res: (C, h, w) logits, fed back as the mask prompt of the next click.
        clicks: the prompt that made them: points, then box corners (see module doc).
        rles: ``masks`` as COCO RLEs (encoded once: the page's answer and the undo stack).
    """

    masks: np.ndarray
    scores: np.ndarray
    low_res: np.ndarray
    clicks: list[Click]
    rles: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.rles:
            self.rles = [rle.encode(m) for m in self.masks]


@dataclass(frozen=True)
class Stroke:
    """One brush or eraser stroke (its pixels: see the module doc).

    Attributes:
        mode: ``brush`` (sets its pixels) or ``eraser`` (clears them).
        radius: the pen's radius in pixels, >= 1.
        points: (N, 2) int32 XY pixels of the stored image, N >= 1, inside it.
    """

    mode: str
    radius: int
    points: np.ndarray

    def footprint(self, height: int, width: int) -> tuple[tuple[slice, slice], np.ndarray]:
        """The pixels the stroke covers on an (H, W) grid: (rows, cols) slices of the grid and
        the (h, w) bool patch inside them. Drawn in the stroke's bounding box only (cv2's thick
        lines do not change when integer points are shifted), so a stroke costs its own size,
        not the image's."""
        r = self.radius
        (x0, y0), (x1, y1) = self.points.min(axis=0) - r, self.points.max(axis=0) + r + 1
        x0, y0, x1, y1 = max(int(x0), 0), max(int(y0), 0), min(int(x1), width), min(int(y1), height)
        patch = np.zeros((y1 - y0, x1 - x0), np.uint8)
        local = (self.points - np.array([x0, y0])).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(patch, [local], isClosed=False, color=1, thickness=2 * r)
        return (slice(y0, y1), slice(x0, x1)), patch.astype(bool)

    def paint(self, masks: np.ndarray) -> None:
        """Apply the stroke in place to ``masks``, (..., H, W) bool."""
        (rows, cols), patch = self.footprint(*masks.shape[-2:])
        region = masks[..., rows, cols]  # a view: the edit lands in ``masks``
        if self.mode == "brush":
            region |= patch
        else:
            region &= ~patch


@dataclass
class WebMask(AnnotatedMask):
    """A mask the person accepted, with what an edit of it needs.

    Attributes:
        model_mask: COCO RLE of the model's mask the strokes were painted on (the pre-filled
            mask for an edited pre-fill), None for a mask painted from nothing.
        from_prefill: it is a corrected pre-filled mask.
    """

    model_mask: dict[str, Any] | None = None
    from_prefill: bool = False


@dataclass
class _Reopened:
    """A stored mask of the image taken back for editing (:meth:`AnnotationSession.edit`)."""

    where: str  # "model": a pre-filled record; "web": one of the person's masks
    position: int  # where it was in its list, to put it back
    item: dict[str, Any] | WebMask  # the original, as it was
    mask: np.ndarray  # (H, W) bool, the original decoded

    def as_web_mask(self) -> WebMask:
        """The original as a person's mask (a pre-filled record: no clicks, strokes or time)."""
        if isinstance(self.item, WebMask):
            return self.item
        return WebMask(
            self.item["segmentation"],
            [],
            0.0,
            self.item.get("predicted_iou"),
            category=self.item.get("category"),
            model_mask=self.item["segmentation"],
            from_prefill=True,
        )


@dataclass
class _Object:
    """The object being drawn: the model's masks for its clicks (or a reopened mask, or an
    empty one) with its strokes painted over them."""

    prediction: Prediction | None = None
    reopened: _Reopened | None = None
    strokes: list[Stroke] = field(default_factory=list)
    edited: np.ndarray | None = None  # (C, H, W) bool: the base masks with the strokes painted
    # the object's actions, for undo: ("predict", the prediction before it, packed) | ("stroke",)
    history: list[tuple[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # working time (module doc)
    stroke_seconds: float = 0.0
    predictions: int = 0  # predictions asked for (for an abandoned object)

    @property
    def drawing(self) -> bool:
        return self.prediction is not None or self.reopened is not None or bool(self.strokes)


@dataclass
class _OpenImage:
    """The image being annotated and the work on it."""

    row: ImageInfo
    image: np.ndarray  # (H, W, 3) uint8 RGB, the stored pixel grid
    prefill: list[dict[str, Any]]  # generator records (semi stage), source "model"
    existing: list[dict[str, Any]]  # RLEs of earlier rounds' masks (shown, not editable)
    last_action: float  # clock time of the person's last action on the image
    encoded: tuple[bytes, str] | None = None  # the image as the page gets it, and its type
    object: _Object = field(default_factory=_Object)
    history: list[tuple[str, Any]] = field(default_factory=list)  # edits, for undo


@dataclass
class _Workspace:
    """One person's work in the session: their own predictor (its image embedding), writer (its
    claims are theirs), open image with its undo history and working-time clock, and lock."""

    annotator: WebAnnotator
    predictor: Predictor
    writer: StageWriter
    open: _OpenImage | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)
    # time.monotonic() when the open image's claim was last made fresh (taken or renewed)
    renewed_at: float = -math.inf


class AnnotationSession:
    """One round and stage of a store, annotated by people through the web page.

    Use as a context manager: entering reads the store's images and categories; leaving gives
    back the claims its people hold (their unfinished images go back to the queue). Other
    sessions (other ``maskmill serve`` processes, on any host sharing the store) and stage runs
    may work on the same round and stage at once: images are handed out by per-image claims
    (module doc).

    Args:
        store: the store (``Store`` or URL).
        round_: round number, >= 1.
        stage: ``manual`` or ``semi``.
        model: the model the page prompts.
        model_version: the stored model's version (``models/v<N>``), or None for a model from
            outside the store; written to the masks' ``model_version``.
        annotator: the person of ``user=None`` requests (a server without accounts; default
            ``WebAnnotator("web")``). A named user is ``WebAnnotator(<name>)``.
        generator_options: ``MaskGenerator`` options of the semi stage's pre-fill, over the
            stage grid and the model's ``semi`` preset; ignored for ``manual``.
        model_meta: the stored model's meta, for the round's metrics (held-out mIoU).
        clock: seconds of a monotonic clock, for working time (default ``time.monotonic``).
        claim_ttl_s: seconds a person's claim on their image lasts unless renewed (by any of
            their requests, or the page's heartbeat).
        embedding_cache: read and write image embeddings through the store's embedding cache
            (False: encode every image opened).
        prefill_concepts: semi stage: pre-fill every instance of these concepts.
        encoder_precision: what the image encoder computes in (``Predictor``): ``"fp32"``, or
            ``"bf16"`` / ``"fp16"`` autocast.
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
        clock: Callable[[], float] = time.monotonic,
        claim_ttl_s: float = CLAIM_TTL_S,
        embedding_cache: bool = True,
        prefill_concepts: Sequence[str] | None = None,
        encoder_precision: EncoderPrecision = "fp32",
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
        encoder_autocast_dtype(encoder_precision)  # a bad name fails before the page serves
        self.encoder_precision = encoder_precision
        self.embeddings = open_embedding_cache(self.store if embedding_cache else None, model)
        self.generator = None
        if stage == "semi":
            self.generator = stage_generator(model, "semi", generator_options, encoder_precision)
            check_prefill_concepts(model, prefill_concepts)
        elif prefill_concepts:
            raise ValueError("pre-fill by concept is the semi stage's (--stage semi)")
        self.prefill_concepts = list(prefill_concepts or [])
        self.claim_ttl_s = claim_ttl_s
        self.images: dict[str, ImageInfo] = {}
        self.categories: dict[str, int | None] = {}  # name -> category id (module doc)
        self.clock = clock
        self.finished: dict[str, Any] | None = None  # the rounds row, once every image is done
        self._workspaces: dict[str | None, _Workspace] = {}
        self._lock = threading.Lock()  # the workspaces and categories dicts
        # Model calls one at a time, clicks first; embeddings step aside between encoder blocks
        # (the generator's predictor, which has one image, is serialised by it too).
        self.lane = ComputeLane().attach(model.image_encoder)
        self.writer = self.workspace().writer  # the session's own person's

    # ------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> AnnotationSession:
        self.images = image_infos(self.store)
        self.categories = categories(self.store)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop: an open image with accepted work (an accept, a delete) is finished, as "next
        image" would (its masks are kept, as when a server stopped before claims); the other
        claims are given back, their images back to the queue (idempotent)."""
        with self._lock:
            workspaces = list(self._workspaces.values())
        for ws in workspaces:
            with ws.lock:
                work = ws.open
                if work is not None:
                    self._abandon(ws, work, self._worked(work))  # an edited mask goes back
                    # An image that is someone else's already has nothing to keep here.
                    with contextlib.suppress(ImageLostError):
                        if work.history:
                            self._write(ws, work)
                ws.open = None
                ws.writer.__exit__(None, None, None)
        self.lane.detach()

    def workspace(self, user: str | None = None) -> _Workspace:
        """The workspace of ``user`` (an account name; None: the session's own annotator),
        made on their first request."""
        with self._lock:
            ws = self._workspaces.get(user)
            if ws is None:
                annotator = self.annotator if user is None else WebAnnotator(user)
                # A person's claims are theirs on this server: the same person on two servers
                # gets two images, not one image twice.
                owner = f"{annotator.source} ({socket.gethostname()}:{os.getpid()}, serve)"
                writer = StageWriter(
                    self.store, self.round, self.stage, owner, self.claim_ttl_s, shared=True
                )
                ws = self._workspaces[user] = _Workspace(
                    annotator, Predictor(self.model, self.encoder_precision), writer.__enter__()
                )
            return ws

    def heartbeat(self, *, user: str | None = None) -> dict[str, Any]:
        """Renew the person's claim on their open image (the page calls it while open). Returns
        ``image_id`` (None when no image is open) and ``claim_ttl_s``; 409 when the claim was
        lost (the image went back to the queue)."""
        ws = self.workspace(user)
        with ws.lock:
            self._renew(ws)
            image_id = ws.open.row.image_id if ws.open is not None else None
            return {"image_id": image_id, "claim_ttl_s": self.claim_ttl_s}

    # -------------------------------------------------------------------------------- queries

    def state(self, *, user: str | None = None) -> dict[str, Any]:
        """The person's view: the image they annotate (their next one claimed and opened if
        none) and its masks; ``done`` when there is none for them, with ``waiting`` the images
        others still hold (0: every image of the round is done)."""
        ws = self.workspace(user)
        with ws.lock:
            self._renew(ws)
            if ws.open is None:
                self._open_next(ws)
            return self._state(ws)

    def image_bytes(self, image_id: str, *, user: str | None = None) -> tuple[bytes, str]:
        """(encoded bytes, media type) of a store image, decoded on the stored pixel grid (no
        EXIF turn, the grid masks refer to) and re-encoded as PNG (JPEG when large)."""
        ws = self.workspace(user)
        with ws.lock:
            row = self._row(image_id)
            # No claim renewal here: a lost image is told where the page can show it (the
            # JSON requests), not on an <img> fetch.
            if ws.open is not None and ws.open.row.image_id == image_id:
                if ws.open.encoded is None:
                    ws.open.encoded = _encode(ws.open.image)
                return ws.open.encoded
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
        *,
        user: str | None = None,
    ) -> dict[str, Any]:
        """Masks for a prompt on the open image, with the object's strokes painted over them.

        Args:
            image_id: the open image (else 409).
            points: ``[[x, y, label], ...]``: XY pixels of the image, label 1 fg / 0 bg.
            box: XYXY pixels, or None.
            mask_input_from_previous: feed the previous prediction's logits (mask
                ``previous_index``, default its best) back as the mask prompt (SAM's loop).
            previous_index: which previous mask to feed back (only with
                ``mask_input_from_previous``; else None, or 422).
            multimask: three ambiguous masks; default: only for a single point without a box or
                mask prompt (where a click is ambiguous), one mask otherwise.

        Returns:
            the object (:meth:`_object_view`: ``masks``, each a COCO compressed RLE
            ``{size: [h, w], counts: str}``, the store's own encoding, ``scores``, ``best``
            (index of the top score), ``clicks``, ``strokes``, ``seconds``...), ``image_id``,
            ``height``, ``width`` and ``decode_ms`` (prompt encoder + decoder + upsampling).

        Raises:
            SessionError: 404 unknown image, 409 not the open image or no previous
                prediction, 422 a malformed prompt (the predictor's message).
        """
        ws = self.workspace(user)
        with ws.lock:
            work = self._current(ws, image_id)
            height, width = work.image.shape[:2]
            coords = np.asarray([p[:2] for p in points], np.float64).reshape(-1, 2)
            labels = np.asarray([p[2] for p in points], np.int64).reshape(-1)
            box_array = None if box is None else np.asarray(box, np.float64).reshape(4)
            mask_input = None
            if previous_index is not None and not mask_input_from_previous:
                # Checked always: an index that would be ignored is a client bug to report.
                raise SessionError(
                    422,
                    f"previous_index {previous_index} needs mask_input_from_previous: true "
                    "(send null otherwise)",
                )
            if mask_input_from_previous:
                previous = work.object.prediction
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
            try:
                # The lane: one model call at a time, clicks before embeddings (engine.web.lane).
                with self.lane.turn(CLICK), torch.inference_mode():
                    started = time.perf_counter()
                    masks, scores, low_res = ws.predictor.predict(
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
            obj = work.object
            obj.history.append(("predict", _packed(obj.prediction)))
            obj.prediction = Prediction(masks, scores, low_res, clicks)
            obj.predictions += 1
            obj.seconds += self._worked(work)
            self._repaint(work)
            return {
                "image_id": image_id,
                "height": height,
                "width": width,
                **self._object_view(work),
                "decode_ms": decode_ms,
            }

    def stroke(
        self,
        image_id: str,
        mode: str,
        radius: int,
        points: Sequence[Sequence[int]],
        *,
        user: str | None = None,
    ) -> dict[str, Any]:
        """Paint a brush or eraser stroke on the object being drawn; with nothing drawn, on an
        empty mask (an object painted by hand).

        Args:
            image_id: the open image (else 409).
            mode: ``brush`` or ``eraser``.
            radius: the pen's radius in pixels, 1..``MAX_RADIUS``.
            points: ``[[x, y], ...]``, 1..``MAX_STROKE_POINTS`` integer XY pixels inside the
                image: the polyline the pen follows.

        Returns:
            the object (:meth:`_object_view`) and ``image_id``.

        Raises:
            SessionError: 404 unknown image, 409 not the open image, 422 a malformed stroke or
                ``MAX_STROKES`` strokes on the object already.
        """
        ws = self.workspace(user)
        with ws.lock:
            work = self._current(ws, image_id)
            stroke = check_stroke(mode, radius, points, *work.image.shape[:2])
            obj = work.object
            if len(obj.strokes) >= MAX_STROKES:
                raise SessionError(
                    422, f"the object has {MAX_STROKES} strokes already: accept it or clear it"
                )
            gap = self._worked(work)
            obj.seconds += gap
            obj.stroke_seconds += gap
            if obj.edited is None:  # the first stroke: paint on a copy of the base masks
                obj.edited = self._base(work).copy()
            obj.strokes.append(stroke)
            obj.history.append(("stroke", None))
            stroke.paint(obj.edited)
            return {"image_id": image_id, **self._object_view(work)}

    # --------------------------------------------------------------------------------- edits

    def accept(
        self,
        image_id: str,
        mask: int | None = None,
        category: str | None = None,
        *,
        user: str | None = None,
    ) -> dict[str, Any]:
        """Accept mask ``mask`` (default the best) of the object, strokes painted: it joins the
        image's annotation with its clicks, strokes, working seconds and ``model_iou`` (module
        doc), and the image's shard is rewritten. Returns the new state.

        Args:
            image_id: the open image (else 409).
            mask: index into the object's masks (the ambiguous masks of a single click).
            category: the object's category name (:func:`check_category`); None keeps an edited
                mask's own, else none.
        """
        ws = self.workspace(user)
        with ws.lock:
            work = self._current(ws, image_id)
            obj = work.object
            if not obj.drawing:
                raise SessionError(409, "nothing to accept: click on an object or paint it first")
            masks = self._masks(work)
            index = self._best(obj) if mask is None else mask
            if not 0 <= index < len(masks):
                raise SessionError(
                    422, f"mask {index} is out of range: the object has {len(masks)} masks"
                )
            segmentation = rle.encode(masks[index])
            if not int(rle.areas([segmentation])[0]):
                raise SessionError(422, f"mask {index} is empty: nothing to accept")
            name = check_category(category)
            obj.seconds += self._worked(work)
            prior = obj.reopened.as_web_mask() if obj.reopened is not None else None
            if obj.prediction is not None:
                model_mask = rle.encode(obj.prediction.masks[index])
                clicks = list(obj.prediction.clicks)
                predicted_iou = float(obj.prediction.scores[index])
            elif prior is not None:
                model_mask, clicks, predicted_iou = (
                    prior.model_mask,
                    prior.clicks,
                    prior.predicted_iou,
                )
            else:  # painted from nothing: the model drew no part of it
                model_mask, clicks, predicted_iou = None, [], None
            model_iou = None
            if model_mask is not None:
                model_iou = float(rle.ious([model_mask], [segmentation])[0, 0])
            if name is None and prior is not None:
                name = prior.category
            with self._lock:  # the categories are everybody's
                if name is not None and name not in self.categories:
                    known = [i for i in self.categories.values() if i is not None]
                    self.categories[name] = max(known, default=0) + 1
            accepted = WebMask(
                segmentation,
                list(clicks),
                (prior.seconds if prior else 0.0) + obj.seconds,
                predicted_iou,
                strokes=(prior.strokes if prior else 0) + len(obj.strokes),
                stroke_seconds=(prior.stroke_seconds if prior else 0.0) + obj.stroke_seconds,
                model_iou=model_iou,
                category=name,
                model_mask=model_mask,
                from_prefill=bool(prior and prior.from_prefill),
            )
            annotation = ws.annotator.work(image_id)
            reopened = obj.reopened
            # An edited mask of the person's goes back where it was; any other is appended.
            if reopened is not None and reopened.where == "web":
                position = reopened.position
            else:
                position = len(annotation.masks)
            corrected = reopened is not None and reopened.where == "model"
            annotation.masks.insert(position, accepted)
            annotation.prefill_corrected += int(corrected)
            work.history.append(("accept", (position, corrected)))
            work.object = _Object()
            self._write(ws, work, keep_claim=True)
            return self._state(ws)

    def undo(self, image_id: str, *, user: str | None = None) -> dict[str, Any]:
        """Undo the object's last stroke or click (the prediction before the click comes back);
        with none, the image's last accept, delete or edit. Returns the state."""
        ws = self.workspace(user)
        with ws.lock:
            work = self._current(ws, image_id)
            obj = work.object
            if obj.history:
                kind, packed = obj.history.pop()
                obj.seconds += self._worked(work)
                if kind == "stroke":
                    obj.strokes.pop()
                else:
                    obj.prediction = _unpacked(packed)
                self._repaint(work)
                return self._state(ws)
            if not work.history:
                raise SessionError(409, "nothing to undo on this image")
            self._worked(work)  # between objects: no mask's time
            kind, payload = work.history.pop()
            annotation = ws.annotator.work(image_id)
            if kind == "accept":
                position, corrected = payload
                annotation.masks.pop(position)
                annotation.prefill_corrected -= int(corrected)
            else:  # a delete or an edit: the mask goes back where it was, as it was
                self._insert(ws, work, *payload)
                if kind == "delete" and payload[0] == "model":
                    annotation.prefill_deleted -= 1
                if kind == "edit":
                    work.object = _Object()
            self._write(ws, work, keep_claim=True)
            return self._state(ws)

    def delete(self, image_id: str, index: int, *, user: str | None = None) -> dict[str, Any]:
        """Delete mask ``index`` of the image's masks as the state lists them (pre-filled first,
        then the person's); rewrites its shard."""
        ws = self.workspace(user)
        with ws.lock:
            work = self._current(ws, image_id)
            if work.object.reopened is not None:
                raise SessionError(409, "a mask is being edited: accept it or clear it (Esc) first")
            annotation = ws.annotator.work(image_id)
            where, position = self._locate(ws, work, index)
            self._worked(work)  # between objects: no mask's time
            items = work.prefill if where == "model" else annotation.masks
            work.history.append(("delete", (where, position, items.pop(position))))
            annotation.prefill_deleted += int(where == "model")
            self._write(ws, work, keep_claim=True)
            return self._state(ws)

    def edit(self, image_id: str, index: int, *, user: str | None = None) -> dict[str, Any]:
        """Take mask ``index`` of the image's masks (as the state lists them) back as the object
        being drawn, for strokes (module doc). The shard is rewritten when it is accepted; Esc,
        undo or "next image" put it back unchanged. Returns the state."""
        ws = self.workspace(user)
        with ws.lock:
            work = self._current(ws, image_id)
            if work.object.drawing:
                raise SessionError(
                    409,
                    f"an object is being drawn: accept it or clear it (Esc) before editing mask "
                    f"{index}",
                )
            where, position = self._locate(ws, work, index)
            items = work.prefill if where == "model" else ws.annotator.work(image_id).masks
            item = items.pop(position)
            segmentation = item.segmentation if isinstance(item, WebMask) else item["segmentation"]
            work.history.append(("edit", (where, position, item)))
            work.object.reopened = _Reopened(where, position, item, rle.decode(segmentation))
            work.object.seconds += self._worked(work)
            return self._state(ws)

    def clear(self, image_id: str, *, user: str | None = None) -> dict[str, Any]:
        """Drop the object being drawn (its time counts as abandoned; an edited mask goes back
        unchanged). Returns the state."""
        ws = self.workspace(user)
        with ws.lock:
            work = self._current(ws, image_id)
            self._abandon(ws, work, self._worked(work))
            return self._state(ws)

    def next_image(self, image_id: str, *, user: str | None = None) -> dict[str, Any]:
        """Finish the open image (its shard is written under the person's claim, also with no
        masks; the image is done) and open the person's next one. When none is left, the
        round's row is written to the rounds table."""
        ws = self.workspace(user)
        with ws.lock:
            work = self._current(ws, image_id)
            self._abandon(ws, work, self._worked(work))
            self._write(ws, work)
            ws.open = None
            self._open_next(ws)
            return self._state(ws)

    # ------------------------------------------------------------------------------ internals

    def _row(self, image_id: str) -> ImageInfo:
        # A dict lookup, never a path: ids that are not the store's are simply unknown.
        row = self.images.get(image_id) if isinstance(image_id, str) else None
        if row is None:
            raise SessionError(404, f"no image {image_id!r} in this store")
        return row

    def _current(self, ws: _Workspace, image_id: str) -> _OpenImage:
        self._row(image_id)
        self._renew(ws)
        if ws.open is None:
            self._open_next(ws)
        if ws.open is None or ws.open.row.image_id != image_id:
            current = ws.open.row.image_id if ws.open else None
            raise SessionError(
                409, f"image {image_id} is not the one being annotated (that is {current})"
            )
        return ws.open

    def _renew(self, ws: _Workspace) -> None:
        """Renew the person's claim on their open image. A claim that is no longer theirs (it
        expired and another person took the image, or finished it) drops the image's work here
        and raises :class:`ImageLostError`."""
        if ws.open is None:
            return
        # A claim made fresh less than a quarter of its lifetime ago cannot have been taken
        # since (only an expired one can): no store round trip on every click.
        if time.monotonic() - ws.renewed_at < ws.writer.claims.ttl_s / 4:
            return
        try:
            ws.writer.claims.renew(ws.open.row.image_id)
        except ClaimLostError as error:
            raise self._lost(ws, error) from None
        ws.renewed_at = time.monotonic()

    def _lost(self, ws: _Workspace, error: Exception) -> ImageLostError:
        """Drop the person's open image (it is someone else's now) and say so."""
        image_id = ws.open.row.image_id
        ws.annotator.drop(image_id)
        ws.open = None
        return ImageLostError(
            409,
            f"image {image_id} is no longer yours: your claim on it expired and it went back to "
            f"the queue ({error}). What you did on it was not saved; the next request opens "
            "another image.",
        )

    def _open_next(self, ws: _Workspace) -> None:
        """Claim and open the person's next image: the first, by id, neither done nor failed
        that nobody else holds; read it, embed it, pre-fill it (semi). With none to claim, the
        round's row is written if no image is pending either."""
        ids = sorted(self.images)
        pending = ws.writer.pending(ids)
        while (image_id := ws.writer.claims.claim_next(pending)) is not None:
            ws.renewed_at = time.monotonic()
            row = self.images[image_id]
            image = read_stored_image(ws.writer, row)  # None: failure recorded, claim released
            if image is None:
                pending = pending[pending.index(image_id) + 1 :]
                continue
            with self.lane.turn(EMBED), torch.inference_mode():
                # The embedding: once per image, for the pre-fill and every click.
                prefill = encode_and_prefill(
                    ws.predictor,
                    self.generator,
                    image,
                    image_id,
                    self.embeddings,
                    self.prefill_concepts,
                )
            existing = existing_masks(self.store, [image_id], self.round)[image_id]
            ws.open = _OpenImage(row, image, prefill, existing, self.clock())
            return
        ws.open = None
        # The round is complete when no image is pending: the metrics (DuckDB over the stored
        # masks) are computed only then.
        if self.finished is None and not ws.writer.pending(ids):
            figures = stage_figures(self.store, self.round, self.stage)  # once, metrics and row
            self.finished = ws.writer.finish_if_complete(
                ids,
                model_version=self.model_version,
                metrics=stage_metrics(figures, self.stage, self.model_meta),
                figures=figures,
            )

    def _abandon(self, ws: _Workspace, work: _OpenImage, gap: float) -> None:
        """Drop the object being drawn: a new object counts as abandoned (the Annotation's
        fields), an edited mask goes back unchanged; either way its time is abandoned time."""
        obj = work.object
        if obj.drawing:
            annotation = ws.annotator.work(work.row.image_id)
            annotation.abandoned_seconds += obj.seconds + gap
            if obj.reopened is not None:
                # While a mask is edited nothing else enters the image's history (delete and
                # edit are refused): its "edit" entry is the last.
                _, payload = work.history.pop()
                self._insert(ws, work, *payload)
            else:
                annotation.abandoned += 1
                annotation.abandoned_clicks += obj.predictions
        work.object = _Object()

    def _worked(self, work: _OpenImage) -> float:
        """Working seconds since the person's last action on the image (capped at
        ``IDLE_CAP_S``); this action becomes the last."""
        now = self.clock()
        gap = min(max(now - work.last_action, 0.0), IDLE_CAP_S)
        work.last_action = now
        return gap

    def _locate(self, ws: _Workspace, work: _OpenImage, index: int) -> tuple[str, int]:
        """(list, position) of mask ``index`` as the state lists them: pre-fill, then the
        person's."""
        annotation = ws.annotator.work(work.row.image_id)
        total = len(work.prefill) + len(annotation.masks)
        if not 0 <= index < total:
            raise SessionError(422, f"index {index} is out of range: the image has {total} masks")
        if index < len(work.prefill):
            return "model", index
        return "web", index - len(work.prefill)

    def _insert(
        self, ws: _Workspace, work: _OpenImage, where: str, position: int, item: Any
    ) -> None:
        """Put a deleted or edited mask back where it was."""
        items = work.prefill if where == "model" else ws.annotator.work(work.row.image_id).masks
        items.insert(position, item)

    @staticmethod
    def _base(work: _OpenImage) -> np.ndarray:
        """(C, H, W) bool: the masks the object's strokes are painted on (the model's, or the
        edited mask, or an empty one)."""
        obj = work.object
        if obj.prediction is not None:
            return obj.prediction.masks
        if obj.reopened is not None:
            return obj.reopened.mask[None]
        return np.zeros((1, *work.image.shape[:2]), bool)

    def _masks(self, work: _OpenImage) -> np.ndarray:
        """(C, H, W) bool: the object's masks as they would be stored."""
        edited = work.object.edited
        return edited if edited is not None else self._base(work)

    def _repaint(self, work: _OpenImage) -> None:
        """Paint every stroke again over the object's (new) base masks."""
        obj = work.object
        obj.edited = None
        if obj.strokes:
            obj.edited = self._base(work).copy()
            for stroke in obj.strokes:
                stroke.paint(obj.edited)

    @staticmethod
    def _best(obj: _Object) -> int:
        return int(np.argmax(obj.prediction.scores)) if obj.prediction is not None else 0

    def _object_view(self, work: _OpenImage) -> dict[str, Any] | None:
        """The object as the page shows it, None when nothing is drawn: ``masks`` (COCO
        RLEs, strokes painted), ``scores`` (predicted IoUs; null for a painted mask), ``best``,
        ``clicks`` (the prompt, ``[[x, y, label], ...]``, box corners labelled 2 and 3),
        ``strokes``, ``seconds`` and ``stroke_seconds`` (working time so far), ``refinable``
        (the last prediction's logits can be fed back) and ``editing`` (``model`` or ``web``
        for a mask taken back by :meth:`edit`, else None)."""
        obj = work.object
        if not obj.drawing:
            return None
        if obj.prediction is not None:
            scores = [float(s) for s in obj.prediction.scores]
            clicks = obj.prediction.clicks
        elif obj.reopened is not None:
            prior = obj.reopened.as_web_mask()
            scores, clicks = [prior.predicted_iou], prior.clicks
        else:
            scores, clicks = [None], []
        if obj.edited is None and obj.prediction is not None:
            masks = obj.prediction.rles  # unedited: encoded once, when predicted
        else:
            masks = [rle.encode(m) for m in self._masks(work)]
        return {
            "masks": masks,
            "scores": scores,
            "best": self._best(obj),
            "clicks": [[float(x), float(y), int(label)] for x, y, label in clicks],
            "strokes": len(obj.strokes),
            "seconds": obj.seconds,
            "stroke_seconds": obj.stroke_seconds,
            "refinable": obj.prediction is not None,
            "editing": obj.reopened.where if obj.reopened is not None else None,
        }

    def _records(self, ws: _Workspace, work: _OpenImage) -> list[dict[str, Any]]:
        """The image's mask records, as ``engine.stages`` builds them: pre-fill, then the
        annotator's masks (through the Annotator contract)."""
        image_id = work.row.image_id
        annotation = ws.annotator.annotate(
            image_id,
            work.image,
            ws.predictor,
            work.existing,
            [record["segmentation"] for record in work.prefill],
        )
        records = [dict(r) for r in work.prefill]
        records.extend(annotation.records(ws.annotator.source))
        for index, record in enumerate(records):
            record.update(image_id=image_id, index=index)
            if record.get("category") is not None and record.get("category_id") is None:
                record["category_id"] = self.categories.get(record["category"])
        return records

    def _write(self, ws: _Workspace, work: _OpenImage, keep_claim: bool = False) -> None:
        """Commit the image's shard under the person's claim: at every accept, delete and undo
        of one (``keep_claim``: the claim stays theirs and the next commit replaces the shard,
        so nothing accepted is lost when a browser dies), and when they finish the image (the
        claim is released)."""
        try:
            ws.writer.write_masks(
                work.row.image_id,
                self._records(ws, work),
                keep_claim=keep_claim,
                model_version=self.model_version,
            )
        except (ClaimLostError, ImageDoneError) as error:  # it went to someone else meanwhile
            raise self._lost(ws, error) from None

    def _state(self, ws: _Workspace) -> dict[str, Any]:
        ids = sorted(self.images)
        base = {
            "round": self.round,
            "stage": self.stage,
            "annotator": ws.annotator.source,
            "model_version": self.model_version,
            "total": len(ids),
            "categories": sorted(self.categories),
            "idle_cap_s": IDLE_CAP_S,
            "max_radius": MAX_RADIUS,
            "max_stroke_points": MAX_STROKE_POINTS,
        }
        work = ws.open
        if work is None:
            # No image for this person: the round is complete, or the images left are held
            # by others (``waiting``; one of them may come back to the queue).
            return {
                **base,
                "done": True,
                "waiting": len(ws.writer.pending(ids)),
                "image": None,
                "masks": [],
                "existing": [],
                "object": None,
                "can_undo": False,
            }
        image_id = work.row.image_id
        masks = []
        for record in self._records(ws, work):
            masks.append(
                {
                    "index": record["index"],
                    "source": record["source"],
                    "predicted_iou": record.get("predicted_iou"),
                    "clicks": record.get("clicks"),
                    "seconds": record.get("seconds"),
                    "strokes": record.get("strokes"),
                    "model_iou": record.get("model_iou"),
                    "category": record.get("category"),
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
            "object": self._object_view(work),
            "can_undo": bool(work.history or work.object.history),
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
    model for round ``round_`` (``engine.plan.model_for_round``: the newest promoted version
    trained before it, else the newest promoted one); else the
    shipped default model (``model.load_model``).

    Raises:
        FileNotFoundError: none of those exists.
    """
    metas = store.model_metas()
    stored = [m for m in metas if m["uri"] == checkpoint] if checkpoint else []
    if not checkpoint and metas:
        try:  # the same choice as the stages: the newest promoted version before the round
            stored = [model_for_round(store, round_)]
        except LookupError:  # every stored version is from this round or later: the newest
            stored = [model_for_round(store, max(int(m.get("round") or 0) for m in metas) + 1)]
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


def check_stroke(mode: Any, radius: Any, points: Any, height: int, width: int) -> Stroke:
    """A stroke's parts checked against an (H, W) image: ``mode`` ``brush`` / ``eraser``,
    ``radius`` an integer 1..``MAX_RADIUS``, ``points`` 1..``MAX_STROKE_POINTS`` integer
    ``[x, y]`` pixels inside the image. Raises SessionError 422 naming what is wrong."""
    if mode not in STROKE_MODES:
        raise SessionError(422, f"mode must be 'brush' or 'eraser', got {mode!r}")
    if not _integer(radius) or not 1 <= radius <= MAX_RADIUS:
        raise SessionError(
            422, f"radius must be an integer number of pixels, 1..{MAX_RADIUS}, got {radius!r}"
        )
    if not isinstance(points, (list, tuple)) or not points:
        raise SessionError(422, "points must be a non-empty list of [x, y] pixels")
    if len(points) > MAX_STROKE_POINTS:
        raise SessionError(
            422, f"points: at most {MAX_STROKE_POINTS} per stroke, got {len(points)}"
        )
    for i, point in enumerate(points):
        if not isinstance(point, (list, tuple)) or len(point) != 2 or not all(map(_integer, point)):
            raise SessionError(422, f"points[{i}] must be [x, y] integer pixels: {point!r}")
        if not (0 <= point[0] < width and 0 <= point[1] < height):
            raise SessionError(
                422,
                f"points[{i}] = {list(point)} is outside the image ({width} x {height}, W x H)",
            )
    return Stroke(str(mode), int(radius), np.asarray(points, np.int32).reshape(-1, 2))


def check_category(category: Any) -> str | None:
    """A category name: None, or a string of 1..``MAX_CATEGORY_CHARS`` printable characters
    (surrounding spaces dropped). Raises SessionError 422 otherwise."""
    if category is None:
        return None
    if not isinstance(category, str):
        raise SessionError(422, f"category must be a string or null, got {category!r}")
    name = category.strip()
    if not 1 <= len(name) <= MAX_CATEGORY_CHARS or not name.isprintable():
        raise SessionError(
            422,
            f"category must be 1..{MAX_CATEGORY_CHARS} printable characters, got {category!r}",
        )
    return name


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _packed(prediction: Prediction | None) -> tuple | None:
    """A prediction for the undo stack: its masks as RLEs (a few KB, not H x W bytes each)."""
    if prediction is None:
        return None
    return prediction.rles, prediction.scores, prediction.low_res, prediction.clicks


def _unpacked(packed: tuple | None) -> Prediction | None:
    if packed is None:
        return None
    rles, scores, low_res, clicks = packed
    return Prediction(np.stack([rle.decode(m) for m in rles]), scores, low_res, clicks, rles)
