"""CLI: ``gptbert pipeline`` (the Prefect pipeline on a config) and ``gptbert demo`` (the embedded default).

Both run in Prefect's ephemeral mode unless ``PREFECT_API_URL`` points at a server, track to a
local sqlite MLflow store under the run root unless ``MLFLOW_TRACKING_URI`` (or
``tracking.tracking_uri``) says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common.artifacts import STAGES

from .options import add_config_args, config_from_args


def register(subparsers) -> None:
    """Add the ``pipeline`` and ``demo`` subcommands."""

    p = subparsers.add_parser("pipeline", help="run the Prefect pipeline (clean -> ... -> evaluate) on a config")
    add_config_args(p)
    p.add_argument("--until", default="evaluate", choices=STAGES,
                   help="stop after this stage (upstream stages are reused when cached)")
    p.add_argument("--demo-data", action="store_true",
                   help="fill empty clean.inputs / eval.blimp_dir with the generated grammar data")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=_pipeline)

    d = subparsers.add_parser("demo", help="the whole pipeline on a generated grammar corpus, no servers needed")
    d.add_argument("--workdir", default="runs/demo", help="run root (artifacts, MLflow store, data)")
    d.add_argument("--corpus", help="your own text (file or folder: .txt/.gz one document per line, "
                                    ".jsonl, .parquet) instead of the generated grammar corpus")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a demo config field, e.g. --set train.steps=100 (repeatable)")
    d.add_argument("--json", action="store_true", help="print the run summary as JSON")
    d.set_defaults(func=_demo)


def _quiet_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Prefect's temporary server gives up after 20 s by default; a busy 2-core machine needs longer.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def _pipeline(args: argparse.Namespace) -> int:

    _quiet_env()
    cfg = config_from_args(args)
    if args.demo_data:
        from flows.demo import with_demo_data

        cfg = with_demo_data(cfg)
    from flows.pipeline import FLOWS

    start = time.time()
    summary = FLOWS["pipeline" if args.until == "evaluate" else args.until](config=cfg)
    print_summary(summary, time.time() - start, as_json=args.json)
    return 0


def _demo(args: argparse.Namespace) -> int:
    _quiet_env()
    start = time.time()
    from flows.demo import demo_config, with_demo_data

    cfg = with_demo_data(demo_config(str(Path(args.workdir).resolve()), args.overrides), corpus=args.corpus)
    from flows.pipeline import pipeline

    summary = pipeline(config=cfg)
    print_summary(summary, time.time() - start, as_json=args.json)
    return 0


def print_summary(summary: dict, wall_s: float, as_json: bool = False) -> None:
    """Print a pipeline run's summary (ids, stages run and cached, final losses, minimal-pair
    accuracies, registered model, where to look), or it as JSON."""
    if as_json:
        print(json.dumps({**summary, "wall_s": round(wall_s, 1)}, indent=2, default=str))
        return
    print()
    print("=" * 72)
    print(f"gptbert pipeline finished in {wall_s:.0f} s (flows {summary['duration_s']:.0f} s)")
    print(f"  Prefect flow run : {summary['flow_run_id']}")
    print(f"  MLflow run       : {summary['mlflow_run_id']}  (experiment {summary['experiment_id']})")
    print(f"  stages run       : {', '.join(summary['ran']) or '-'}")
    print(f"  stages cached    : {', '.join(summary['cached']) or '-'}")
    training = summary.get("training") or {}
    losses = {k: v for k, v in training.items() if "loss" in k}
    if losses:
        print("  final losses     : " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(losses.items())))
    evaluation = summary.get("evaluation") or {}
    modes = sorted({k.split(".")[1] for k in evaluation if k.startswith("blimp.")})
    if modes:
        print("  minimal pairs    : accuracy per scoring mode (chance 50.0%)")
        for m in modes:
            best = evaluation.get(f"blimp.{m}.best_accuracy")
            t1 = evaluation.get(f"blimp.{m}.t1_accuracy")
            temp = evaluation.get(f"blimp.{m}.best_temperature")
            line = f"    {m:<7} T=1: {_pct(t1)}   best T={temp:g}: {_pct(best)}" if temp else f"    {m}: {_pct(best)}"
            print(line)
    reg = summary.get("registered")
    if reg:
        print(f"  registered model : {reg['name']} version {reg['version']} alias {reg['alias']}")
    print(f"  artifacts        : {summary['workdir']}/artifacts")
    uri = summary.get("tracking_uri")
    if uri:
        print("  MLflow UI        : MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "
              f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000 --workers 1")
    print("=" * 72)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:5.1f}%"
