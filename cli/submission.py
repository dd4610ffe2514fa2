"""``gptbert submission``: a BabyLM leaderboard submission of a model or run folder."""

from __future__ import annotations

import argparse

from .evaluate import DEVICE_HELP
from .options import add_config_args


def register(subparsers) -> None:
    """Add the ``submission`` subcommand."""
    p = subparsers.add_parser(
        "submission", help="BabyLM leaderboard submission: official predictions layout + collated file")
    p.add_argument("model_or_run", help="a run folder (model/ and milestones/chck_*M) or a model folder")
    p.add_argument("--track", default="strict-small", choices=["strict-small", "strict"])
    p.add_argument("--layout", default="2026", choices=["2025", "2026"],
                   help="the challenge year whose collate_preds.py the file follows (default 2026)")
    p.add_argument("--data", required=True, help="the official evaluation_data/ folder (full_eval/, fast_eval/)")
    p.add_argument("--out", required=True, help="the submission folder (results/<name>/..., stage.json)")
    p.add_argument("--backend", default="causal", choices=["causal", "mntp"], help="scoring backend (default causal)")
    p.add_argument("--name", default=None, help="the model's name in results/ (default: the run folder's name)")
    p.add_argument("--aoa", default=None, metavar="DIR",
                   help="a folder with the official AoA outputs (surprisal.json, aoa_score.json) to include")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    add_config_args(p)
    p.set_defaults(func=submission_command)


def submission_command(args: argparse.Namespace) -> int:
    """Build the submission and print where it is, the per-task scores and what is None."""
    from gptbert.submission import build_submission

    from .evaluate import eval_config

    record = build_submission(args.model_or_run, args.out, args.data, layout=args.layout, track=args.track,
                              backend=args.backend, name=args.name, aoa_dir=args.aoa, cfg=eval_config(args),
                              log=print)
    for name, value in record["stats"].items():
        print(f"{name}\t{value:.4f}")
    for what, why in record.get("none", {}).items():
        print(f"None: {what} ({why})")
    name = args.name or record["config"]["name"]
    print(f"wrote {args.out}/results/{name}/all_full_preds_and_fast_scores_{args.backend}.json")
    return 0
