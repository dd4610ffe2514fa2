"""Options shared by the config-driven subcommands: ``--config``, ``--preset``, ``--set``."""

from __future__ import annotations

import argparse


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The options every config-driven subcommand shares."""
    parser.add_argument("--config", help="YAML file with a (partial) PipelineConfig")
    parser.add_argument("--preset", help="named preset: tiny, mini, small, base")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set train.lr=0.01 (repeatable)")


def config_from_args(args: argparse.Namespace):
    """The validated PipelineConfig from ``--preset``, ``--config`` and ``--set``."""
    from common.config import load_config

    return load_config(preset=args.preset, path=args.config, overrides=args.overrides)
