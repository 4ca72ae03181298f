"""Per-image claims: many writers on one round and stage, each image written by one, once.

A claim is a lock (``storage.lease``: exclusive create, stale takeover) per image,
``<store>/locks/claims/r<R>-<stage>/<image_id>.json``, held by an owner name (a person, a
process) for ``ttl_s`` seconds unless renewed. Whoever holds an image's claim may commit its
masks shard (``StageWriter(shared=True)``, which commits with an exclusive create, so even a
writer whose claim expired mid-commit cannot write the image a second time); a claim whose
holder stops renewing it (a closed browser, a killed process) expires and the image goes back to
the queue: at once when the holder was a process on this host that no longer exists.

Claims belong to the owner name, not to one object: two ``ImageClaims`` with the same owner
share them (a person's second tab, a restarted server); give distinct owners to distinct
workers.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from maskmill.storage.errors import ClaimLostError, WriterConflictError
from maskmill.storage.lease import (
    describe_holder,
    holder_gone,
    is_stale,
    lock_record,
    read_lock,
    take_lock,
)
from maskmill.storage.store import Store, check_key

# A claim outlives a person's pause on one image (a page renews it while open) and a
# simulated annotator's work on one image by far, yet frees a walked-away image in minutes.
CLAIM_TTL_S = 120.0


class ImageClaims:
    """The claims of ``owner`` on the images of round ``round_``, stage ``stage`` of a store.

    ::

        claims = ImageClaims(store, 3, "manual", owner="web:ana")
        image_id = claims.claim_next(image_ids)   # None: every image is done or held
        claims.renew(image_id)                    # while working on it
        claims.release(image_id)                  # StageWriter.write_masks does it on commit

    Thread-safe: one object may be used by several threads (:meth:`keep_alive` renews from one).
    """

    def __init__(
        self,
        store: Store | str,
        round_: int,
        stage: str,
        owner: str,
        ttl_s: float = CLAIM_TTL_S,
    ) -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        self.round = int(round_)
        self.stage = check_key(stage, "stage")
        if not owner:
            raise ValueError("an ImageClaims owner is needed (a person's or a process's name)")
        self.owner = owner
        self.ttl_s = float(ttl_s)
        self.token = uuid.uuid4().hex
        self.folder = self.store.path("locks", "claims", f"r{self.round}-{self.stage}")
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"ImageClaims({self.store.url!r}, {self.round}, {self.stage!r}, {self.owner!r})"

    # ----------------------------------------------------------------------------- claiming

    def claim(self, image_id: str) -> bool:
        """Claim ``image_id``: True when this owner now holds it (it was free, its claim had
        expired, or it was this owner's already: renewed), False when another live holder has
        it or its masks shard is committed."""
        with self._lock:
            if self._done(image_id):
                return False
            before = read_lock(self.store, self._path(image_id))
            try:
                if self._take(image_id, before) is not None:
                    return False
            except WriterConflictError:  # others keep taking it: it is not free
                return False
            if self._done(image_id):  # committed between the first look and the claim
                self.release(image_id)
                return False
            if before is not None and is_stale(before):
                # Its last holder may have died mid-commit: its temp file is garbage (never
                # read). A holder that only expired may still be alive and committing: only a
                # temp file older than a claim's lifetime is surely not its.
                self.store.remove_temp_files(
                    "masks",
                    self.round,
                    self.stage,
                    key_prefix=f"{image_id}.parquet.",
                    older_than_s=None if holder_gone(before) else self.ttl_s,
                )
            return True

    def claim_next(self, image_ids: Iterable[str]) -> str | None:
        """Claim the first image of ``image_ids`` (in their order) that :meth:`claim` can;
        None when each is done or held by another live holder."""
        done = set(self.store.shard_keys("masks", self.round, self.stage))
        for image_id in image_ids:
            if image_id not in done and self.claim(image_id):
                return image_id
        return None

    def renew(self, image_id: str) -> None:
        """Extend this owner's claim on ``image_id`` by ``ttl_s`` from now; raise
        :class:`ClaimLostError` (naming the image and its holder now) when the claim is no
        longer this owner's (expired and taken, released, or done)."""
        with self._lock:
            holder = read_lock(self.store, self._path(image_id))
            if holder is None or holder.get("owner") != self.owner:
                raise self._lost(image_id, holder)
            try:
                taker = self._take(image_id, holder)
            except WriterConflictError:
                taker = read_lock(self.store, self._path(image_id))
            if taker is not None:
                raise self._lost(image_id, taker)

    def release(self, image_id: str) -> None:
        """Give the claim on ``image_id`` back if it is this owner's (idempotent)."""
        with self._lock:
            path = self._path(image_id)
            self.store.fs.invalidate_cache()
            holder = read_lock(self.store, path)
            # A stale claim is left alone: another owner may be replacing it right now, and
            # removing it could remove theirs. Anyone may take it over anyway.
            if holder is not None and holder.get("owner") == self.owner and not is_stale(holder):
                with contextlib.suppress(FileNotFoundError):
                    self.store.fs.rm(path)

    def release_all(self) -> None:
        """Give back every claim this owner holds in the round and stage."""
        with self._lock:
            for image_id in self.held():
                self.release(image_id)

    @contextlib.contextmanager
    def keep_alive(self, image_id: str) -> Iterator[None]:
        """Renew the claim on ``image_id`` every ``ttl_s / 3`` while the block runs (a daemon
        thread), so long work on one image keeps its claim. A lost claim stops the renewing;
        the commit then raises :class:`ClaimLostError`."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.ttl_s / 3):
                try:
                    self.renew(image_id)
                except ClaimLostError:
                    return
                except OSError:  # the store did not answer this time: the claim has time left
                    continue

        thread = threading.Thread(target=renew, name=f"claim {image_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    # ------------------------------------------------------------------------------- queries

    def holder(self, image_id: str) -> dict[str, Any] | None:
        """The live claim on ``image_id`` (``owner``, ``host``, ``pid``, ``acquired_at``,
        ``expires_at``, ``image_id``), or None when it is free (no claim, or a stale one)."""
        self.store.fs.invalidate_cache()
        holder = read_lock(self.store, self._path(image_id))
        return None if holder is None or is_stale(holder) else holder

    def held(self) -> list[str]:
        """Ids of the images this owner holds a live claim on, sorted."""
        self.store.fs.invalidate_cache()
        out = []
        for path in self.store.fs.glob(f"{self.folder}/*.json"):
            holder = read_lock(self.store, path)
            if holder is not None and holder.get("owner") == self.owner and not is_stale(holder):
                out.append(path.rsplit("/", 1)[1][: -len(".json")])
        return sorted(out)

    # ------------------------------------------------------------------------------ helpers

    def _path(self, image_id: str) -> str:
        return f"{self.folder}/{check_key(image_id, 'image id')}.json"

    def _done(self, image_id: str) -> bool:
        self.store.fs.invalidate_cache()
        return self.store.has_shard("masks", image_id, self.round, self.stage)

    def _record(self, image_id: str) -> dict[str, Any]:
        return lock_record(self.owner, self.token, self.ttl_s, image_id=image_id)

    def _take(self, image_id: str, holder: dict[str, Any] | None) -> dict[str, Any] | None:
        """Make the claim on ``image_id`` this owner's, fresh; None when it is, else the other
        holder's record. ``holder``: the claim as last read."""
        path = self._path(image_id)
        ours = holder is not None and holder.get("owner") == self.owner and not is_stale(holder)
        if ours and float(holder["expires_at"]) - time.time() > self.ttl_s / 4:
            # Ours with time to spare: nobody else may replace it before this overwrite lands.
            self.store.write_bytes(path, json.dumps(self._record(image_id)).encode())
            return None
        # Free, stale, or ours about to expire: replaced only through the takeover protocol,
        # so a racing owner cannot end up holding it too.
        return take_lock(
            self.store,
            path,
            self._record(image_id),
            takeover=lambda h: is_stale(h) or h.get("owner") == self.owner,
        )

    def _lost(self, image_id: str, holder: dict[str, Any] | None) -> ClaimLostError:
        now = (
            f"it is held by {describe_holder(holder)}"
            if holder is not None and not is_stale(holder)
            else "nobody holds it now (it expired, was released, or is done)"
        )
        return ClaimLostError(
            f"{self.owner} lost the claim on image {image_id!r} of round {self.round} stage "
            f"{self.stage!r} of {self.store.url}: {now}; not writing it"
        )
