"""CLI: ``gptbert pipeline`` (the Prefect pipeline on a config) and ``gptbert demo`` (the embedded default).

Both run in Prefect's ephemeral mode unless ``PREFECT_API_URL`` points at a server, track to a
local sqlite MLflow store under the run root unless ``MLFLOW_TRACKING_URI`` (or
``tracking.tracking_uri``) says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from common import storage
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
    p.add_argument("--json", action="store_true", help="print the run summary as JSON (and nothing else on stdout)")
    p.add_argument("-v", "--verbose", action="store_true", help="show the libraries' logs live (always in the log file)")
    p.set_defaults(func=_pipeline)

    d = subparsers.add_parser("demo", help="the whole pipeline on a generated grammar corpus, no servers needed")
    d.add_argument("--workdir", default="runs/demo", help="run root (artifacts, MLflow store, data)")
    d.add_argument("--corpus", help="your own text (file or folder: .txt/.gz one document per line, "
                                    ".jsonl, .parquet) instead of the generated grammar corpus")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a demo config field, e.g. --set train.steps=100 (repeatable)")
    d.add_argument("--json", action="store_true", help="print the run summary as JSON (and nothing else on stdout)")
    d.add_argument("-v", "--verbose", action="store_true", help="show the libraries' logs live (always in the log file)")
    d.set_defaults(func=_demo)

    w = subparsers.add_parser("sweep", help="the ratio sweep: one model per causal fraction (sweep.fractions), "
                                            "everything else equal, evaluated and plotted")
    add_config_args(w)
    w.add_argument("--workdir", help="run root (default: the config's, or runs/sweep with the demo config)")
    w.add_argument("--corpus", help="your own text (file or folder) instead of the generated grammar corpus")
    w.add_argument("--json", action="store_true", help="print the sweep summary as JSON (and nothing else on stdout)")
    w.add_argument("-v", "--verbose", action="store_true", help="show the libraries' logs live (always in the log file)")
    w.set_defaults(func=_sweep)


def _quiet_env() -> None:
    # Prefect's own settings are flows/__init__.py's (they hold for library callers too).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _run_flow(flow_fn, cfg, command: str, args: argparse.Namespace) -> int:
    """Run a pipeline flow under the console: stages and progress on the terminal, library output in
    ``<workdir>/logs``, then the summary (or JSON) on stdout."""
    from gptbert.distributed import check_launch

    from .console import Console, log_path_for

    check_launch(cfg)  # a missing GPU or an unknown launcher: one line before any stage runs
    start = time.time()
    workdir = storage.normalize(cfg.workdir)
    console = Console(log_path_for(storage.local_home(workdir), command), verbose=args.verbose,
                      title=f"gptbert {command}: run root {workdir}")
    from flows.pipeline import temporary_server_scope

    with console, temporary_server_scope():
        summary = flow_fn(config=cfg)
    print_summary(summary, time.time() - start, as_json=args.json, stream=console.out,
                  log_path=console.log_path)
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    _quiet_env()
    cfg = config_from_args(args)
    if args.demo_data:
        from flows.demo import with_demo_data

        cfg = with_demo_data(cfg)
    from flows.pipeline import FLOWS

    return _run_flow(FLOWS["pipeline" if args.until == "evaluate" else args.until], cfg, "pipeline", args)


def _run_root(path: str) -> str:
    """An absolute run root; a URI is passed on unchanged (an unknown scheme is refused by the config)."""
    return path if "://" in path else str(Path(path).resolve())


def _demo(args: argparse.Namespace) -> int:
    _quiet_env()
    from flows.demo import demo_config, with_demo_data

    cfg = with_demo_data(demo_config(_run_root(args.workdir), args.overrides), corpus=args.corpus)
    from flows.pipeline import pipeline

    return _run_flow(pipeline, cfg, "demo", args)


def _sweep(args: argparse.Namespace) -> int:
    """``gptbert sweep``: the demo's config (or --preset/--config) with the sweep section, on the
    generated grammar corpus unless --corpus or clean.inputs names text."""
    _quiet_env()
    from flows.demo import demo_config, with_demo_data

    overrides = ([f"workdir={_run_root(args.workdir)}"] if args.workdir else []) + list(args.overrides)
    if args.preset or args.config:
        from common.config import load_config

        cfg = load_config(preset=args.preset, path=args.config, overrides=overrides)
    else:
        cfg = demo_config(None if args.workdir else str(Path("runs/sweep").resolve()), overrides)
    cfg = with_demo_data(cfg, corpus=args.corpus)
    from flows.pipeline import temporary_server_scope
    from flows.sweep import ratio_sweep

    from .console import Console, log_path_for

    start = time.time()
    workdir = storage.normalize(cfg.workdir)
    console = Console(log_path_for(storage.local_home(workdir), "sweep"), verbose=args.verbose,
                      title=f"gptbert sweep: {len(cfg.sweep.fractions)} causal fractions x {len(cfg.sweep.seeds)} "
                            f"seed{'s' if len(cfg.sweep.seeds) != 1 else ''}, run root {workdir}")
    with console, temporary_server_scope():
        summary = ratio_sweep(config=cfg)
    print_sweep_summary(summary, time.time() - start, as_json=args.json, stream=console.out)
    return 0


def print_sweep_summary(summary: dict, wall_s: float, as_json: bool = False, stream: TextIO | None = None) -> None:
    """A sweep's table (one line per trial with its headline scores) and where the report is."""
    stream = stream or sys.stdout
    if as_json:
        stream.write(json.dumps({**summary, "wall_s": round(wall_s, 1)}, indent=2, default=str) + "\n")
        stream.flush()
        return
    from flows.tracking import fraction_label

    found = {k for r in summary["trials"] for k in r["metrics"]}
    metrics = [f"blimp.{m}.t1_accuracy" for m in ("causal", "mntp", "fused") if f"blimp.{m}.t1_accuracy" in found]
    lines = ["", f"gptbert sweep finished in {_duration(wall_s)}: {len(summary['trials'])} trials",
             "  causal  seed  final loss  " + "  ".join(m.replace("blimp.", "").replace(".t1_accuracy", "") for m in metrics)]
    for r in summary["trials"]:
        loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.3f}"
        cells = "  ".join(f"{_pct(r['metrics'].get(m)):>{len(m.replace('blimp.', '').replace('.t1_accuracy', ''))}}"
                          for m in metrics)
        lines.append(f"  {fraction_label(r['fraction']):>6}  {r['seed']:>4}  {loss:>10}  {cells}")
    lines += [f"  report           : {summary['folder']}/report.md",
              f"  figure           : {summary['figure'] or '-'}"]
    if summary.get("mlflow_run_id"):
        lines.append(f"  MLflow run       : {summary['mlflow_run_id']} (experiment {summary['experiment_id']})")
    stream.write("\n".join(lines) + "\n")
    stream.flush()


