"""CLI subcommands of the data stages: ``gptbert clean``, ``train-tokenizer``, ``shard``."""

from __future__ import annotations

import argparse
import json


def _print_summary(result: dict, keys: tuple[str, ...]) -> None:
    print(json.dumps({k: result[k] for k in keys if k in result}, indent=2, sort_keys=True))


def _clean(args: argparse.Namespace) -> int:
    from .options import config_from_args
    from common.config.base import replace

    from tokenization.clean import clean_corpus

    cfg = config_from_args(args).clean
    if args.inputs:
        cfg = replace(cfg, inputs=list(args.inputs))
    result = clean_corpus(cfg, args.out, progress_bar=not args.no_progress)
    _print_summary(result, ("identity", "documents_sha256", "totals", "seconds"))
    return 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    from .options import config_from_args

    from tokenization.tokenizer import train_tokenizer

    cfg = config_from_args(args).tokenizer
    result = train_tokenizer(args.documents, cfg, args.out, progress_bar=not args.no_progress)
    _print_summary(result, ("identity", "tokenizer_sha256", "vocab_size", "documents", "seconds"))
    return 0


def _shard(args: argparse.Namespace) -> int:
    from .options import config_from_args

    from tokenization.shards import write_shards

    cfg = config_from_args(args).shard
    result = write_shards(args.documents, args.tokenizer, cfg, args.out,
                          progress_bar=not args.no_progress)
    summary = {s: {k: v for k, v in d.items() if k != "shards"} for s, d in result["splits"].items()}
    _print_summary(dict(result, splits=summary), ("identity", "dtype", "splits", "seconds"))
    return 0


def register(subparsers) -> None:
    from .options import add_config_args

    p = subparsers.add_parser(
        "clean", help="clean raw text (.txt/.gz/.jsonl/.parquet) into documents.parquet",
        description="Decode, normalise, apply rules, split long and drop empty/duplicate "
                    "documents; writes OUT/documents.parquet and OUT/stats.json.")
    p.add_argument("inputs", nargs="*", help="input files or folders (default: clean.inputs)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(p)
    p.set_defaults(func=_clean)

    p = subparsers.add_parser(
        "train-tokenizer", help="train the byte-level BPE tokenizer on cleaned documents",
        description="Train the SPEC section 4 tokenizer; writes OUT/tokenizer.json and "
                    "OUT/stats.json.")
    p.add_argument("documents", help="documents.parquet, or the clean stage's folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(p)
    p.set_defaults(func=_train_tokenizer)

    p = subparsers.add_parser(
        "shard", help="encode cleaned documents into Arrow token shards",
        description="Encode documents into train/valid Arrow IPC shards; writes OUT/manifest.json "
                    "and OUT/{train,valid}-*.arrow.")
    p.add_argument("documents", help="documents.parquet, or the clean stage's folder")
    p.add_argument("tokenizer", help="tokenizer.json, or the train-tokenizer stage's folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(p)
    p.set_defaults(func=_shard)
