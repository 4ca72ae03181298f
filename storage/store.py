"""One store = one fsspec URL; this module owns every byte written under it.

Layout (see DESIGN.md, "Storage layout")::

    <store>/images/part-<key>.parquet
    <store>/masks/round=R/stage=S/part-<key>.parquet
    <store>/rounds/part-r<R>-<stage>.parquet
    <store>/failures/part-r<R>-<stage>-<key>.parquet
    <store>/models/v<N>/model.pt + meta.json
    <store>/reviews/part-<image_id>-<digest>.parquet  (review verdicts, see storage.reviews)
    <store>/locks/masks-r<R>-<stage>.lock          (writer lease, see storage.lease)
    <store>/locks/claims/r<R>-<stage>/<image>.json (per-image claims, see storage.claims)
    <store>/accounts/accounts.json                 (people, token hashes: storage.accounts)
    <store>/embeddings/<digest>/<image>/<view>.npz (float16 image embeddings per image
                                                    encoder: storage.embeddings)

Commit protocol: a shard is written complete under a temporary name next to its final one and
then renamed (local disks: ``os.replace`` is atomic and replaces an older version), or uploaded
in one whole-object write (object stores and ``memory://``: a PUT is visible whole or not at
all). Final names are deterministic, so the same unit of work written twice replaces its shard.
An exclusive commit (``write_shard(..., exclusive=True)``: a shared writer's image) never
replaces: a hard link of the temp file fails when the final name exists (local disks), as does a
create-only write on object stores (:meth:`Store.create_exclusive`).

Object stores (see README, "Object stores"): an exclusive create is ``pipe_file(...,
mode="create")``, on S3 one PUT with ``If-None-Match: *`` that the server refuses (412) when the
key exists. Only filesystems known to make that one atomic request (``EXCLUSIVE_CREATE_PROTOCOLS``)
are used for it, and the server is probed once per store and process (a second create of a
fresh key must be refused: an S3-compatible server that ignores the header would overwrite);
elsewhere :class:`NoExclusiveCreateError`, never a check-then-write race. fsspec caches the
listings of object stores: every method that asks what is committed (``shards``,
``shard_keys``, ``has_shard``, ``require``, ``model_metas``) drops them first, so it sees what
other processes wrote, and a catalog then reads the shards it listed without a request each.
Endpoint and credentials come from the environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), which local Ray workers and ``serve`` inherit.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import io
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, NoReturn

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from maskmill.storage.errors import NoExclusiveCreateError, NotAStoreError, StorageError
from maskmill.storage.schema import DICTIONARY_COLUMNS, PARTITIONED, SCHEMAS

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TMP_SUFFIX = ".tmp"
# Row groups of this many rows let DuckDB read one shard on several threads.
ROW_GROUP_ROWS = 128 * 1024
# zstd level 3: level 9 saves ~4 % of bytes for 4x the encoding time.
PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "compression_level": 3}
# fsspec protocols whose ``pipe_file(path, data, mode="create")`` is one atomic create-if-absent
# request (s3fs: a PUT with ``If-None-Match: *``; memory: within its one process). fsspec's
# default for other filesystems checks, then writes: a race, so they are refused. Add one here
# only once its package sends a server-side conditional write.
EXCLUSIVE_CREATE_PROTOCOLS = frozenset({"s3", "s3a", "memory"})
# Concurrent conditional PUTs of one key may be answered 409 (AWS: ConditionalRequestConflict,
# "retry"): the retries then see the winner's object (412) or find the key free.
_CONFLICT_RETRIES = 5
# Store roots (per filesystem) whose exclusive create was probed: None when it works, else why not.
_EXCLUSIVE_PROBED: dict[tuple[fsspec.AbstractFileSystem, str], str | None] = {}
_PROBE_LOCK = threading.Lock()


class Store:
    """A store at an fsspec URL: a local path, ``memory://name``, ``s3://bucket/prefix``, ...

    ``storage_options`` go to the fsspec filesystem (credentials, endpoint, ...).
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        self.url = url
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.fs: fsspec.AbstractFileSystem = fs
        self.root: str = root.rstrip("/") or "/"
        self.local = isinstance(fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def require(self, create: bool = False) -> Store:
        """This store, checked before a command uses it; else a NotAStoreError naming the URL.

        A store is a folder holding at least one table folder (``images/``, ``masks/``, ...).
        Commands that only read (``create`` false) need one there, so a typo is an error
        rather than an empty store; commands that make a store (``create``) need the URL not
        to be a file, and an object store that can create exclusively
        (:meth:`check_exclusive_create`), so they fail before writing anything.
        """
        self.fs.invalidate_cache()
        if self.fs.isfile(self.root):
            raise NotAStoreError(f"{self.url}: is a file, not a store folder")
        if create:
            if not self.local:
                self.check_exclusive_create()  # before anything is written there
            return self
        if any(self.fs.isdir(self.path(table)) for table in SCHEMAS):
            return self
        if self.fs.exists(self.root):
            tables = ", ".join(f"{table}/" for table in SCHEMAS)
            raise NotAStoreError(f"{self.url}: not a store (it has none of {tables})")
        raise NotAStoreError(f"{self.url}: no store there (the path does not exist)")

    # -- paths ------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """The filesystem path (no protocol) of ``parts`` under the store's root."""
        return "/".join([self.root.rstrip("/"), *parts])

    def url_of(self, path: str) -> str:
        """The URL DuckDB and users see for a filesystem path of this store."""
        return path if self.local else self.fs.unstrip_protocol(path)

    def table_dir(self, table: str, round_: int | None = None, stage: str | None = None) -> str:
        """Folder of a table's shards (a hive partition folder for partitioned tables)."""
        if table not in SCHEMAS:
            raise StorageError(f"unknown table {table!r}; tables are {sorted(SCHEMAS)}")
        if table in PARTITIONED:
            if round_ is None or stage is None:
                raise StorageError(f"table {table!r} is partitioned: round and stage are needed")
            return self.path(table, f"round={int(round_)}", f"stage={check_key(stage, 'stage')}")
        return self.path(table)

    def shard_path(
        self, table: str, key: str, round_: int | None = None, stage: str | None = None
    ) -> str:
        """Deterministic final path of the shard of ``table`` for unit of work ``key``."""
        return f"{self.table_dir(table, round_, stage)}/part-{check_key(key, 'shard key')}.parquet"

    def shard_glob(self, table: str) -> str:
        """Glob (filesystem path) matching every committed shard of a table, never a temp file."""
        if table in PARTITIONED:
            return self.path(table, "round=*", "stage=*", "part-*.parquet")
        return self.path(table, "part-*.parquet")

    def shards(self, table: str) -> list[str]:
        """Paths of a table's committed shards, sorted."""
        self.fs.invalidate_cache()
        return sorted(self.fs.glob(self.shard_glob(table)))

    def folder_glob(
        self,
        table: str,
        round_: int | None = None,
        stage: str | None = None,
        key_prefix: str = "",
    ) -> str:
        """Glob (filesystem path) of the committed shards in one table folder (one partition
        of a partitioned table) whose keys start with ``key_prefix``; never a temp file."""
        prefix = check_key(key_prefix, "key prefix") if key_prefix else ""
        return f"{self.table_dir(table, round_, stage)}/part-{prefix}*.parquet"

    def shard_keys(
        self, table: str, round_: int | None = None, stage: str | None = None
    ) -> list[str]:
        """Keys of the committed shards in one table folder (one partition of a partitioned
        table), sorted: the units of work that are done there."""
        self.fs.invalidate_cache()
        paths = self.fs.glob(self.folder_glob(table, round_, stage))
        return sorted(_shard_key(path) for path in paths)

    def shard_times(
        self,
        table: str,
        round_: int | None = None,
        stage: str | None = None,
        key_prefix: str = "",
    ) -> dict[str, float | None]:
        """Key -> modification time (POSIX seconds; None where the filesystem gives none) of
        the committed shards in one table folder whose keys start with ``key_prefix``, from
        one listing asked of the store (a cached one would miss other processes' commits)."""
        self.fs.invalidate_cache()
        found = self.fs.glob(self.folder_glob(table, round_, stage, key_prefix), detail=True)
        return {_shard_key(path): modified_time(info) for path, info in found.items()}

    def has_shard(
        self, table: str, key: str, round_: int | None = None, stage: str | None = None
    ) -> bool:
        """Whether the shard of ``table`` for unit of work ``key`` is committed (asked of the
        store itself: a listing cached before another process committed it would say no)."""
        path = self.shard_path(table, key, round_, stage)
        self.fs.invalidate_cache(self.fs._parent(path))
        return self.fs.exists(path)

    # -- the commit protocol ----------------------------------------------------------------
    def write_shard(
        self,
        table: str,
        data: pa.Table,
        key: str,
        round_: int | None = None,
        stage: str | None = None,
        exclusive: bool = False,
    ) -> str:
        """Commit ``data`` as the shard of ``table`` for unit of work ``key``; return its path.

        ``data`` is cast to the table's schema (a wrong column is an error here, not later in a
        query). A shard already there under the same key is replaced whole; with ``exclusive``
        it is kept and ``FileExistsError`` is raised instead (nothing of this write remains).
        """
        schema = SCHEMAS[table]
        try:
            data = data.select(schema.names).cast(schema)
        except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as error:
            raise StorageError(
                f"{table} shard {key!r} does not fit the {table} schema: {error}"
            ) from None
        final = self.shard_path(table, key, round_, stage)
        options = dict(
            PARQUET_OPTIONS,
            use_dictionary=[c for c in DICTIONARY_COLUMNS if c in schema.names],
            row_group_size=ROW_GROUP_ROWS,
        )
        if self.local:
            _write_local(
                final, lambda handle: pq.write_table(data, handle, **options), exclusive, True
            )
        else:
            buffer = io.BytesIO()
            pq.write_table(data, buffer, **options)
            if exclusive:
                self.create_exclusive(final, buffer.getvalue())
            else:
                self.fs.makedirs(self.fs._parent(final), exist_ok=True)
                self.fs.pipe_file(final, buffer.getvalue())
        return final

    def remove_temp_files(
        self,
        table: str,
        round_: int | None = None,
        stage: str | None = None,
        key_prefix: str = "",
        older_than_s: float | None = None,
    ) -> None:
        """Delete temp files a killed writer left in a table folder (they are never read):
        those of shard keys starting with ``key_prefix`` (all by default); with
        ``older_than_s``, only those last written at least that many seconds ago (a live
        writer's temp file is younger: it is renamed within its commit)."""
        folder = self.table_dir(table, round_, stage)
        for path in self.fs.glob(f"{folder}/.part-{key_prefix}*{_TMP_SUFFIX}"):
            try:
                if (
                    older_than_s is None
                    or time.time() - self.fs.modified(path).timestamp() >= older_than_s
                ):
                    self.fs.rm(path)
            except FileNotFoundError:  # committed or removed by its writer meanwhile
                pass

    def read_table(self, table: str) -> pa.Table:
        """Every committed shard of a table as one Arrow table (small tables; else use DuckDB)."""
        tables = []
        for path in self.shards(table):
            with self.fs.open(path, "rb") as handle:
                tables.append(pq.read_table(handle, schema=SCHEMAS[table]))
        return pa.concat_tables(tables) if tables else SCHEMAS[table].empty_table()

    # -- small JSON objects and models ------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a small object whole (temp + rename locally, one PUT elsewhere)."""
        if self.local:
            _write_local(path, lambda handle: handle.write(data), exclusive=False, durable=False)
        else:
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
            self.fs.pipe_file(path, data)

    def create_exclusive(self, path: str, data: bytes) -> None:
        """Write a small object at ``path`` only if nothing is there, else FileExistsError.

        Local disks: a hard link to a complete temp file (as an exclusive shard commit), so a
        reader never sees the object half-written (an ``O_EXCL`` create would show it empty
        first, and a lock read empty looks stale). Object stores: one conditional PUT
        (``pipe_file(..., mode="create")``: ``If-None-Match: *`` on S3, a single request for
        objects under 100 MiB, and the completion of a multipart upload is conditional too);
        the server's 412 becomes FileExistsError. A store that cannot do this raises
        :class:`NoExclusiveCreateError` (:meth:`check_exclusive_create`): never a race.
        """
        if self.local:
            _write_local(path, lambda handle: handle.write(data), exclusive=True, durable=False)
            return
        self.check_exclusive_create()
        self.fs.makedirs(self.fs._parent(path), exist_ok=True)
        self._create(path, data)

    def check_exclusive_create(self) -> None:
        """Raise :class:`NoExclusiveCreateError` naming the URL unless this store can create an
        object only when none is there. Local disks can (hard links). Object stores: only
        filesystems of ``EXCLUSIVE_CREATE_PROTOCOLS``, and only when the server refuses a
        second create of a fresh probe key (checked once per store root and process; the probe
        object is removed)."""
        if self.local:
            return
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        if not EXCLUSIVE_CREATE_PROTOCOLS.intersection(protocols):
            self._refuse(
                f"its filesystem ({type(self.fs).__name__}) has no atomic create-if-absent "
                f"(known to have one: {', '.join(sorted(EXCLUSIVE_CREATE_PROTOCOLS))})"
            )
        key = (self.fs, self.root)
        with _PROBE_LOCK:
            if key not in _EXCLUSIVE_PROBED:
                _EXCLUSIVE_PROBED[key] = self._probe_exclusive_create()
            reason = _EXCLUSIVE_PROBED[key]
        if reason is not None:
            self._refuse(reason)

    def _probe_exclusive_create(self) -> str | None:
        """Create a fresh probe key twice: None when the second create is refused, else why the
        store cannot create exclusively. Errors that say nothing about it (the network, access
        rights, a missing bucket) propagate and are not remembered."""
        probe = self.path("locks", f".exclusive-create-probe-{uuid.uuid4().hex}")
        self.fs.makedirs(self.fs._parent(probe), exist_ok=True)
        try:
            self._create(probe, b"1")
            try:
                self._create(probe, b"2")
            except FileExistsError:
                return None  # refused: the create is exclusive
        except (NotImplementedError, TypeError, ValueError) as error:
            return f"its filesystem refused a create-only write ({type(error).__name__}: {error})"
        except OSError as error:
            if error.errno != errno.ENOSYS:  # the server's 501 NotImplemented
                raise
            return f"the server does not implement conditional writes ({error})"
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(probe)
        return "the server accepted a second create of one key (it ignores If-None-Match: *)"

    def _refuse(self, reason: str) -> NoReturn:
        raise NoExclusiveCreateError(
            f"{self.url}: this store cannot create an object only when none is there: {reason}. "
            "Writer leases and image claims cannot be safe on it, so maskmill does not write "
            "there; use an S3 endpoint that honours conditional PUTs (If-None-Match: *) or a "
            "local folder."
        )

    def _create(self, path: str, data: bytes) -> None:
        """One create-only write of ``path``: FileExistsError when the key exists (an S3 412,
        whatever the server names the condition); an S3 409 (a concurrent conditional write of
        the key) is retried."""
        for attempt in range(_CONFLICT_RETRIES + 1):
            try:
                self.fs.pipe_file(path, data, mode="create")
                return
            except FileExistsError:
                raise FileExistsError(path) from None
            except OSError as error:
                code = _service_error_code(error)
                if code in ("PreconditionFailed", "412"):
                    raise FileExistsError(path) from None
                if code not in ("ConditionalRequestConflict", "409") or (
                    attempt == _CONFLICT_RETRIES
                ):
                    raise
                time.sleep(0.05 * 2**attempt)

    def write_model(self, version: int, model_bytes: bytes, meta: dict[str, Any]) -> str:
        """Store checkpoint ``models/v<version>/model.pt`` and its ``meta.json``; return the URL.

        ``meta`` may hold ``round``, ``config``, ``data_digest``, ``metrics`` and ``created_at``
        (ISO 8601). The model file goes first, so a meta.json always names a complete model.
        """
        folder = self.path("models", f"v{int(version)}")
        self.write_bytes(f"{folder}/model.pt", model_bytes)
        self.write_bytes(
            f"{folder}/meta.json", json.dumps({**meta, "version": int(version)}).encode()
        )
        return self.url_of(f"{folder}/model.pt")

    def model_metas(self) -> list[dict[str, Any]]:
        """The meta.json of every stored model, with ``uri`` of its model.pt, by version."""
        self.fs.invalidate_cache()
        metas = []
        for path in self.fs.glob(self.path("models", "v*", "meta.json")):
            meta = json.loads(self.fs.cat_file(path))
            meta["uri"] = self.url_of(path.rsplit("/", 1)[0] + "/model.pt")
            metas.append(meta)
        return sorted(metas, key=lambda m: m["version"])


def _service_error_code(error: BaseException) -> str | None:
    """The error code (``PreconditionFailed``, ...) or HTTP status of the object store's answer
    behind an fsspec OSError (s3fs keeps botocore's ClientError as the cause), else None."""
    response = getattr(error.__cause__, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(code or status) if (code or status) else None


def _shard_key(path: str) -> str:
    """The unit-of-work key of a shard path (``.../part-<key>.parquet``)."""
    return path.rsplit("/", 1)[1][len("part-") : -len(".parquet")]


def modified_time(info: Mapping[str, Any]) -> float | None:
    """The modification time (POSIX seconds) of an fsspec listing entry, under the names
    filesystems give it (local: ``mtime``; S3: ``LastModified``; GCS: ``updated``; memory:
    ``created``, a new object at every write); None when it has none."""
    for field in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(field)
        if isinstance(value, str):
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        if isinstance(value, dt.datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return None


def check_key(key: str, what: str) -> str:
    """``key`` if it is safe in a file name (letters, digits, ``.``, ``_``, ``-``), else raise."""
    if not isinstance(key, str) or not _KEY.match(key):
        raise StorageError(
            f"{what} {key!r} is not usable in a file name: use 1-128 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return key


def _write_local(
    path: str, write: Callable[[BinaryIO], object], exclusive: bool, durable: bool
) -> None:
    """Write a local file whole: ``write`` fills a temp file beside ``path`` (a hidden name
    readers never take for a shard), which then becomes ``path`` by :func:`_link` (exclusive:
    FileExistsError when ``path`` exists) or :func:`_move` (replacing it). ``durable`` fsyncs
    the data and the folder (shards; small lock and meta objects skip it). The temp file never
    outlives a failure."""
    folder, name = path.rsplit("/", 1)
    os.makedirs(folder, exist_ok=True)
    tmp = f"{folder}/.{name}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        (_link if exclusive else _move)(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if durable:
        _fsync_dir(folder)


def _move(tmp: str, final: str) -> None:
    """The commit point of a local shard: atomic rename over any older version."""
    os.replace(tmp, final)


def _link(tmp: str, final: str) -> None:
    """The commit point of an exclusive local shard: a hard link to the complete temp file
    appears atomically and fails with FileExistsError when ``final`` exists (a rename would
    replace it); then the temp name goes."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        # No hard links on this filesystem (some network and FUSE mounts): check, then rename.
        # The writer holds the image's claim, so only a writer whose claim expired can race.
        if os.path.exists(final):
            raise FileExistsError(final) from None
        os.replace(tmp, final)
        return
    os.remove(tmp)


def _fsync_dir(folder: str) -> None:
    """Make a rename durable: fsync the folder that holds the new name."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync folders; the rename is still atomic
        pass
    finally:
        os.close(fd)
