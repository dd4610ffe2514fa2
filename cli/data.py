"""CLI subcommands of the data stages: ``gptbert clean``, ``train-tokenizer``, ``shard``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from common.errors import error_line

from .options import add_config_args, config_from_args


def _print_record(record: dict, stream=None) -> None:
    """The stage record's headline: identity, output digest, statistics and wall time."""
    keys = ("stage", "identity", "output", "output_digest", "stats", "seconds")
    print(json.dumps({k: record[k] for k in keys if k in record}, indent=2, sort_keys=True), file=stream)


def _run_stage(args: argparse.Namespace, cfg, stage: str, engine: str, run: Callable[[bool], dict]) -> dict:
    """Run a data stage and print its record. On the Ray engine, what Ray and its workers print
    goes to ``<workdir>/logs/<stage>-<time>.log`` (``cli/console.py``), the terminal shows the
    stage's line."""
    if engine != "ray":
        record = run(not args.no_progress)
        _print_record(record)
        return record
    from common import storage

    from .console import Console, log_path_for

    console = Console(log_path_for(storage.local_home(cfg.workdir), stage), title=f"gptbert {stage} (Ray): {args.out}")
    with console:
        console.event("stage_started", {"stage": stage})
        try:
            record = run(False)
        except BaseException as exc:
            console.event("stage_failed", {"stage": stage, "error": error_line(exc)})
            raise
        console.event("stage_finished", {"stage": stage, "cached": False, "path": str(args.out)})
    _print_record(record, console.out)
    return record


def _clean(args: argparse.Namespace) -> int:
    from common.config.base import replace
    from gptbert.distributed.data_stages import run_clean

    cfg = config_from_args(args)
    if args.inputs:
        cfg = replace(cfg, clean=replace(cfg.clean, inputs=list(args.inputs)))

    def run(progress: bool) -> dict:
        record = run_clean(cfg, args.out, progress=progress)
        record["stats"] = {"totals": record["stats"]["totals"]}  # the per-file listing stays in stage.json
        return record

    _run_stage(args, cfg, "clean", cfg.clean.engine, run)
    return 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    from common.config import ConfigError
    from tokenization.tokenizer import train_tokenizer

    try:
        cfg = config_from_args(args).tokenizer
    except ConfigError as exc:
        if exc.field != "model.vocab_size":
            raise
        # The vocabularies must agree for pretraining; here it is the tokenizer's that was set.
        raise ConfigError("tokenizer.vocab_size", f"{exc.reason}; set model.vocab_size to the same value "
                                                  "(or use a preset)") from None
    record = train_tokenizer(args.documents, cfg, args.out, progress_bar=not args.no_progress)
    _print_record(record)
    warning = vocabulary_warning(record)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def vocabulary_warning(record: dict) -> str | None:
    """A warning when the trained tokenizer is smaller than ``tokenizer.vocab_size`` asked for."""
    got, asked = record["stats"]["vocab_size"], record["stats"]["vocab_size_requested"]
    if got >= asked:
        return None
    return (f"the tokenizer has {got} tokens, fewer than tokenizer.vocab_size = {asked}: the corpus holds too "
            f"few distinct merges; a model with vocab_size {asked} still works (its extra rows stay unused)")


def _shard(args: argparse.Namespace) -> int:
    from gptbert.distributed.data_stages import run_shard

    cfg = config_from_args(args)
    _run_stage(args, cfg, "shard", cfg.shard.engine,
               lambda progress: run_shard(cfg, args.documents, args.tokenizer, args.out, progress=progress))
    return 0


def register(subparsers) -> None:
    """Add the ``clean``, ``train-tokenizer`` and ``shard`` subcommands."""
    p = subparsers.add_parser(
        "clean", help="clean raw text (.txt/.gz/.jsonl/.parquet) into documents.parquet",
        description="Decode, normalise, apply rules, split long and drop empty/duplicate "
                    "documents; writes OUT/documents.parquet and the record OUT/stage.json. "
                    "--set clean.engine=ray runs it as a Ray Data pipeline (launch.ray_address, "
                    "or a local Ray): the same output.")
    p.add_argument("inputs", nargs="*", help="input files or folders (default: clean.inputs)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(p)
    p.set_defaults(func=_clean)

    p = subparsers.add_parser(
        "train-tokenizer", help="train the byte-level BPE tokenizer on cleaned documents",
        description="Train the recipe §4 tokenizer; writes OUT/tokenizer.json and the "
                    "record OUT/stage.json.")
    p.add_argument("documents", help="documents.parquet, or the clean stage's folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(p)
    p.set_defaults(func=_train_tokenizer)

    p = subparsers.add_parser(
        "shard", help="encode cleaned documents into Arrow token shards",
        description="Encode documents into train/valid Arrow IPC shards; writes OUT/manifest.json, "
                    "OUT/{train,valid}-*.arrow, the tokenizer and the record OUT/stage.json. "
                    "--set shard.engine=ray runs it as a Ray Data pipeline: the same token ids "
                    "and split, shards cut per block.")
    p.add_argument("documents", help="documents.parquet, or the clean stage's folder")
    p.add_argument("tokenizer", help="tokenizer.json, or the train-tokenizer stage's folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(p)
    p.set_defaults(func=_shard)
