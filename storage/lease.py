"""Writer leases: one live writer per round and stage.

A lease is a small JSON object ``<store>/locks/masks-r<R>-<stage>.lock`` created with an
exclusive create (``open(..., "xb")``: ``O_EXCL`` on local disks, a conditional PUT on object
stores whose fsspec package supports it). A second writer finds it and is refused with
:class:`WriterConflictError`, unless the lease is stale: past its expiry, or held by a process
on this host that no longer exists (a killed writer). A stale lease is moved aside before the
new one is created, so of two writers racing for it only one wins.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Any

from maskmill.storage.errors import WriterConflictError
from maskmill.storage.store import Store, check_key

DEFAULT_TTL_S = 3600.0


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
        now = time.time()
        return json.dumps(
            {
                "token": self.token,
                "owner": self.owner,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "acquired_at": now,
                "expires_at": now + self.ttl_s,
            }
        ).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # a lease cut short by a crash mid-write: treat as stale
            return {"token": None, "expires_at": 0}

    def acquire(self) -> StageLease:
        """Take the lease or raise :class:`WriterConflictError` naming the live holder."""
        fs = self.store.fs
        fs.makedirs(fs._parent(self.path), exist_ok=True)
        for _ in range(3):
            try:
                self._create_exclusive()
            except FileExistsError:
                fs.invalidate_cache()
                holder = self._read()
                if holder is None:
                    continue  # released meanwhile: try again
                if not _stale(holder):
                    raise WriterConflictError(
                        f"round {self.round} stage {self.stage!r} of {self.store.url} is being "
                        f"written by {holder.get('owner')} (host {holder.get('host')}, pid "
                        f"{holder.get('pid')}) until {_when(holder.get('expires_at'))}; refusing "
                        f"a second writer. If that writer is gone, wait for the lease to expire "
                        f"or delete {self.store.url_of(self.path)}."
                    ) from None
                try:  # move the stale lease aside: only one of two racing writers succeeds
                    fs.mv(self.path, f"{self.path}.stale-{self.token}")
                    fs.rm(f"{self.path}.stale-{self.token}")
                except FileNotFoundError:
                    pass
                continue
            self.held = True
            return self
        raise WriterConflictError(
            f"could not take the writer lease {self.store.url_of(self.path)} after 3 tries"
        )

    def _create_exclusive(self) -> None:
        """Create the lease object, raising FileExistsError if it is there."""
        fs = self.store.fs
        try:
            with fs.open(self.path, "xb") as handle:
                handle.write(self._body())
            return
        except (NotImplementedError, ValueError):
            pass  # this fsspec filesystem has no exclusive create: check, write, read back
        if fs.exists(self.path):
            raise FileExistsError(self.path)
        fs.pipe_file(self.path, self._body())
        fs.invalidate_cache()
        holder = self._read()
        if holder is None or holder.get("token") != self.token:
            raise FileExistsError(self.path)

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


def _stale(holder: dict[str, Any]) -> bool:
    """True when a lease's holder is past its expiry or is a dead process on this host."""
    if float(holder.get("expires_at") or 0) < time.time():
        return True
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, someone else's
            return False
    return False


def _when(epoch: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(epoch)))
    except (TypeError, ValueError):
        return "unknown"
