"""Review verdicts (mask verification): a reviewer approves or rejects a person's masks, and may
correct a rejected one.

Verdicts go to the ``reviews`` table (``storage.schema.REVIEWS``), one shard per submission:
``reviews/part-<image_id>-<digest>.parquet``, the digest of the reviewer and the mask ids judged,
so a submission sent twice (a retried request, a reviewer changing their mind about the same
masks) replaces its shard, and two reviewers' verdicts never share one. Shards are committed by
the store's commit protocol (:meth:`Store.write_shard`). The verdict that counts for a mask is
its newest (``storage.queries.LATEST_VERDICTS``); how verdicts change what training and export
read is ``storage.queries.reviewed_masks``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from maskmill.storage import rle
from maskmill.storage.queries import review_masks
from maskmill.storage.schema import REVIEWS, VERDICTS
from maskmill.storage.store import Store, check_key

MAX_REASON_CHARS = 500


def write_verdicts(
    store: Store | str,
    reviewer: str,
    image_id: str,
    verdicts: Sequence[Mapping[str, Any]],
    reviewed_at: dt.datetime | None = None,
) -> str:
    """Commit ``reviewer``'s verdicts on masks of ``image_id``; return the shard's path.

    Args:
        store: the store.
        reviewer: the reviewer's annotator id, as the masks' ``source`` names people
            (``web:<name>``); a reviewer never judges their own masks.
        image_id: the image the masks are of.
        verdicts: one per mask, each ``mask_id``, ``verdict`` (``approved`` / ``rejected``),
            optional ``reason`` (text, up to ``MAX_REASON_CHARS``), ``seconds`` (the reviewer's
            working time on it) and ``correction`` (a rejected mask's corrected COCO RLE, of
            the mask's size and not empty).
        reviewed_at: the verdicts' time (default now, UTC).

    Raises:
        ValueError: naming the verdict that is wrong: an unknown mask, one of another image, one
            nobody reviews (the model's or ground truth), the reviewer's own, a mask judged
            twice, a bad verdict, reason, time or correction. Nothing is written then.
    """
    store = store if isinstance(store, Store) else Store(store)
    if not isinstance(reviewer, str) or not reviewer:
        raise ValueError(f"reviewer must be a non-empty string, got {reviewer!r}")
    if not verdicts:
        raise ValueError("no verdicts to store")
    masks = {m["mask_id"]: m for m in review_masks(store, image_id)}
    stamp = reviewed_at or dt.datetime.now(dt.timezone.utc)
    rows: list[dict[str, Any]] = []
    for i, item in enumerate(verdicts):
        rows.append(_row(f"verdicts[{i}]", item, masks, reviewer, image_id, stamp))
    ids = [row["mask_id"] for row in rows]
    repeated = sorted({m for m in ids if ids.count(m) > 1})
    if repeated:
        raise ValueError(f"mask(s) {repeated} judged more than once in one submission")
    digest = hashlib.blake2b(
        "\x1f".join([reviewer, *sorted(ids)]).encode(), digest_size=8
    ).hexdigest()
    key = f"{check_key(image_id, 'image id')}-{digest}"
    return store.write_shard("reviews", pa.Table.from_pylist(rows, REVIEWS), key)


def _row(
    where: str,
    item: Mapping[str, Any],
    masks: Mapping[str, dict[str, Any]],
    reviewer: str,
    image_id: str,
    stamp: dt.datetime,
) -> dict[str, Any]:
    """The reviews row of one verdict, checked (module doc of :func:`write_verdicts`)."""
    mask_id = item.get("mask_id")
    mask = masks.get(mask_id) if isinstance(mask_id, str) else None
    if mask is None:
        raise ValueError(f"{where}: no mask {mask_id!r} on image {image_id}")
    if not mask["reviewable"]:
        raise ValueError(f"{where}: mask {mask_id} is {mask['source']}'s; nobody reviews those")
    if mask["source"] == reviewer:
        raise ValueError(f"{where}: mask {mask_id} is the reviewer's own ({reviewer})")
    verdict = item.get("verdict")
    if verdict not in VERDICTS:
        raise ValueError(f"{where}: verdict must be one of {list(VERDICTS)}, got {verdict!r}")
    reason = item.get("reason")
    if reason is not None and (
        not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS or not reason.isprintable()
    ):
        raise ValueError(
            f"{where}: reason must be up to {MAX_REASON_CHARS} printable characters or null"
        )
    seconds = item.get("seconds")
    if seconds is not None and (
        not isinstance(seconds, (int, float))
        or isinstance(seconds, bool)
        or not math.isfinite(seconds)
        or seconds < 0
    ):
        raise ValueError(f"{where}: seconds must be a finite number >= 0 or null, got {seconds!r}")
    row: dict[str, Any] = {
        "mask_id": mask_id,
        "image_id": image_id,
        "round": mask["round"],
        "stage": mask["stage"],
        "reviewer": reviewer,
        "verdict": verdict,
        "reason": (reason.strip() or None) if reason is not None else None,
        "correction": None,
        "correction_area": None,
        "correction_bbox": None,
        "reviewed_at": stamp,
        "seconds": None if seconds is None else float(seconds),
    }
    correction = item.get("correction")
    if correction is not None:
        if verdict != "rejected":
            raise ValueError(f"{where}: a correction replaces a rejected mask: verdict 'rejected'")
        height, width = mask["segmentation"]["size"]
        try:  # the import's checks: counts that cover exactly the mask's pixels
            canonical = rle.from_coco(correction, height, width)
        except ValueError as error:  # MaskSizeError too
            raise ValueError(f"{where}: correction: {error}") from None
        area = int(rle.areas([canonical])[0])
        if not area:
            raise ValueError(f"{where}: the correction is empty (reject without one instead)")
        row["correction"] = canonical["counts"]
        row["correction_area"] = area
        row["correction_bbox"] = [float(v) for v in rle.bboxes([canonical])[0]]
    return row
