"""Accounts of the people who annotate a store: names, roles and login tokens.

One small JSON object, ``<store>/accounts/accounts.json``, written whole with the store's commit
protocol (:meth:`~storage.store.Store.write_bytes`: temp + rename locally, one PUT elsewhere)::

    {"users": {"ana": {"role": "annotator", "token_sha256": "<hex>",
                       "created_at": "<ISO 8601>", "revoked_at": null}, ...}}

A token is ``secrets.token_urlsafe(32)`` (32 random bytes): it is shown once, when the account
is made, and only its SHA-256 is stored (a random 256-bit token needs no slow, salted hash:
nobody can guess a preimage). Checking a token hashes it and compares with
:func:`hmac.compare_digest`. A revoked account keeps its entry (its name stays taken, so masks
of ``web:<name>`` keep one author) and no longer logs in.

The account commands (``maskmill users``) read, change and rewrite the object: run them one at
a time (two at the same instant could drop one's change; the server only reads it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from maskmill.storage.errors import StorageError
from maskmill.storage.store import Store
from maskmill.storage.writer import utc_now

ROLES = ("annotator", "reviewer")
# Names travel as mask sources (web:<name>) and in claim owners: plain characters only.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Re-read the object at least this often, even when its stat looks unchanged (a rewrite within
# the file system's timestamp resolution, or an object store whose listing lags).
REREAD_S = 1.0
# Domain separation of the CSRF value derived from a token (see :func:`csrf_token`).
_CSRF_LABEL = b"maskmill csrf v1"


class AccountError(StorageError, ValueError):
    """An account command that cannot be done: a bad name or role, an unknown or taken name."""


@dataclass(frozen=True)
class Account:
    """A person who may log in (unless ``revoked_at`` is set).

    Attributes:
        name: the person's name; their masks' ``source`` is ``web:<name>``.
        role: ``annotator`` or ``reviewer``.
        created_at: when the account (or its current token) was made, ISO 8601 UTC.
        revoked_at: when it was revoked, ISO 8601 UTC; None while it is active.
    """

    name: str
    role: str
    created_at: str
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def hash_token(token: str) -> str:
    """The stored form of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def csrf_token(token: str) -> str:
    """The CSRF value of a login token: HMAC-SHA256 of a fixed label keyed by the token. The page
    gets it from the server and sends it back as a header; a cross-site page cannot read it, nor
    derive it without the token."""
    return hmac.new(token.encode("utf-8"), _CSRF_LABEL, hashlib.sha256).hexdigest()


