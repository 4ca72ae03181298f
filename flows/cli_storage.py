"""Storage commands of the ``maskmill`` CLI: stats, query, import-coco, export.

Thin wrappers: parsing and printing here, the work in ``storage``. Heavy imports (DuckDB,
pyarrow, matplotlib) happen inside the handlers so ``maskmill --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys


def _stats(args: argparse.Namespace) -> int:
    from maskmill.engine.report import format_rounds, rounds_table
    from maskmill.storage import Catalog, Store, compute_stats, format_stats
    from maskmill.storage.plots import plot_stats

    with Catalog(Store(args.store).require()) as catalog:
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
    from maskmill.storage import Catalog, Store

    with Catalog(Store(args.store).require()) as catalog:
        columns, rows = catalog.query(args.sql)
    if args.json:
        print(json.dumps([dict(zip(columns, row, strict=True)) for row in rows], default=str))
        return 0
    if columns:
        print("\t".join(columns))
    for row in rows:
        print("\t".join("" if v is None else str(v) for v in row))
    return 0


def _import_coco(args: argparse.Namespace) -> int:
    from maskmill.storage import Store, import_coco

    store = Store(args.store).require(create=True)
    result = import_coco(args.annotations, args.images, store, progress=True)
    print(
        f"imported {result.images} images and {result.masks} masks as ground truth "
        f"(round 0, stage gt) into {args.store}"
        + (
            f"; {result.clipped} polygon mask(s) reached past their image's edge and were "
            "clipped to it"
            if result.clipped
            else ""
        )
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    import duckdb

    from maskmill.flows.cli import error_message
    from maskmill.storage import Store, export_coco, export_sa1b

    export = export_coco if args.format == "coco" else export_sa1b
    store = Store(args.store).require()
    keep = not args.only_images_with_masks
    try:
        counts = export(
            store,
            args.out,
            where=args.where,
            progress=True,
            keep_images_without_masks=keep,
            approved_only=args.approved_only,
        )
    except duckdb.Error as error:
        if not args.where:
            raise
        # The filter is the SQL the user wrote: name it, not the query it was put into.
        raise ValueError(f"--where {args.where!r}: {error_message(error)}") from error
    without = counts["images_without_masks"]
    mask = "a matching mask" if args.where else "a mask"
    if not without:
        note = ""
    elif keep:
        note = f" ({without} of them without {mask}; --only-images-with-masks drops them)"
    else:
        note = f" ({without} images without {mask} left out)"
    print(
        f"exported {counts['masks']} masks of {counts['images']} images as {args.format} "
        f"to {args.out}{note}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the storage commands to the ``maskmill`` parser."""
    store_help = "the store: a local folder or fsspec URL (memory://, s3://, gs://, ...)"

    p = subparsers.add_parser("stats", help="statistics of a store (and plots)")
    p.add_argument("--store", required=True, help=store_help)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--plot", metavar="DIR", help="also write PNG figures into DIR")
    p.set_defaults(handler=_stats)

    p = subparsers.add_parser(
        "query",
        help="run SQL over the store's tables",
        description="Run DuckDB SQL over views images, masks, rounds, failures, models, reviews.",
    )
    p.add_argument("--store", required=True, help=store_help)
    p.add_argument("--json", action="store_true", help="print rows as JSON objects")
    p.add_argument("sql", help='e.g. "SELECT stage, count(*) FROM masks GROUP BY stage"')
    p.set_defaults(handler=_query)

    p = subparsers.add_parser("import-coco", help="import COCO instances as ground truth")
    p.add_argument("--annotations", required=True, help="COCO instances JSON file")
    p.add_argument("--images", required=True, help="folder the file_name values are relative to")
    p.add_argument("--store", required=True, help=store_help)
    p.set_defaults(handler=_import_coco)

    p = subparsers.add_parser("export", help="export masks as COCO JSON or SA-1B files")
    p.add_argument("--store", required=True, help=store_help)
    p.add_argument("--format", required=True, choices=("coco", "sa1b"))
    p.add_argument(
        "--out",
        required=True,
        help="COCO: the JSON file to write; SA-1B: the folder for per-image files",
    )
    p.add_argument("--where", help="SQL filter over masks m, e.g. \"m.stage = 'auto'\"")
    p.add_argument(
        "--only-images-with-masks",
        action="store_true",
        help="list only images with an exported mask (default: every image of the store, as "
        "COCO files do; image ids are the same either way)",
    )
    p.add_argument(
        "--approved-only",
        action="store_true",
        help="only masks a reviewer approved (and ground truth); default: a round and stage "
        "with review verdicts gives its approved masks, one without gives all",
    )
    p.set_defaults(handler=_export)
