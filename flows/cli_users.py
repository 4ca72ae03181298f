"""``maskmill users``: the accounts of the people who annotate a store (``storage.accounts``)."""

from __future__ import annotations

import argparse
import urllib.parse
from typing import TYPE_CHECKING

from maskmill.flows.cli_serve import DEFAULT_HOST, DEFAULT_PORT

if TYPE_CHECKING:
    from maskmill.storage.accounts import Accounts


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "users",
        help="accounts of the people who annotate a store (login links for maskmill serve)",
        description=(
            "Accounts of a store: with any, `maskmill serve` on that store answers only requests "
            "with a valid token (a login link's cookie, or Authorization: Bearer) and may be "
            "bound to a network address. Tokens are shown once and stored hashed."
        ),
    )
    commands = parser.add_subparsers(dest="users_command", metavar="COMMAND", required=True)
    store_help = "the store: a local folder or fsspec URL"

    add = commands.add_parser("add", help="make an account; prints its login link once")
    add.add_argument("name", help="the person's name (their masks' source is web:<name>)")
    add.add_argument("--store", required=True, help=store_help)
    add.add_argument(
        "--role",
        choices=("annotator", "reviewer"),
        default="annotator",
        help="annotator (default) or reviewer",
    )
    add.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"the server's address as people reach it, for the link (default {DEFAULT_HOST})",
    )
    add.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"its port (default {DEFAULT_PORT})"
    )
    add.set_defaults(handler=_add)

    listing = commands.add_parser("list", help="the store's accounts (never their tokens)")
    listing.add_argument("--store", required=True, help=store_help)
    listing.set_defaults(handler=_list)

    revoke = commands.add_parser("revoke", help="revoke an account: its token stops at once")
    revoke.add_argument("name")
    revoke.add_argument("--store", required=True, help=store_help)
    revoke.set_defaults(handler=_revoke)


def _accounts(url: str) -> Accounts:
    # Imported here, not at the top: `maskmill --help` stays fast.
    from maskmill.storage import Store
    from maskmill.storage.accounts import Accounts

    return Accounts(Store(url).require())


def _add(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be 1-65535, got {args.port}")
    token = _accounts(args.store).add(args.name, args.role)
    host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address
    query = urllib.parse.urlencode({"token": token})
    print(f"added {args.name} ({args.role}) to {args.store}; shown once, keep it secret:")
    print(f"login link: http://{host}:{args.port}/login?{query}")
    print(f"token (Authorization: Bearer): {token}")
    return 0


def _list(args: argparse.Namespace) -> int:
    accounts = _accounts(args.store).list()
    if not accounts:
        print(f"{args.store} has no accounts (maskmill serve answers loopback only)")
        return 0
    print("name\trole\tstatus\tcreated_at\trevoked_at")
    for account in accounts:
        status = "active" if account.active else "revoked"
        revoked = account.revoked_at or ""
        print(f"{account.name}\t{account.role}\t{status}\t{account.created_at}\t{revoked}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    account = _accounts(args.store).revoke(args.name)
    print(f"revoked {account.name} ({account.role}) in {args.store}: the token no longer works")
    return 0
