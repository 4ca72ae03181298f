"""Writer leases: one live writer per round and stage; and the lock primitive they share with
per-image claims (``storage.claims``).

A lock is a small JSON object (:func:`lock_record`: token, owner, host, pid, expiry) created
with an exclusive create (:meth:`Store.create_exclusive`: a hard link of a complete temp file
on local disks, a conditional PUT with ``If-None-Match: *`` on S3; a store that can do neither
is refused with :class:`NoExclusiveCreateError`), so it appears whole or not at all, and of
two writers creating it at once exactly one succeeds. Whoever finds it there is
refused, unless the lock is stale: past its expiry, or held by a process on this host that no
longer exists (a killed writer). A stale lock is replaced by the one writer that creates its
takeover marker, so of several writers racing for it only one wins (:func:`take_lock`).

A lease is the lock ``<store>/locks/masks-r<R>-<stage>.lock``: a second writer of the round
and stage is refused with :class:`WriterConflictError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from maskmill.storage.errors import WriterConflictError
from maskmill.storage.store import Store, check_key

DEFAULT_TTL_S = 3600.0
# A takeover marker outlives a takeover (milliseconds) by far; past this, its writer is gone.
TAKEOVER_TTL_S = 30.0


def lock_record(owner: str, token: str, ttl_s: float, **extra: Any) -> dict[str, Any]:
    """The JSON body of a lock held by ``owner`` (this process) for ``ttl_s`` from now."""
    now = time.time()
    return {
        "token": token,
        "owner": owner,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "acquired_at": now,
        "expires_at": now + ttl_s,
        **extra,
    }


def read_lock(store: Store, path: str) -> dict[str, Any] | None:
    """The lock at ``path``, or None when there is none."""
    try:
        return json.loads(store.fs.cat_file(path))
    except FileNotFoundError:
        return None
    except ValueError:  # a lock cut short by a crash mid-write: treat as stale
        return {"token": None, "expires_at": 0}


def take_lock(
    store: Store,
    path: str,
    record: dict[str, Any],
    takeover: Callable[[dict[str, Any]], bool] | None = None,
    tries: int = 3,
) -> dict[str, Any] | None:
    """Create the lock at ``path`` holding ``record`` (a :func:`lock_record`) unless another
    holder keeps it; None when it is now ``record``'s, else the holder's record.

    A holder that ``takeover`` accepts (default :func:`is_stale`) is replaced. Of the writers
    that want to replace one holder, only the one that creates its marker
    ``<path>.takeover-<holder's token>`` may (the others get the marker's record as the
    holder), and it replaces the holder only if the lock still is that holder: so two writers
    never both win, which moving the old lock aside could not promise (a slow writer would move
    the winner's new lock aside). Raises :class:`WriterConflictError` after ``tries`` rounds
    in which the lock kept changing.
    """
    takeover = takeover or is_stale
    body = json.dumps(record).encode()
    for _ in range(tries):
        try:
            store.create_exclusive(path, body)
        except FileExistsError:
            pass
        else:
            # Read back (one small GET): a check that costs little, should a store's exclusive
            # create ever not be one (a local mount without hard links checks, then renames).
            store.fs.invalidate_cache()
            mine = read_lock(store, path)
            if mine is not None and mine.get("token") == record["token"]:
                return None
            continue
        store.fs.invalidate_cache()
        holder = read_lock(store, path)
        if holder is None:
            continue  # released meanwhile: try again
        if not takeover(holder):
            return holder
        marker = f"{path}.takeover-{holder.get('token')}"
        marker_record = lock_record(record["owner"], record["token"], TAKEOVER_TTL_S)
        try:
            store.create_exclusive(marker, json.dumps(marker_record).encode())
        except FileExistsError:
            taker = read_lock(store, marker)
            if taker is not None and not is_stale(taker):
                return taker  # another writer is replacing it: that one is the holder now
            _remove(store, marker)  # its writer died mid-takeover
            continue
        try:
            store.fs.invalidate_cache()
            if read_lock(store, path) == holder:  # else replaced or released meanwhile
                store.write_bytes(path, body)
                return None
        finally:
            _remove(store, marker)
    raise WriterConflictError(
        f"could not take the lock {store.url_of(path)} after {tries} tries: other writers "
        "keep taking and releasing it"
    )


def _remove(store: Store, path: str) -> None:
    """Delete ``path`` if it is there."""
    with contextlib.suppress(FileNotFoundError):
        store.fs.rm(path)


class StageLease:
    """The right to write round ``round_``, stage ``stage`` of a store's masks."""

    def __init__(
        self,
        store: Store,
        round_: int,
        stage: str,
        owner: str | None = None,
        ttl_s: float = DEFAULT_TTL_S,
    ) -> None:
        self.store = store
        self.round = int(round_)
        self.stage = check_key(stage, "stage")
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.ttl_s = ttl_s
        self.token = uuid.uuid4().hex
        self.path = store.path("locks", f"masks-r{self.round}-{self.stage}.lock")
        self.held = False

    def _body(self) -> bytes:
        return json.dumps(lock_record(self.owner, self.token, self.ttl_s)).encode()

    def _read(self) -> dict[str, Any] | None:
        return read_lock(self.store, self.path)

    def acquire(self) -> StageLease:
        """Take the lease or raise :class:`WriterConflictError` naming the live holder."""
        holder = take_lock(self.store, self.path, lock_record(self.owner, self.token, self.ttl_s))
        if holder is not None:
            raise WriterConflictError(
                f"round {self.round} stage {self.stage!r} of {self.store.url} is being "
                f"written by {describe_holder(holder)}; refusing a second writer. If that writer "
                f"is gone, wait for the lease to expire or delete {self.store.url_of(self.path)}."
            )
        self.held = True
        return self

    def check(self) -> None:
        """Raise :class:`WriterConflictError` unless this lease is still ours; renew it."""
        self.store.fs.invalidate_cache()
        holder = self._read()
        if not self.held or holder is None or holder.get("token") != self.token:
            raise WriterConflictError(
                f"lost the writer lease for round {self.round} stage {self.stage!r} of "
                f"{self.store.url} (now held by {holder and holder.get('owner')}); not writing"
            )
        if holder["expires_at"] - time.time() < self.ttl_s / 2:
            self.store.write_bytes(self.path, self._body())

    def release(self) -> None:
        """Give the lease back (only if it is still ours)."""
        if not self.held:
            return
        self.held = False
        self.store.fs.invalidate_cache()
        holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            self.store.fs.rm(self.path)

    def __enter__(self) -> StageLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_stale(holder: dict[str, Any]) -> bool:
    """True when a lock's holder is past its expiry or is a dead process on this host."""
    return float(holder.get("expires_at") or 0) < time.time() or holder_gone(holder)


def holder_gone(holder: dict[str, Any]) -> bool:
    """True when a lock's holder was a process on this host that no longer exists (killed)."""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, someone else's
            return False
    return False


def describe_holder(holder: dict[str, Any]) -> str:
    """``owner (host H, pid P) until <UTC time>``: who holds a lock, for error messages."""
    return (
        f"{holder.get('owner')} (host {holder.get('host')}, pid {holder.get('pid')}) until "
        f"{_when(holder.get('expires_at'))}"
    )


def _when(epoch: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(epoch)))
    except (TypeError, ValueError):
        return "unknown"
