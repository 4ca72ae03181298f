"""Review mode of the annotation page (SAM 3's data engine calls it mask verification).

A reviewer sees another person's accepted masks of an image, approves or rejects each, and may
correct a rejected one (brush and eraser strokes, painted exactly as the annotation page paints
them: :class:`~engine.web.session.Stroke`, or a whole COCO RLE). :class:`ReviewDesk` holds what
one server reviews: the masks of its round and stage. Verdicts go to the store's reviews table
(:func:`storage.reviews.write_verdicts`); what they change downstream is
:func:`storage.queries.reviewed_masks`'s:

- a rejected mask no longer covers its object, so the next round that annotates the image (the
  annotation queue offers every image each round) shows the object as missing and it is drawn
  again; a correction covers it in the rejected mask's place;
- retraining and export take a round and stage's approved masks once it has verdicts.

The queue: images of the round and stage with a person's masks that have no verdict yet, never
the reviewer's own masks (the reviewer's id is the ``source`` their own masks carry,
``web:<name>``), by image id. An image handed to a reviewer is kept from other reviewers of this
server for :data:`HANDOUT_TTL_S` seconds after it was last handed out (a page left open gets it
back on reload); a mask another reviewer judged meanwhile (another server) is refused with 409.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from maskmill.engine.web.session import (
    IDLE_CAP_S,
    MAX_RADIUS,
    MAX_STROKE_POINTS,
    MAX_STROKES,
    SessionError,
    WebAnnotator,
    check_stroke,
)
from maskmill.storage import Store, rle
from maskmill.storage.images import ImageInfo
from maskmill.storage.queries import review_masks, review_queue
from maskmill.storage.reviews import write_verdicts

HANDOUT_TTL_S = 120.0
MAX_VERDICTS = 1000  # masks judged in one request; an image has far fewer
_VERDICT_FIELDS = {"mask_id", "verdict", "reason", "seconds", "correction", "strokes"}


def reviewer_id(person: str | None, own_source: str) -> str:
    """A reviewer's id: the ``source`` their own masks carry, so "never their own masks" is one
    comparison. An account's ``web:<name>`` (:class:`WebAnnotator`'s), or without accounts
    (``person`` None) ``own_source``, the session's own annotator's."""
    return own_source if person is None else WebAnnotator(person).source


class ReviewDesk:
    """Review of one round and stage of a store, for any number of reviewers at once.

    Args:
        store: the store.
        round_: the round reviewed.
        stage: the stage reviewed.
        images: the store's images by id (the session's; unknown ids are 404).
        clock: monotonic seconds, for hand-outs (default ``time.monotonic``).
    """

    def __init__(
        self,
        store: Store,
        round_: int,
        stage: str,
        images: Mapping[str, ImageInfo],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.round = int(round_)
        self.stage = stage
        self.images = images
        self.clock = clock
        self._handed: dict[str, tuple[str, float]] = {}  # image id -> (reviewer, when)
        self._lock = threading.Lock()

    def next(self, reviewer: str) -> dict[str, Any]:
        """The page's state for ``reviewer``: the image to review (the one already handed to
        them, else the first in the queue nobody else holds) with its masks waiting for their
        verdict, or ``done`` when none is left."""
        with self._lock:
            now = self.clock()
            queue = review_queue(self.store, self.round, self.stage, reviewer)
            # Expired hand-outs are dropped here, so the map holds live ones only.
            self._handed = {
                image_id: (who, when)
                for image_id, (who, when) in self._handed.items()
                if now - when < HANDOUT_TTL_S
            }
            held = {image_id: who for image_id, (who, _) in self._handed.items()}
            mine = [i for i in queue if held.get(i) == reviewer]
            free = [i for i in queue if i not in held]
            chosen = (mine or free or [None])[0]
            base = {
                "mode": "review",
                "reviewer": reviewer,
                "round": self.round,
                "stage": self.stage,
                "remaining": len(mine) + len(free),
                "idle_cap_s": IDLE_CAP_S,
                "max_radius": MAX_RADIUS,
                "max_stroke_points": MAX_STROKE_POINTS,
            }
            if chosen is None or chosen not in self.images:
                return {**base, "done": True, "image": None, "masks": [], "others": []}
            self._handed[chosen] = (reviewer, now)
            row = self.images[chosen]
            masks = review_masks(self.store, chosen, self.round, self.stage)
            pending = [m for m in masks if _pending(m, reviewer)]
            return {
                **base,
                "done": False,
                "image": {
                    "image_id": chosen,
                    "url": f"/api/images/{chosen}",
                    "width": row.width,
                    "height": row.height,
                },
                "masks": [
                    {
                        "mask_id": m["mask_id"],
                        "source": m["source"],
                        "category": m["category"],
                        "predicted_iou": m["predicted_iou"],
                        "seconds": m["seconds"],
                        "clicks": m["clicks"],
                        "strokes": m["strokes"],
                        "mask": m["segmentation"],
                    }
                    for m in pending
                ],
                # The image's other masks of the round and stage (the model's pre-fill, the
                # reviewer's own, those already judged), shown for context.
                "others": [
                    {"source": m["source"], "verdict": m["verdict"], "mask": m["segmentation"]}
                    for m in masks
                    if not _pending(m, reviewer)
                ],
            }

    def submit(self, reviewer: str, image_id: str, body: Any) -> dict[str, Any]:
        """Store ``reviewer``'s verdicts on masks of ``image_id`` and return the next state
        (with ``stored``: how many verdicts were stored).

        ``body``: ``{"verdicts": [{mask_id, verdict: "approved" | "rejected", reason?,
        seconds?, correction?: COCO RLE, strokes?: [{mode, radius, points}, ...]}, ...]}``;
        ``strokes`` (or ``correction``, not both) correct a rejected mask: the strokes are
        painted over the mask in order.

        Raises:
            SessionError: 404 unknown image, 403 the reviewer's own mask, 409 a mask judged
                meanwhile by someone else, 422 anything malformed (nothing is stored then).
        """
        if not isinstance(image_id, str) or image_id not in self.images:
            raise SessionError(404, f"no image {image_id!r} in this store")
        items = _verdict_items(body)
        with self._lock:
            masks = {m["mask_id"]: m for m in review_masks(self.store, image_id)}
            verdicts = []
            for i, item in enumerate(items):
                where = f"verdicts[{i}]"
                mask = masks.get(item.get("mask_id"))
                if mask is None or (mask["round"], mask["stage"]) != (self.round, self.stage):
                    raise SessionError(
                        422,
                        f"{where}: no mask {item.get('mask_id')!r} of image {image_id} in round "
                        f"{self.round} ({self.stage})",
                    )
                if mask["source"] == reviewer:
                    raise SessionError(403, f"{where}: mask {mask['mask_id']} is your own")
                if mask["verdict"] is not None:
                    raise SessionError(
                        409,
                        f"{where}: mask {mask['mask_id']} was reviewed meanwhile by "
                        f"{mask['reviewer']} ({mask['verdict']})",
                    )
                verdicts.append(_with_correction(where, item, mask))
            try:
                write_verdicts(self.store, reviewer, image_id, verdicts)
            except ValueError as error:
                raise SessionError(422, str(error)) from None
            self._handed.pop(image_id, None)
        return {"stored": len(verdicts), **self.next(reviewer)}


def _pending(mask: Mapping[str, Any], reviewer: str) -> bool:
    """A mask waiting for ``reviewer``'s verdict: a person's, not theirs, not judged yet."""
    return mask["reviewable"] and mask["source"] != reviewer and mask["verdict"] is None


def _verdict_items(body: Any) -> list[dict[str, Any]]:
    """The request's verdicts, each a JSON object of known fields (values: write_verdicts)."""
    if not isinstance(body, dict) or set(body) != {"verdicts"}:
        raise SessionError(422, "send {verdicts: [{mask_id, verdict, ...}, ...]}")
    items = body["verdicts"]
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_VERDICTS:
        raise SessionError(422, f"verdicts must be a list of 1..{MAX_VERDICTS} objects")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise SessionError(422, f"verdicts[{i}] must be an object")
        unknown = sorted(set(item) - _VERDICT_FIELDS)
        if unknown:
            raise SessionError(
                422,
                f"verdicts[{i}]: unknown field(s) {unknown}; expected: "
                + ", ".join(sorted(_VERDICT_FIELDS)),
            )
        if item.get("correction") is not None and item.get("strokes") is not None:
            raise SessionError(422, f"verdicts[{i}]: give a correction or strokes, not both")
    return items


def _with_correction(where: str, item: dict[str, Any], mask: Mapping[str, Any]) -> dict[str, Any]:
    """The verdict as ``write_verdicts`` takes it: strokes painted into a correction RLE."""
    verdict = {k: v for k, v in item.items() if k != "strokes"}
    strokes = item.get("strokes")
    if strokes is None:
        return verdict
    if not isinstance(strokes, list) or not 1 <= len(strokes) <= MAX_STROKES:
        raise SessionError(422, f"{where}: strokes must be a list of 1..{MAX_STROKES} strokes")
    segmentation = mask["segmentation"]
    height, width = segmentation["size"]
    painted = rle.decode(segmentation)[None]  # (1, H, W): Stroke.paint edits (..., H, W)
    for j, stroke in enumerate(strokes):
        if not isinstance(stroke, dict) or set(stroke) != {"mode", "radius", "points"}:
            raise SessionError(422, f"{where}: strokes[{j}] must be {{mode, radius, points}}")
        try:
            check_stroke(stroke["mode"], stroke["radius"], stroke["points"], height, width).paint(
                painted
            )
        except SessionError as error:
            raise SessionError(422, f"{where}: strokes[{j}]: {error.message}") from None
    verdict["correction"] = rle.encode(painted[0])
    return verdict
