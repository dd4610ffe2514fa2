"""The ``gptbert`` console command: one subcommand per stage.

Each subcommand calls the same library function that the matching Prefect task calls. The
subcommand modules of this package register their parsers through ``register(subparsers)`` and
import heavy libraries inside their handlers, so ``gptbert --help`` stays fast and a stage only
pays for the libraries it uses.
"""

from __future__ import annotations

import argparse
import os
import sys

from common.errors import error_line

from . import data, evaluate, export, model, pipeline, submission, train

# Subcommand groups, in the order `gptbert --help` lists them.
COMMAND_GROUPS = (data, model, train, export, evaluate, submission, pipeline)


DEBUG_ENV = "GPTBERT_DEBUG"
# Errors caused by what the user gave (a file, a folder, a config value): one line, exit code 1.
USER_ERRORS = (ValueError, OSError, LookupError)


def build_parser() -> argparse.ArgumentParser:
    """The ``gptbert`` argument parser with every subcommand group registered."""
    parser = argparse.ArgumentParser(prog="gptbert", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (also: {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``gptbert`` command and return its exit code: 0, 1 for an error (printed as one line
    naming the file or field; ``--debug`` or GPTBERT_DEBUG=1 shows the traceback), 2 without a
    subcommand, 130 after Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"gptbert {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (the one place every error becomes one line)
        if debug:
            raise
        kind = "error" if isinstance(exc, USER_ERRORS) else f"unexpected {type(exc).__name__}"
        hint = "" if isinstance(exc, USER_ERRORS) else f" (rerun with --debug or {DEBUG_ENV}=1 for the traceback)"
        print(f"gptbert {args.command}: {kind}: {error_line(exc)}{hint}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
