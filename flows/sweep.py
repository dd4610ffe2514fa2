"""The ratio sweep (Prefect flow ``gptbert-ratio-sweep``): the paper's central experiment.

One corpus, tokenizer and shard set (the cached stages of the pipeline), then one model per causal
fraction of ``sweep.fractions`` (and per seed of ``sweep.seeds``) with everything else equal: the
same data order (the trainer's ``first_batch_sha256`` says so), the same tokens seen, the same
seed. Each trial is pretrained and evaluated in every configured scoring mode; the figure plots
each task's score against the causal fraction, one line per scoring mode (mean over seeds, the
seeds' range as a band). MLflow: one parent run for the sweep, a child per trial (its stages
nested below it); the registry is not touched.

``sweep.parallel``: ``sequential`` runs trials one after another (each launched as
``launch.backend`` says, e.g. a Ray Train run on a cluster); ``ray`` runs each trial as a Ray task
(the plain loop on one worker) on ``launch.ray_address``'s cluster or a local Ray, with one GPU per
trial where trials train on CUDA (``train.device`` cuda, or auto on a cluster with GPUs; cuda on a
cluster without one is refused before the first trial: ``gptbert.distributed.parallel.gpus_per_task``).
``sweep.isolate_trials`` (the default) trains and evaluates each trial in a fresh process (a fresh
Ray worker), tracking stays in this one: the sweep's peak memory is that of one trial, whatever
their number.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

from prefect import flow, get_run_logger

from common import storage
from common.artifacts import atomic_write_text
from common.config import PipelineConfig, dump_yaml, flatten, from_dict, to_dict

from . import stages
from .pipeline import (link_prefect, prefect_ids, resolve_config, tracker_for, clean_task, evaluate_task, pretrain_task,
                       shard_task, tokenizer_task)
from .stages import Artifact
from .summary import dataset_inputs, source_tags
from .tracking import fraction_label

SWEEP_DIR = "sweeps"
FIGURE = "ratio_sweep.png"


def trial_config(config: PipelineConfig, fraction: float, seed: int) -> PipelineConfig:
    """``config`` with ``train.causal_fraction`` and ``train.seed`` of one trial (the plain loop when
    trials are Ray tasks themselves)."""
    data = to_dict(config)
    data["train"]["causal_fraction"] = float(fraction)
    data["train"]["seed"] = int(seed)
    if config.sweep.parallel == "ray":
        data["launch"]["backend"] = "local"
    return from_dict(PipelineConfig, data)


def run_trial_stages(config: PipelineConfig, shards: Artifact, tokenizer: Artifact) -> tuple[Artifact, Artifact]:
    """Pretrain and evaluate one trial (cached by identity); module-level so a Ray task can run it."""
    model = stages.pretrain(config, shards, tokenizer)
    return model, stages.evaluate(config, model)


def _trial_row(fraction: float, seed: int, model: Artifact, evaluation: Artifact) -> dict[str, Any]:
    stats = model.record.get("stats", {})
    final = stats.get("final") or {}
    return {"fraction": fraction, "seed": seed, "model": model.path, "evaluation": evaluation.path,
            "cached": model.cached and evaluation.cached, "first_batch_sha256": stats.get("first_batch_sha256"),
            "tokens": stats.get("tokens"), "words": stats.get("words"), "steps": stats.get("steps"),
            "final_loss": final.get("loss"),
            "metrics": {k: v for k, v in evaluation.record.get("stats", {}).items() if isinstance(v, (int, float))}}


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{metric: {fraction label: {"mean", "min", "max", "n"}}} over the seeds of each fraction."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for metric in sorted({k for r in rows for k in r["metrics"]}):
        for fraction in sorted({r["fraction"] for r in rows}):
            values = [r["metrics"][metric] for r in rows if r["fraction"] == fraction and metric in r["metrics"]]
            if values:
                out.setdefault(metric, {})[repr(fraction)] = {
                    "mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}
    return out


def figure_series(table: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, list[tuple[float, float, float, float]]]]:
    """{panel (task): {line (mode): [(fraction, mean, min, max), ...]}} of the scores to draw (the
    curve metrics the evaluation tasks declare, ``gptbert.evaluation.curve``)."""
    from gptbert.evaluation import curve

    panels: dict[str, dict[str, list]] = {}
    for metric, by_fraction in table.items():
        drawn = curve(metric)  # the tasks' declared curve metrics: per-mode T = 1 and fine-tuning scores
        if drawn is None:
            continue
        panel, line = drawn
        points = sorted((float(k), v["mean"], v["min"], v["max"]) for k, v in by_fraction.items())
        panels.setdefault(panel, {})[line] = points
    return panels


def report_lines(rows: list[dict[str, Any]], table: dict, config: PipelineConfig, wall_s: float) -> list[str]:
    """report.md: what was compared, one row per trial, and each score's mean (range) per fraction."""
    from gptbert.evaluation import curve

    from .tracking import model_size_name

    fractions = sorted({r["fraction"] for r in rows})
    lines = ["# Ratio sweep", "",
             f"{len(rows)} trials: causal fractions {', '.join(fraction_label(f) for f in fractions)} x seeds "
             f"{', '.join(str(s) for s in config.sweep.seeds)}; model {model_size_name(config)}, "
             f"{config.train.steps} steps each, everything else equal. Wall time {wall_s:.0f} s.", "",
             "| causal fraction | seed | steps | tokens | final loss | first batch | cached |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.3f}"
        lines.append(f"| {fraction_label(r['fraction'])} | {r['seed']} | {r['steps']} | {r['tokens']} | {loss} | "
                     f"`{(r['first_batch_sha256'] or '-')[:12]}` | {'yes' if r['cached'] else 'no'} |")
    lines += ["", "Scores by causal fraction: mean over seeds (min-max).", "",
              "| metric | " + " | ".join(fraction_label(f) for f in fractions) + " |",
              "|---|" + "---|" * len(fractions)]
    for metric, by_fraction in table.items():
        if curve(metric) is None:
            continue
        cells = []
        for f in fractions:
            v = by_fraction.get(repr(f))
            if v is None:
                cells.append("-")
            elif v["n"] > 1:
                cells.append(f"{v['mean']:.4f} ({v['min']:.4f}-{v['max']:.4f})")
            else:
                cells.append(f"{v['mean']:.4f}")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def run_sweep(config: PipelineConfig) -> dict[str, Any]:
    """The sweep flow's body: shared stages, the trials, the table and figure, MLflow runs."""
    from .plots import plot_ratio_sweep
    from .tracking import model_size_name

    from gptbert.evaluation import preflight

    preflight(config.eval)  # unknown tasks, eval.device's CUDA missing: one line before the first trial
    logger = get_run_logger()
    start = time.time()
    sweep = config.sweep
    trials = [(f, s) for f in sweep.fractions for s in sweep.seeds]
    tracker = tracker_for(config)
    parent = None
    if tracker is not None:
        name = (f"ratio sweep · {model_size_name(config)} · {len(sweep.fractions)} fractions x "
                f"{len(sweep.seeds)} seed{'s' if len(sweep.seeds) != 1 else ''} · {time.strftime('%m-%d %H:%M', time.localtime(start))}")
        parent = tracker.start_run(name, tags={"gptbert.kind": "ratio-sweep", **source_tags(), **prefect_ids()})
        tracker.log_params(parent, flatten(config))
        tracker.log_text(parent, dump_yaml(config), "config.yaml")
        link_prefect(parent, tracker.uri, tracker.experiment_id)
    try:
        corpus = clean_task(config, parent)
        tokenizer = tokenizer_task(config, corpus, parent)
        shards = shard_task(config, corpus, tokenizer, parent)
        if tracker is not None:
            tracker.log_datasets(parent, dataset_inputs(config, {"clean": corpus, "shard": shards}))
        configs = [trial_config(config, f, s) for f, s in trials]
        rows = []
        if sweep.parallel == "ray":
            from gptbert.distributed.parallel import ray_map

            logger.info("ratio sweep: %d trials as Ray tasks", len(trials))
            done = ray_map(run_trial_stages, [(c, shards, tokenizer) for c in configs],
                           num_cpus=sweep.cpus_per_trial, address=config.launch.ray_address or None,
                           worker_niceness=config.launch.worker_niceness, fresh_workers=sweep.isolate_trials,
                           device=config.train.device)  # one GPU per trial where trials train on CUDA
            for (f, s), c, (model, evaluation) in zip(trials, configs, done):
                if tracker is not None:
                    child = _start_trial_run(tracker, parent, c, f, s)
                    _end_trial_run(tracker, child, model, evaluation)
                rows.append(_trial_row(f, s, model, evaluation))
        else:
            for (f, s), c in zip(trials, configs):
                logger.info("ratio sweep: trial causal %s, seed %d", fraction_label(f), s)
                child = _start_trial_run(tracker, parent, c, f, s) if tracker is not None else None
                try:
                    model = pretrain_task(c, shards, tokenizer, child, fresh_process=sweep.isolate_trials)
                    evaluation = evaluate_task(c, model, child, fresh_process=sweep.isolate_trials)
                except BaseException:
                    if child is not None:
                        tracker.end_run(child, "FAILED")
                    raise
                if tracker is not None:
                    _end_trial_run(tracker, child, model, evaluation)
                rows.append(_trial_row(f, s, model, evaluation))
        wall = time.time() - start
        table = aggregate(rows)
        out = storage.local_home(config.workdir) / SWEEP_DIR / time.strftime("%Y%m%d-%H%M%S", time.localtime(start))
        out.mkdir(parents=True, exist_ok=True)
        results = {"fractions": list(sweep.fractions), "seeds": list(sweep.seeds), "trials": rows, "table": table,
                   "wall_s": round(wall, 1), "shards": shards.path, "tokenizer": tokenizer.path}
        atomic_write_text(out / "results.json", json.dumps(results, indent=2))
        atomic_write_text(out / "report.md", "\n".join(report_lines(rows, table, config, wall)))
        drawn = plot_ratio_sweep(figure_series(table), out / FIGURE)
        summary = {"mlflow_run_id": parent, "tracking_uri": tracker.uri if tracker else None,
                   "experiment_id": tracker.experiment_id if tracker else None, "folder": str(out),
                   "figure": str(out / FIGURE) if drawn else None, **results}
        if tracker is not None:
            for name in ("results.json", "report.md") + ((FIGURE,) if drawn else ()):
                tracker.log_artifact(parent, out / name, "sweep")
            tracker.log_metrics(parent, {"sweep.duration_s": wall, "sweep.trials": len(rows)})
            tracker.set_tags(parent, {"mlflow.note.content": "\n".join(report_lines(rows, table, config, wall))})
            tracker.end_run(parent)
        logger.info("ratio sweep done in %.0f s: %d trials; report %s", wall, len(rows), out / "report.md")
        return summary
    except BaseException:
        if tracker is not None and parent is not None:
            tracker.end_run(parent, "FAILED")
        raise


def _start_trial_run(tracker, parent: Optional[str], config: PipelineConfig, fraction: float, seed: int) -> str:
    run = tracker.start_run(f"causal {fraction_label(fraction)} · seed {seed}", parent,
                            tags={"gptbert.kind": "ratio-sweep-trial", **prefect_ids()})
    tracker.log_params(run, {"causal_fraction": fraction, "seed": seed, **flatten(config.train, "train.")})
    return run


def _end_trial_run(tracker, run: str, model: Artifact, evaluation: Artifact) -> None:
    stats = model.record.get("stats", {})
    final = {f"train.final.{k}": v for k, v in (stats.get("final") or {}).items() if isinstance(v, (int, float))}
    tracker.log_metrics(run, final)
    tracker.log_evaluation(run, evaluation.record)
    tracker.set_tags(run, {"gptbert.lineage.pretrain": model.digest, "gptbert.lineage.evaluate": evaluation.digest,
                           "gptbert.first_batch_sha256": str(stats.get("first_batch_sha256"))})
    tracker.end_run(run)


@flow(name="gptbert-ratio-sweep", log_prints=True, validate_parameters=True,
      description="Shared corpus/tokenizer/shards, then one model per causal fraction (and seed), evaluated and plotted")
def ratio_sweep(config: Optional[PipelineConfig] = None, config_file: Optional[str] = None,
                demo_data: bool = False) -> dict[str, Any]:
    """Prefect flow: the ratio sweep on ``config`` (or the YAML ``config_file``)."""
    return run_sweep(resolve_config(config, config_file, demo_data))


__all__ = ["aggregate", "figure_series", "ratio_sweep", "run_sweep", "run_trial_stages", "trial_config"]
