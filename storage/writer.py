"""Writing masks, failures, images rows and round summaries of one round and stage, under a writer
lease, or (``shared``) under per-image claims."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from maskmill.storage import rle
from maskmill.storage.claims import CLAIM_TTL_S, ImageClaims
from maskmill.storage.errors import ImageDoneError
from maskmill.storage.images import ImageInfo, images_table
from maskmill.storage.lease import DEFAULT_TTL_S, StageLease
from maskmill.storage.queries import stage_figures, stage_key
from maskmill.storage.schema import FAILURES, MASKS, ROUNDS
from maskmill.storage.store import Store, check_key, modified_time

# Optional per-mask fields copied from a record as they are (absent -> null).
_OPTIONAL = (
    "predicted_iou",
    "stability_score",
    "point_coords",
    "crop_box",
    "clicks",
    "seconds",
    "strokes",
    "stroke_seconds",
    "model_iou",
    "category_id",
    "category",
    "score",
)


def utc_now() -> dt.datetime:
    """Now, as the timezone-aware UTC time every timestamp column holds."""
    return dt.datetime.now(dt.timezone.utc)


def masks_table(
    records: Sequence[Mapping[str, Any]],
    round_: int,
    stage: str,
    source: str = "model",
    model_version: int | None = None,
    created_at: dt.datetime | None = None,
) -> pa.Table:
    """Arrow table (``MASKS`` schema) of mask records.

    A record is an SA-1B annotation dict (what ``MaskGenerator.generate`` returns) plus
    ``image_id``; it may also carry ``source``, ``model_version``, ``clicks``, ``seconds``,
    ``category_id``, ``category``, ``score``, ``iscrowd`` and ``index`` (the mask's number
    within its image; default: its order among the image's records here). ``segmentation`` is
    a compressed RLE (counts str or bytes). ``area`` and ``bbox`` are always recomputed from
    the RLE by pycocotools, so they cannot disagree with it.
    """
    n = len(records)
    rles = [r["segmentation"] for r in records]
    counts = [s["counts"].decode() if isinstance(s["counts"], bytes) else s["counts"] for s in rles]
    cols: dict[str, Any] = {}
    seen: dict[str, int] = {}
    ids = []
    for r in records:
        index = r.get("index")
        if index is None:
            index = seen.get(r["image_id"], 0)
        seen[r["image_id"]] = max(seen.get(r["image_id"], 0), int(index) + 1)
        ids.append(rle.mask_id(r["image_id"], round_, stage, int(index)))
    cols["mask_id"] = ids
    cols["image_id"] = [r["image_id"] for r in records]
    cols["round"] = pa.array(np.full(n, round_, np.int32))
    cols["stage"] = [stage] * n
    cols["model_version"] = [r.get("model_version", model_version) for r in records]
    cols["source"] = [r.get("source", source) for r in records]
    cols["segmentation"] = counts
    cols["height"] = pa.array(np.array([s["size"][0] for s in rles], np.int32))
    cols["width"] = pa.array(np.array([s["size"][1] for s in rles], np.int32))
    cols["area"] = pa.array(rle.areas(rles))
    boxes = rle.bboxes(rles)
    cols["bbox"] = pa.FixedSizeListArray.from_arrays(pa.array(boxes.reshape(-1)), 4)
    for name in _OPTIONAL:
        cols[name] = [r.get(name) for r in records]
    cols["clicks"] = [_clicks(r.get("clicks")) for r in records]
    cols["iscrowd"] = [bool(r.get("iscrowd", False)) for r in records]
    stamp = created_at or utc_now()
    cols["created_at"] = pa.array([stamp] * n, MASKS.field("created_at").type)
    arrays = [
        pa.array(cols[f.name], f.type) if not isinstance(cols[f.name], pa.Array) else cols[f.name]
        for f in MASKS
    ]
    return pa.Table.from_arrays(arrays, schema=MASKS)


def _clicks(clicks: Any) -> list[dict[str, Any]] | None:
    """Clicks as structs; accepts ``[x, y, label]`` triples or ``{x, y, label}`` dicts."""
    if clicks is None:
        return None
    return [c if isinstance(c, Mapping) else {"x": c[0], "y": c[1], "label": c[2]} for c in clicks]


class StageWriter:
    """Writes one round and stage of a store, holding its writer lease while open (shared:
    per-image claims instead, see below).

    ::

        with StageWriter(store, round_=1, stage="auto") as w:
            for key, records in batches:      # key: a deterministic name of the unit of work
                if not w.done(key):
                    w.write_masks(key, records)
            w.finish(model_version=1, metrics={"miou": 0.8})

    A second ``StageWriter`` of the same round and stage, in any process, is refused with
    :class:`~storage.errors.WriterConflictError` while this one is open.

    ``shared=True``: many writers of the round and stage at once (people, ``maskmill serve``
    processes, stage runs, on any hosts sharing the store), coordinated per image rather than
    by the round-wide lease (none is taken). ``writer.claims`` (:class:`~storage.claims.
    ImageClaims`, of ``owner``, ``ttl_s`` default ``CLAIM_TTL_S``) hands out images; the unit
    of work is one image, its shard keyed by the image id, committed only under this owner's
    claim and only once; whoever completes the round writes its row
    (:meth:`finish_if_complete`)::

        with StageWriter(store, 3, "manual", owner="web:ana", shared=True) as w:
            while (image_id := w.claims.claim_next(image_ids)) is not None:
                w.write_masks(image_id, annotate(image_id))   # commits, releases the claim
            w.finish_if_complete(image_ids, model_version=3)  # None while others work
    """

    def __init__(
        self,
        store: Store | str,
        round_: int,
        stage: str,
        owner: str | None = None,
        ttl_s: float | None = None,
        shared: bool = False,
    ) -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        self.round = int(round_)
        self.stage = check_key(stage, "stage")
        # Shard key of the stage's rounds row; its failures shards' keys start with it too.
        self.key = stage_key(self.round, self.stage)
        self.shared = shared
        self.lease: StageLease | None = None
        self.claims: ImageClaims | None = None
        self._kept: set[str] = set()  # images committed with keep_claim, claims still held
        if shared:
            # Claims belong to an owner name: two writers of one process (threads) need two.
            owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
            ttl = CLAIM_TTL_S if ttl_s is None else ttl_s
            self.claims = ImageClaims(self.store, self.round, self.stage, owner, ttl)
        else:
            ttl = DEFAULT_TTL_S if ttl_s is None else ttl_s
            self.lease = StageLease(self.store, self.round, self.stage, owner, ttl)
        self.started_at: dt.datetime | None = None

    def __enter__(self) -> StageWriter:
        self.started_at = utc_now()
        if self.lease is None:
            # Shared: other writers' temp files may be live; a claim's taker removes a dead
            # holder's (ImageClaims.claim).
            return self
        self.lease.acquire()
        # Temp files of a killed writer of this stage are garbage: nobody else writes its
        # masks folder, its failures shards or its rounds row.
        if self.store.fs.exists(self.store.table_dir("masks", self.round, self.stage)):
            self.store.remove_temp_files("masks", self.round, self.stage)
        self.store.remove_temp_files("failures", key_prefix=f"{self.key}-")
        self.store.remove_temp_files("rounds", key_prefix=f"{self.key}.parquet.")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.lease is not None:
            self.lease.release()
        if self.claims is not None:
            self.claims.release_all()

    def _check(self) -> None:
        """Renew the round-wide lease, or raise WriterConflictError if it is lost (shared
        writers hold none: their images' claims are checked where they write)."""
        if self.lease is not None:
            self.lease.check()

    def done(self, key: str) -> bool:
        """True when the shard of unit of work ``key`` is committed (a resumed run skips it)."""
        return self.store.has_shard("masks", key, self.round, self.stage)

    def pending(self, image_ids: Iterable[str]) -> list[str]:
        """The ids of ``image_ids`` neither done (:meth:`done`: a shard keyed by the id) nor
        failed (a failures row of this round and stage), in their order."""
        done = set(self.store.shard_keys("masks", self.round, self.stage))
        failed = set(self.store.shard_keys("failures"))
        return [
            image_id
            for image_id in image_ids
            if image_id not in done and f"{self.key}-{image_id}" not in failed
        ]

    def write_masks(
        self,
        key: str,
        records: Sequence[Mapping[str, Any]] | pa.Table,
        keep_claim: bool = False,
        **defaults: Any,
    ) -> str:
        """Commit the masks of unit of work ``key`` (replacing an earlier shard of that key).

        ``records``: mask records (see :func:`masks_table`; ``defaults`` are its ``source``,
        ``model_version`` and ``created_at``) or an Arrow table already in the ``MASKS`` schema.

        Shared: ``key`` is an image id this owner holds the claim of (else
        :class:`~storage.errors.ClaimLostError`); the shard is created, never replaced by
        another writer (their commit raises :class:`~storage.errors.ImageDoneError`), then the
        claim is released. With ``keep_claim`` the claim stays held and a later commit of the
        same image by this writer replaces the shard: a person's work is stored at every step
        (nothing is lost when they walk away), and the image counts as done from the first
        commit, so nobody else is handed it.
        """
        table = (
            records
            if isinstance(records, pa.Table)
            else masks_table(records, self.round, self.stage, **defaults)
        )
        if self.claims is None:
            self._check()
            return self.store.write_shard("masks", table, key, self.round, self.stage)
        self.claims.renew(key)  # ours, and fresh for the commit
        try:
            # Only this writer's own earlier commit (keep_claim) may be replaced.
            path = self.store.write_shard(
                "masks", table, key, self.round, self.stage, exclusive=key not in self._kept
            )
        except FileExistsError:
            shard = self.store.url_of(self.store.shard_path("masks", key, self.round, self.stage))
            raise ImageDoneError(
                f"image {key!r} of round {self.round} stage {self.stage!r} of {self.store.url} "
                f"is done already: another writer committed its masks ({shard}); not writing "
                "it again"
            ) from None
        if keep_claim:
            self._kept.add(key)
        else:
            self._kept.discard(key)
            self.claims.release(key)
        return path

    def write_images(
        self, key: str, infos: Iterable[ImageInfo], added_at: dt.datetime | None = None
    ) -> str:
        """Commit images-table rows (from :func:`~storage.images.read_image_info`) as the images
        shard of unit of work ``key`` (replacing an earlier shard of that key): the one way
        imports and ingest add images."""
        table = images_table(infos, added_at or utc_now())
        self._check()
        return self.store.write_shard("images", table, key)

    def write_failures(self, key: str, failures: Iterable[Mapping[str, Any]]) -> str:
        """Commit failures (dicts with ``image_id`` and/or ``uri``, ``error``, optional ``at``).

        Shared: ``key`` is the image id, and this owner's claim on it (if held) is released:
        the work on the image has ended (a later run may try it again)."""
        now = utc_now()
        rows = [
            {
                "image_id": f.get("image_id"),
                "uri": f.get("uri"),
                "round": self.round,
                "stage": self.stage,
                "error": str(f["error"]),
                "at": f.get("at") or now,
            }
            for f in failures
        ]
        self._check()
        name = f"{self.key}-{check_key(key, 'failure key')}"
        path = self.store.write_shard("failures", pa.Table.from_pylist(rows, FAILURES), name)
        if self.claims is not None:
            self.claims.release(key)
        return path

    def finish(
        self,
        model_version: int | None = None,
        metrics: Mapping[str, float] | None = None,
        figures: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write this round and stage's row of the rounds table, counting what is stored:
        ``images`` done (:func:`~storage.queries.images_done`) and ``masks``. ``figures``:
        :func:`~storage.queries.stage_figures` of the stage when the caller counted them
        already (for its metrics), so the stage's shards are read once; None: counted here."""
        if figures is None:
            figures = stage_figures(self.store, self.round, self.stage)
        row = {
            "round": self.round,
            "stage": self.stage,
            "model_version": model_version,
            "started_at": self.started_at,
            "finished_at": utc_now(),
            "images": figures["images"],
            "masks": figures["masks"],
            "metrics": json.dumps(dict(metrics)) if metrics else None,
        }
        self._check()
        self.store.write_shard("rounds", pa.Table.from_pylist([row], ROUNDS), self.key)
        return row

    def finish_if_complete(
        self,
        image_ids: Iterable[str],
        model_version: int | None = None,
        metrics: Mapping[str, float] | None = None,
        figures: Mapping[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Write the rounds row (:meth:`finish`, ``figures`` as there) when none of
        ``image_ids`` is :meth:`pending` (each is done or failed) and return it; else None.
        Shared writers call it when they run out of images, so whichever completes the round
        writes its row; a later call writes it again, counting what is stored then, as
        :meth:`finish` does."""
        if self.pending(image_ids):
            return None
        return self.finish(model_version, metrics, figures)

    def finished_row(self, image_ids: Iterable[str]) -> dict[str, Any] | None:
        """The stored rounds row of this round and stage when a rerun has nothing to add, as
        :meth:`finish` returned it; else None (the stage has work left, or its row must be
        counted again). Costs a listing of the stage's shards and a read of the row, whatever
        the store holds.

        Nothing to add: every one of ``image_ids`` is done (a shard keyed by its id: a failed
        image is tried again by a rerun, so it is not), and the row is up to date: written
        after every masks and failures shard of the stage (the store's own modification times,
        one clock: a shard committed after the row, by a shared writer (a person's later
        commit of an image, ``keep_claim``) or a run killed before its :meth:`finish`, means
        counting again), and counting at least ``image_ids`` (an image another writer committed
        while the row was being counted). The row is one shard per round and stage, replaced
        by every :meth:`finish` (whoever wrote it last).
        """
        ids = set(image_ids)
        store = self.store
        masks = store.shard_times("masks", self.round, self.stage)
        if not ids <= masks.keys():
            return None
        failures = store.shard_times("failures", key_prefix=f"{self.key}-")
        path = store.shard_path("rounds", self.key)
        try:
            written = modified_time(store.fs.info(path))  # listed afresh by shard_times
        except FileNotFoundError:
            return None
        newest = [*masks.values(), *failures.values()]
        if written is None or None in newest or any(t >= written for t in newest):
            return None  # a tie is not after: counted again
        with store.fs.open(path, "rb") as handle:
            rows = pq.read_table(handle, schema=ROUNDS).to_pylist()
        if len(rows) != 1 or rows[0]["images"] < len(ids):
            return None
        return rows[0]
