"""CLI: `gptbert export` (a trained model as a Hugging Face `transformers` folder)."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    """Add the ``export`` subcommand."""
    p = subparsers.add_parser(
        "export", help="write a trained model (and its word-milestone models) as a transformers folder "
                       "that AutoModel*/AutoTokenizer load with trust_remote_code=True")
    p.add_argument("model_dir", help="a pretraining run folder (its model/ and milestones/) or a model folder")
    p.add_argument("--out", required=True, help="the folder to write (created; an earlier export there is replaced)")
    p.add_argument("--git", action="store_true",
                   help="also make --out a git repository laid out like a hub model repository: the final "
                        "model on main, each word milestone on a chck_{N}M branch")
    p.set_defaults(func=export_command)


def export_command(args: argparse.Namespace) -> int:
    """``gptbert export``: write the folder and print its record's summary."""
    from gptbert.export import export_model

    record = export_model(args.model_dir, args.out, git_repo=args.git)
    milestones = record["stats"]["milestones"]
    print(json.dumps({"out": args.out, "milestones": milestones, "git_repo": args.git}, indent=2))
    print(f"load it with: AutoModelForMaskedLM.from_pretrained({args.out!r}, trust_remote_code=True) "
          "(or AutoModelForCausalLM / AutoModel / AutoModelForSequenceClassification)")
    return 0
