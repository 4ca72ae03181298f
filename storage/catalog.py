"""A DuckDB catalog over a store: one view per table, read straight from the Parquet shards.

Masks are read with hive partitioning (``round=R/stage=S`` folders). Non-local stores register
their fsspec filesystem with DuckDB, so ``memory://``, ``s3://``, ``gs://``... read the same way
(``s3://`` through s3fs, not DuckDB's own httpfs: one set of credentials, the environment's).
A catalog is a snapshot of the shard *list* when it was opened (listed afresh then:
``Store.shards`` drops fsspec's cached listings, which then spare DuckDB a request per file);
reopen it to see new shards.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from typing import Any

import duckdb
import pyarrow as pa

from maskmill.storage.schema import BOX, MODELS, PARTITIONED, POINT, SCHEMAS
from maskmill.storage.store import Store

TABLES = tuple(SCHEMAS)
# Parquet has no fixed-size lists: these come back as plain lists, so the views cast them to
# the DuckDB arrays the Arrow schema means (the same types as an empty table's).
_CASTS = {BOX: "FLOAT[4]", pa.list_(POINT): "FLOAT[2][]"}
# Where a folder query (Catalog.query_folder) names its shards.
SHARDS = "{shards}"
# What DuckDB raises when a folder's files do not all have the columns of the first one: a
# column the first lacks (at bind) or a later file lacks (at scan).
_SCHEMA_MISMATCH = (duckdb.BinderException, duckdb.InvalidInputException)


def _literal(text: str) -> str:
    """``text`` as an SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _model_row(meta: dict[str, Any]) -> dict[str, Any]:
    """A models-table row of a model's meta.json (JSON fields kept as JSON text)."""
    row = {name: meta.get(name) for name in MODELS.names}
    for name in ("config", "metrics"):
        if row[name] is not None and not isinstance(row[name], str):
            row[name] = json.dumps(row[name])
    if isinstance(row["created_at"], str):
        row["created_at"] = dt.datetime.fromisoformat(row["created_at"])
    return row