def print_summary(summary: dict, wall_s: float, as_json: bool = False, stream: TextIO | None = None,
                  log_path: Path | None = None) -> None:
    """Print a pipeline run's summary (run name and ids, stages run and cached, final losses,
    minimal-pair accuracies, registered model, where to look) to ``stream``, or it as JSON."""
    stream = stream or sys.stdout

    def out(text: str = "") -> None:
        stream.write(text + "\n")

    if as_json:
        out(json.dumps({**summary, "wall_s": round(wall_s, 1), "log": str(log_path) if log_path else None},
                       indent=2, default=str))
        stream.flush()
        return
    out()
    out(f"gptbert pipeline finished in {_duration(wall_s)}: {summary.get('run_name') or summary['mlflow_run_id'] or ''}")
    out(f"  stages run       : {', '.join(summary['ran']) or '-'}")
    out(f"  stages cached    : {', '.join(summary['cached']) or '-'}")
    training = summary.get("training") or {}
    final = {k.split(".", 1)[1]: v for k, v in training.items() if k.startswith("final.") and "loss" in k}
    if final:
        shown = [k for k in ("loss", "loss_masked", "loss_causal", "valid_loss_masked_ema", "valid_loss_causal_ema")
                 if k in final]
        out("  final losses     : " + ", ".join(f"{k} {final[k]:.3f}" for k in shown))
    if training.get("words"):
        out(f"  trained on       : {training['words']:,.0f} words ({training.get('tokens', 0):,.0f} tokens, "
            f"{training.get('steps', 0):.0f} steps)")
    evaluation = summary.get("evaluation") or {}
    modes = [m for m in ("causal", "mntp", "fused") if f"blimp.{m}.best_accuracy" in evaluation]
    if modes:
        out("  minimal pairs    : accuracy per scoring mode (chance 50.0%)")
        for m in modes:
            best = evaluation.get(f"blimp.{m}.best_accuracy")
            t1 = evaluation.get(f"blimp.{m}.t1_accuracy")
            temp = evaluation.get(f"blimp.{m}.best_temperature")
            out(f"    {m:<7} T=1: {_pct(t1)}   best T={temp:g}: {_pct(best)}" if temp else f"    {m}: {_pct(best)}")
    reg = summary.get("registered")
    if reg:
        what = "registered" if reg.get("new", True) else "already registered"
        out(f"  model registry   : {reg['name']} version {reg['version']}, alias {reg['alias'] or '(none)'} ({what})")
    out(f"  artifacts        : {summary['workdir']}/artifacts")
    if log_path:
        out(f"  library logs     : {log_path}")
    uri = summary.get("tracking_uri")
    if summary.get("flow_run_id"):
        out(f"  Prefect flow run : {summary['flow_run_id']}")
    if uri:
        out(f"  MLflow run       : {summary['mlflow_run_id']} (experiment {summary['experiment_id']})")
        out("  MLflow UI        : MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "
            f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000 --workers 1")
        out(f"                     then open http://127.0.0.1:5000/#/experiments/{summary['experiment_id']}/runs")
    stream.flush()


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s} s" if m else f"{s} s"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:5.1f}%"
