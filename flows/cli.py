"""The ``maskmill`` command line. Each command group lives in its own ``flows/cli_*.py`` module
with a ``register(subparsers)`` function that adds its sub-commands."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Command-group modules, imported lazily so `maskmill --help` stays fast.
COMMAND_MODULES = [
    "maskmill.flows.cli_model",
    "maskmill.flows.cli_storage",
    "maskmill.flows.cli_train",
    "maskmill.flows.cli_engine",
    "maskmill.flows.cli_serve",
    "maskmill.flows.cli_users",
    "maskmill.flows.cli_boxes",
    "maskmill.flows.cli_text",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskmill", description="An open data engine for promptable segmentation."
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error instead of its one-line message (also: "
        "MASKMILL_DEBUG=1)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command: exit 0 when it succeeds; a user's error (bad input, a missing file, a
    bad store or SQL) is one line ``maskmill <command>: <what and where>`` and exit 2, or its
    traceback with ``--debug`` / ``MASKMILL_DEBUG=1``. Other errors (bugs) keep their traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("MASKMILL_DEBUG", "") not in ("", "0")
    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:  # output piped into `head` and friends: not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (Python flushes it at exit)
        return 0
    except Exception as error:  # not BaseException: Ctrl-C and SystemExit pass through
        if debug or not is_user_error(error):
            raise
        print(f"maskmill {args.command}: {error_message(error)}", file=sys.stderr)
        return 2


def is_user_error(error: Exception) -> bool:
    """Whether an error is about what the user gave (values, files, a store, SQL), not a bug:
    ``ValueError`` (``CheckpointError`` and the storage errors about input are ones),
    ``OSError``, ``StorageError`` and DuckDB's errors."""
    kinds = (
        ValueError,
        OSError,
        *_loaded("maskmill.storage.errors", "StorageError"),
        *_loaded("duckdb", "Error"),
    )
    return isinstance(error, kinds)


def error_message(error: BaseException) -> str:
    """An error's message for its one line: an OS error as ``<reason>: <path>``; a DuckDB
    error without the excerpt of the SQL it quotes after a blank line (its first lines name the
    problem)."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        return f"{error.strerror}: {error.filename}"
    text = str(error) or type(error).__name__
    if isinstance(error, _loaded("duckdb", "Error")):
        text = " ".join(text.split("\n\n", 1)[0].splitlines())
    return text


def _loaded(module: str, name: str) -> tuple[type[BaseException], ...]:
    """``(module.name,)`` when the command imported ``module``, else ``()``. Looked up, not
    imported: a module never imported raised nothing, and importing it here would cost every
    command DuckDB's import time."""
    loaded = sys.modules.get(module)
    return (getattr(loaded, name),) if loaded is not None else ()


if __name__ == "__main__":
    sys.exit(main())
