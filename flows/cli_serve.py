"""``maskmill serve``: the annotation page for the assisted-manual and semi-automatic stages."""

from __future__ import annotations

import argparse
import getpass

from maskmill.flows.cli_engine import add_encoder_precision_argument

DEFAULT_HOST = "127.0.0.1"  # this machine only: without accounts, the only address allowed
DEFAULT_PORT = 8765


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="annotate a round in the browser (assisted-manual or semi-automatic stage)",
        description=(
            "Serve the annotation page for one round and stage of a store: it shows each person "
            "the next image of that round nobody else holds, the model draws the mask of each "
            "click, a brush and an eraser correct it, and an image's accepted masks are written "
            "to the store, with their clicks, strokes, working seconds and category, when the "
            "person finishes it. Any number of people, and of serve processes sharing the "
            "store, annotate one round at once (per-image claims). With accounts in the store "
            "(maskmill users add) every request needs a person's token. Ctrl-C or SIGTERM "
            "stops it (images with accepted masks are kept, the others go back to the queue)."
        ),
    )
    parser.add_argument("--store", required=True, help="store URL (folder or fsspec URL)")
    parser.add_argument(
        "--round",
        type=int,
        help="round to annotate (default: the stage's unfinished round, else a new one)",
    )
    parser.add_argument(
        "--stage",
        choices=("manual", "semi"),
        default="manual",
        help="manual: clicks only; semi: the model pre-fills confident masks (default manual)",
    )
    parser.add_argument(
        "--checkpoint",
        help="model file (default: the store's model for the round, else the shipped model)",
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to bind (default {DEFAULT_HOST}: this machine only); any other address "
        "needs accounts in the store (maskmill users add)",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--annotator",
        default=None,
        help="your name, stored as source web:<name> (default: the login name); with accounts, "
        "each person's account name is used instead",
    )
    parser.add_argument(
        "--no-embedding-cache",
        dest="embedding_cache",
        action="store_false",
        help="encode each image opened instead of reading its embedding from the store's "
        "embedding cache (and writing it there)",
    )
    parser.add_argument(
        "--prefill-concept",
        action="append",
        metavar="NAME",
        help="semi stage: pre-fill every instance of this concept (repeatable; the model's "
        "concept head, learned from the store's categories) instead of the generator's "
        "confident masks, so a team labels one category at a time",
    )
    add_encoder_precision_argument(parser)
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from maskmill.engine.web.app import check_bind, serve
    from maskmill.engine.web.session import (
        AnnotationSession,
        WebAnnotator,
        default_round,
        resolve_model,
    )
    from maskmill.flows.processes import stop_on_sigterm
    from maskmill.storage import Store
    from maskmill.storage.accounts import Accounts

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be 1-65535, got {args.port}")
    # Annotating needs images, so a store that is not there is a typo: refused, not created.
    store = Store(args.store).require()
    check_bind(args.host, Accounts(store))  # before the model loads: refused at once
    round_ = args.round if args.round is not None else default_round(store, args.stage)
    model, version, meta = resolve_model(store, round_, args.checkpoint)
    name = args.annotator or _login()
    session = AnnotationSession(
        store,
        round_,
        args.stage,
        model,
        version,
        WebAnnotator(name),
        model_meta=meta,
        embedding_cache=args.embedding_cache,
        prefill_concepts=args.prefill_concept,
        encoder_precision=args.encoder_precision or "fp32",
    )
    with stop_on_sigterm("serve"), session:
        if not session.images:
            raise ValueError(f"{args.store} has no images; import some first")
        print(
            f"annotating round {round_} ({args.stage}) of {args.store}: "
            f"{len(session.images)} images, model "
            f"{'v' + str(version) if version is not None else meta.get('source')}; "
            f"open http://{args.host}:{args.port}/",
            flush=True,
        )
        serve(session, args.host, args.port)
    return 0


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        return "web"