def check_name(name: str) -> str:
    """``name`` if it is a usable account name, else :class:`AccountError`."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise AccountError(
            f"user name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


class Accounts:
    """The accounts of a store (module doc). Thread-safe; one instance may serve many requests.

    Args:
        store: the store.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.path = store.path("accounts", "accounts.json")
        self._lock = threading.Lock()
        # The last read: the object's stat signature, when it was read, its users by name and
        # by token hash (None: no object).
        self._signature: Any = object()
        self._read_at = float("-inf")
        self._users: dict[str, dict[str, Any]] | None = None
        self._by_hash: dict[str, Account] = {}

    # ---------------------------------------------------------------------------- reading

    def exist(self) -> bool:
        """Whether the store has accounts (revoked ones count: revoking everybody must not open
        the server to anybody)."""
        with self._lock:
            self._refresh()
            return bool(self._users)

    def list(self) -> list[Account]:
        """Every account, by name."""
        with self._lock:
            self._refresh(force=True)
            return [_account(name, entry) for name, entry in sorted((self._users or {}).items())]

    def authenticate(self, token: str) -> Account | None:
        """The active account whose token is ``token``, else None (unknown or revoked).

        The accounts object is looked at on every call (one stat; re-read when it changed, and
        at least every :data:`REREAD_S`), so a revoked token stops working at once.
        """
        if not isinstance(token, str) or not token:
            return None
        digest = hash_token(token)
        with self._lock:
            self._refresh()
            # Looked up by hash, then compared in constant time: the lookup's timing depends
            # only on the hash, which tells nothing of the stored tokens.
            account = self._by_hash.get(digest)
            if account is None:
                return None
            stored = self._users[account.name]["token_sha256"]
            if not hmac.compare_digest(stored, digest) or not account.active:
                return None
            return account

    def _refresh(self, force: bool = False) -> None:
        """Re-read the object if its stat signature changed, or it is older than REREAD_S."""
        now = time.monotonic()
        fs = self.store.fs
        fs.invalidate_cache(self.path)  # object stores cache listings; the stat must be fresh
        try:
            info = fs.info(self.path)
        except FileNotFoundError:
            info = None
        signature = _signature(info)
        if not force and signature == self._signature and now - self._read_at < REREAD_S:
            return
        users = None
        if info is not None:
            try:
                users = _parse(fs.cat_file(self.path), self.store.url_of(self.path))
            except FileNotFoundError:  # removed between the stat and the read
                users = None
        self._signature, self._read_at, self._users = signature, now, users
        self._by_hash = {
            entry["token_sha256"]: _account(name, entry) for name, entry in (users or {}).items()
        }

    # ---------------------------------------------------------------------------- changing

    def add(self, name: str, role: str = "annotator") -> str:
        """Make an account (or give a revoked one a new token) and return its token: the only
        time it is shown.

        Raises:
            AccountError: a bad name or role, or an active account of that name.
        """
        check_name(name)
        if role not in ROLES:
            raise AccountError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        with self._lock:
            self._refresh(force=True)
            users = dict(self._users or {})
            if name in users and users[name].get("revoked_at") is None:
                raise AccountError(
                    f"{name} already has an account in {self.store.url}; revoke it first "
                    "(maskmill users revoke) to give them a new token"
                )
            token = secrets.token_urlsafe(32)
            users[name] = {
                "role": role,
                "token_sha256": hash_token(token),
                "created_at": utc_now().isoformat(timespec="seconds"),
                "revoked_at": None,
            }
            self._write(users)
            return token

    def revoke(self, name: str) -> Account:
        """Revoke ``name``'s account: its token stops working on the next request. Returns it.

        Raises:
            AccountError: no such account, or it is already revoked.
        """
        with self._lock:
            self._refresh(force=True)
            users = dict(self._users or {})
            entry = users.get(name)
            if entry is None:
                known = ", ".join(sorted(users)) or "none"
                raise AccountError(f"no account {name!r} in {self.store.url} (accounts: {known})")
            if entry.get("revoked_at") is not None:
                raise AccountError(f"{name}'s account was already revoked at {entry['revoked_at']}")
            users[name] = {**entry, "revoked_at": utc_now().isoformat(timespec="seconds")}
            self._write(users)
            return _account(name, users[name])

    def _write(self, users: dict[str, dict[str, Any]]) -> None:
        data = json.dumps({"users": users}, indent=1, sort_keys=True).encode()
        self.store.write_bytes(self.path, data)
        self._signature, self._read_at = object(), float("-inf")  # the next check re-reads


def _account(name: str, entry: dict[str, Any]) -> Account:
    return Account(name, entry["role"], entry["created_at"], entry.get("revoked_at"))


def _parse(data: bytes, where: str) -> dict[str, dict[str, Any]]:
    """The users of an accounts object, checked (a broken object is an error, never "no
    accounts": that would open a server bound to the network)."""
    try:
        users = json.loads(data)["users"]
        for name, entry in users.items():
            check_name(name)
            if entry["role"] not in ROLES or not isinstance(entry["token_sha256"], str):
                raise ValueError(f"entry {name!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise StorageError(f"{where}: not a valid accounts file: {error}") from None
    return users


def _signature(info: dict[str, Any] | None) -> tuple | None:
    """What tells a changed object from the same one: size, modification time, inode, and
    ETag where the file system reports them."""
    if info is None:
        return None
    keys = ("size", "mtime", "ino", "ETag", "etag", "LastModified", "last_modified")
    return tuple(str(info.get(key)) for key in keys)
