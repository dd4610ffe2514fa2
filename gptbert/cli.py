"""The ``gptbert`` console command: one subcommand per stage.

Each subcommand calls the same library function that the matching Prefect task calls. Subcommand
modules register themselves through a ``register(subparsers)`` function and are imported lazily so
``gptbert --help`` stays fast and a stage only pays for the libraries it uses.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that own subcommands; each exposes ``register(subparsers)``.
COMMAND_MODULES = (
    "tokenization.commands",  # clean, train-tokenizer, shard
    "gptbert.commands.model",  # model-info
    "gptbert.commands.train",  # pretrain
    "gptbert.commands.evaluate",  # score, generate, evaluate
    "flows.commands",  # pipeline, demo
)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The options every config-driven subcommand shares."""
    parser.add_argument("--config", help="YAML file with a (partial) PipelineConfig")
    parser.add_argument("--preset", help="named preset: tiny, mini, small, base")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set train.lr=0.01 (repeatable)")


def config_from_args(args: argparse.Namespace):
    from gptbert.config import load_config

    return load_config(preset=args.preset, path=args.config, overrides=args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptbert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from gptbert.config import ConfigError

    try:
        result = args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"gptbert {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