class Catalog:
    """DuckDB connection with views ``images``, ``masks``, ``rounds``, ``failures``, ``models``
    and ``reviews``; ``tables`` (default: all) opens only those views. A view reads the schema
    of every shard of its table when it is made, so a question about a few tables opens only
    theirs (:func:`~storage.queries.stage_figures` needs ``images`` alone)."""

    def __init__(
        self, store: Store | str, threads: int | None = None, tables: Iterable[str] = TABLES
    ) -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        tables = tuple(tables)
        unknown = sorted(set(tables) - set(TABLES))
        if unknown:
            raise ValueError(f"unknown tables {unknown}; tables are {sorted(TABLES)}")
        self.con = duckdb.connect(config={"threads": threads} if threads else {})
        if not self.store.local:
            self.con.register_filesystem(self.store.fs)
        for table in tables:
            try:
                self.con.execute(f"CREATE VIEW {table} AS {self._source(table)}")
            except duckdb.BinderException:
                # A column added to the schema after every shard was written: union_by_name
                # cannot fill what no shard has, so the view gives it as null. Looked up only
                # then (it reads every shard's footer a second time).
                present = self.columns(table)
                self.con.execute(f"CREATE VIEW {table} AS {self._source(table, present)}")

    def columns(self, table: str) -> set[str]:
        """Names of the columns a table's shards hold (any shard): a column of the schema
        added after every shard was written is missing here (and null in the view)."""
        if not self.store.shards(table):
            return set(SCHEMAS[table].names)
        rows = self.con.execute(f"DESCRIBE SELECT * FROM {self.scan(table)}").fetchall()
        return {row[0] for row in rows}

    def _columns(self, table: str, present: set[str] | None = None) -> str:
        """The SELECT list of a table's schema columns (fixed-size lists cast to arrays); those
        not in ``present`` (when given) are null of their type. Registers the empty table of
        the schema, ``_empty_<table>``."""
        schema = SCHEMAS[table]
        self.con.register(f"_empty_{table}", schema.empty_table())
        missing = {f.name for f in schema} - present if present is not None else set()
        types: dict[str, str] = {}
        if missing:
            rows = self.con.execute(f"DESCRIBE SELECT * FROM _empty_{table}").fetchall()
            types = {name: kind for name, kind, *_ in rows}
        return ", ".join(
            f'NULL::{types[f.name]} AS "{f.name}"'
            if f.name in missing
            else f'"{f.name}"::{_CASTS[f.type]} AS "{f.name}"'
            if f.type in _CASTS
            else f'"{f.name}"'
            for f in schema
        )

    def _source(self, table: str, present: set[str] | None = None) -> str:
        """SELECT over a table's shards, or over an empty table of its schema when it has none;
        schema columns not in ``present`` (when given) are null of their type."""
        columns = self._columns(table, present)
        if table == "models":
            rows = [_model_row(meta) for meta in self.store.model_metas()]
            self.con.register("_models_rows", pa.Table.from_pylist(rows, MODELS))
            return f"SELECT {columns} FROM _models_rows"
        if not self.store.shards(table):
            return f"SELECT {columns} FROM _empty_{table}"
        source = self.scan(table)
        if table == "images":
            # Content-addressed ids: an image imported twice (two shards) is one image.
            return (
                f"SELECT {columns} FROM {source} "
                "QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY added_at, uri) = 1"
            )
        return f"SELECT {columns} FROM {source}"

    def scan(self, table: str) -> str:
        """The ``read_parquet(...)`` call over a table's shards (for queries that want its
        virtual columns ``filename`` and ``file_row_number``; the view does not show them)."""
        glob = _literal(self.store.url_of(self.store.shard_glob(table)))
        # union_by_name: shards written before a column was added read it as null.
        if table in PARTITIONED:
            return (
                f"read_parquet({glob}, hive_partitioning = true, union_by_name = true, "
                "hive_types = {'round': INTEGER, 'stage': VARCHAR})"
            )
        return f"read_parquet({glob}, union_by_name = true)"

    def query_folder(
        self,
        query: str,
        params: Sequence[Any],
        table: str,
        round_: int | None = None,
        stage: str | None = None,
        key_prefix: str = "",
    ) -> list[tuple]:
        """Rows of ``query``, in which :data:`SHARDS` stands for a subquery of ``table``'s
        schema columns over the shards of one folder only: a partition (``round_`` and
        ``stage``) of a partitioned table, those whose keys start with ``key_prefix``. The
        caller knows there is one (``read_parquet`` of no file is an error).

        A question about one round and stage thus reads its files, not every file of the table
        as the views do. The files are read as DuckDB reads a list of one schema (the first
        file's; each other file's footer once, as it is scanned: about 25 % less CPU than
        ``union_by_name`` at 5,000 shards, which reads every footer to bind and again to scan).
        When they differ (a column added to the schema after some were written), DuckDB refuses
        (a column missing from the first file or from a later one), and they are read again by
        name, absent columns null.
        """
        glob = _literal(self.store.url_of(self.store.folder_glob(table, round_, stage, key_prefix)))
        # hive_partitioning off: round and stage are the files' own columns, with their types.
        scan = f"read_parquet({glob}, hive_partitioning = false)"
        present: set[str] | None = None  # every schema column
        try:
            source = f"(SELECT {self._columns(table)} FROM {scan})"
            return self.con.execute(query.replace(SHARDS, source), list(params)).fetchall()
        except _SCHEMA_MISMATCH:
            scan = f"read_parquet({glob}, hive_partitioning = false, union_by_name = true)"
            described = self.con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()
            present = {row[0] for row in described}
        source = f"(SELECT {self._columns(table, present)} FROM {scan})"
        return self.con.execute(query.replace(SHARDS, source), list(params)).fetchall()

    def sql(self, query: str, params: list[Any] | None = None) -> duckdb.DuckDBPyRelation:
        """Run a query; the result is a DuckDB relation (``.fetchall()``, ``.arrow()``, ...)."""
        return self.con.sql(query, params=params)

    def query(self, query: str, params: list[Any] | None = None) -> tuple[list[str], list[tuple]]:
        """Column names and rows of a query."""
        cursor = self.con.execute(query, params or [])
        columns = [d[0] for d in cursor.description] if cursor.description else []
        return columns, cursor.fetchall()

    def close(self) -> None:
        """Close the DuckDB connection."""
        self.con.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
