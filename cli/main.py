"""The ``gptbert`` console command: one subcommand per stage.

Each subcommand calls the same library function that the matching Prefect task calls. The
subcommand modules of this package register their parsers through ``register(subparsers)`` and
import heavy libraries inside their handlers, so ``gptbert --help`` stays fast and a stage only
pays for the libraries it uses.
"""

from __future__ import annotations

import argparse
import sys

from . import data, evaluate, model, pipeline, train

# Subcommand groups, in the order `gptbert --help` lists them.
COMMAND_GROUPS = (data, model, train, evaluate, pipeline)


def build_parser() -> argparse.ArgumentParser:
    """The ``gptbert`` argument parser with every subcommand group registered."""
    parser = argparse.ArgumentParser(prog="gptbert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``gptbert`` command and return its exit code (1 for a config, missing-file or value
    error; 2 without a subcommand)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from common.config import ConfigError

    try:
        result = args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"gptbert {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
