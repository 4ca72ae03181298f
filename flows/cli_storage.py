"""Storage commands of the ``maskmill`` CLI: stats, query, import-coco, export.

Thin wrappers: parsing and printing here, the work in ``storage``. Heavy imports (DuckDB,
pyarrow, matplotlib) happen inside the handlers so ``maskmill --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _stats(args: argparse.Namespace) -> int:
    from maskmill.engine.report import format_rounds, rounds_table
    from maskmill.storage import Catalog, compute_stats, format_stats
    from maskmill.storage.plots import plot_stats

    with Catalog(args.store) as catalog:
        stats = compute_stats(catalog)
        curves = rounds_table(catalog.store)
        paths = plot_stats(catalog, args.plot) if args.plot else []
    if args.json:
        print(json.dumps({**stats, "learning_curves": curves}, indent=2, default=str))
    else:
        print(format_stats(stats))
        if curves:
            print("\nlearning curves (per round):\n" + format_rounds(curves))
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _query(args: argparse.Namespace) -> int:
    import duckdb

    from maskmill.storage import Catalog

    with Catalog(args.store) as catalog:
        try:
            columns, rows = catalog.query(args.sql)
        except duckdb.Error as error:
            print(f"maskmill query: {error}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps([dict(zip(columns, row, strict=True)) for row in rows], default=str))
        return 0
    if columns:
        print("\t".join(columns))
    for row in rows:
        print("\t".join("" if v is None else str(v) for v in row))
    return 0


def _import_coco(args: argparse.Namespace) -> int:
    from maskmill.storage import import_coco

    result = import_coco(args.annotations, args.images, args.store, progress=True)
    print(
        f"imported {result.images} images and {result.masks} masks as ground truth "
        f"(round 0, stage gt) into {args.store}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from maskmill.storage import export_coco, export_sa1b

    export = export_coco if args.format == "coco" else export_sa1b
    counts = export(args.store, args.out, where=args.where, progress=True)
    print(
        f"exported {counts['masks']} masks of {counts['images']} images as {args.format} "
        f"to {args.out}"
    )
    return 0


def _storage_errors(handler):
    """Run a handler; a StorageError is printed as one clear line and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        from maskmill.storage import StorageError

        try:
            return handler(args)
        except StorageError as error:
            print(f"maskmill {args.command}: {error}", file=sys.stderr)
            return 1
        except BrokenPipeError:  # output piped into `head` and friends: not an error
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (Python flushes it at exit)
            return 0

    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the storage commands to the ``maskmill`` parser."""
    store_help = "the store: a local folder or fsspec URL (memory://, s3://, gs://, ...)"

    p = subparsers.add_parser("stats", help="statistics of a store (and plots)")
    p.add_argument("--store", required=True, help=store_help)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--plot", metavar="DIR", help="also write PNG figures into DIR")
    p.set_defaults(handler=_storage_errors(_stats))

    p = subparsers.add_parser(
        "query",
        help="run SQL over the store's tables",
        description="Run DuckDB SQL over views images, masks, rounds, failures, models.",
    )
    p.add_argument("--store", required=True, help=store_help)
    p.add_argument("--json", action="store_true", help="print rows as JSON objects")
    p.add_argument("sql", help='e.g. "SELECT stage, count(*) FROM masks GROUP BY stage"')
    p.set_defaults(handler=_storage_errors(_query))

    p = subparsers.add_parser("import-coco", help="import COCO instances as ground truth")
    p.add_argument("--annotations", required=True, help="COCO instances JSON file")
    p.add_argument("--images", required=True, help="folder the file_name values are relative to")
    p.add_argument("--store", required=True, help=store_help)
    p.set_defaults(handler=_storage_errors(_import_coco))

    p = subparsers.add_parser("export", help="export masks as COCO JSON or SA-1B files")
    p.add_argument("--store", required=True, help=store_help)
    p.add_argument("--format", required=True, choices=("coco", "sa1b"))
    p.add_argument(
        "--out",
        required=True,
        help="COCO: the JSON file to write; SA-1B: the folder for per-image files",
    )
    p.add_argument("--where", help="SQL filter over masks m, e.g. \"m.stage = 'auto'\"")
    p.set_defaults(handler=_storage_errors(_export))
