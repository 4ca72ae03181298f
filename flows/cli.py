"""The ``maskmill`` command line. Each command group lives in its own ``flows/cli_*.py`` module
with a ``register(subparsers)`` function that adds its sub-commands."""

from __future__ import annotations

import argparse
import importlib
import sys

# Command-group modules, imported lazily so `maskmill --help` stays fast.
COMMAND_MODULES = [
    "maskmill.flows.cli_model",
    "maskmill.flows.cli_storage",
    "maskmill.flows.cli_train",
    "maskmill.flows.cli_engine",
    "maskmill.flows.cli_serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskmill", description="An open data engine for promptable segmentation."
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
