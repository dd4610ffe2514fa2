"""Evaluation: the registry of tasks and the evaluate stage that runs the configured ones.

Each task is declared once, by its own module (``registry.Task``: name, config section and data
fields, how it finds its data, how it scores, the metrics it reports, its part of report.md);
``discover`` registers every module of this package that declares a ``TASK``. ``evaluate`` runs
every task of ``eval.tasks`` whose data is configured and notes the others as skipped;
``evaluate_model_dir`` is the stage (the CLI's ``gptbert evaluate`` and the Prefect task): it
writes ``results.json``, ``report.md`` and the stage record. It loads the model (and each word
milestone's) on ``eval.device`` (``resolve_eval_device``), resolved before any work; ``evaluate``
computes wherever the model it is given lives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from common import storage
from common.artifacts import (atomic_write_text, check_output_folder, check_outside_inputs, make_record,
                              staging_dir, tree_digest, write_record)
from common.config import EvalConfig, from_dict, to_dict

from .registry import TASKS, Metric, Task, curve, curve_metrics, discover, format_value, metric_unit, register_task

STAGE = "evaluate"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
Progress = Callable[[int, int], None]

discover()


def resolve_eval_device(cfg: EvalConfig):
    """The ``torch.device`` that ``eval.device`` names here; a DeviceError naming the field when it
    asks for CUDA this machine lacks."""
    from ..device import resolve_device

    return resolve_device(cfg.device, "eval.device")


def preflight(cfg: EvalConfig) -> None:
    """What can be checked of an evaluation before any work (a pipeline calls it before its first
    stage): every task of ``eval.tasks`` is known and ``eval.device`` exists here."""
    for name in cfg.tasks:
        _task(name)
    resolve_eval_device(cfg)


def _task(name: str) -> Task:
    task = TASKS.get(name)
    if task is None:
        raise ValueError(f"config field 'eval.tasks': unknown task {name!r} (known: {', '.join(sorted(TASKS))})")
    return task


def configured_tasks(cfg: EvalConfig) -> tuple[dict[str, Task], dict[str, str]]:
    """(tasks that will run, {task: why it is skipped}) for ``cfg``."""
    run, skipped = {}, {}
    for name in cfg.tasks:
        task = _task(name)
        data = task.data(task.config(cfg))
        if data is None:
            skipped[name] = "no data configured"
        elif not data.exists():
            raise FileNotFoundError(f"evaluation data of task {name!r} not found: {data}")
        else:
            run[name] = task
    return run, skipped


def data_digests(cfg: EvalConfig) -> dict[str, str]:
    """Content digest of each configured task's data (part of the evaluation's identity)."""
    tasks, _ = configured_tasks(cfg)
    return {name: tree_digest(task.data(task.config(cfg))) for name, task in tasks.items()}


def evaluate(model, tokenizer, cfg: EvalConfig, progress: Progress | None = None,
             model_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the configured tasks; ``{"config", "model_dir", "tasks": {name: results}, "skipped": {...}}``."""
    tasks, skipped = configured_tasks(cfg)
    if not tasks:
        needs = [_task(name).what_to_set() for name in cfg.tasks]
        hint = needs[0] if len(needs) < 2 else ", ".join(needs[:-1]) + ", or " + needs[-1]
        raise ValueError(f"nothing to evaluate: no task of eval.tasks has data (set {hint})")
    results: dict[str, Any] = {"config": to_dict(cfg), "tasks": {}, "skipped": skipped}
    if model_dir is not None:
        results["model_dir"] = str(model_dir)
    for name, task in tasks.items():
        with _scoring_precision(model, cfg, task):
            results["tasks"][name] = task.run(model, tokenizer, task.config(cfg), progress=progress)
    return results


def _scoring_precision(model, cfg: EvalConfig, task: Task):
    """bf16 autocast around a zero-shot task when ``eval.precision`` asks for it (fine-tuning and
    count baselines are left alone)."""
    import contextlib

    import torch

    if not task.zero_shot or not isinstance(model, torch.nn.Module):
        return contextlib.nullcontext()
    from ..optim import resolve_precision

    device = next(model.parameters()).device
    dtype = resolve_precision(cfg.precision, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def summary_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Flat name -> number view of every task's headline results (for MLflow metrics)."""
    out: dict[str, float] = {}
    for name, task_results in results.get("tasks", {}).items():
        out.update(_task(name).checked_summary(task_results))
    return out


def render_report(results: dict[str, Any]) -> str:
    """report.md: each task's section, then the skipped tasks."""
    lines = ["# Evaluation report", ""]
    if "model_dir" in results:
        lines += [f"Model: `{results['model_dir']}`", ""]
    for name, task_results in results.get("tasks", {}).items():
        lines += _task(name).report(task_results)
    if results.get("milestones"):
        lines += milestone_report(results["milestones"])
    if results.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {name}: {why}" for name, why in results["skipped"].items()] + [""]
    return "\n".join(lines)


def write_results(results: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``report.md`` and ``results.json``, each atomically; returns the json path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / REPORT_FILE, render_report(results))
    path = out / RESULTS_FILE
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    return path


def _locations() -> list[list[str]]:
    """Every registered task's data-location fields, as paths of keys into ``to_dict(EvalConfig)``."""
    return [field.split(".") for task in TASKS.values() for field in task.location_fields()]


def with_local_data(cfg: EvalConfig) -> EvalConfig:
    """``cfg`` with each task's data location on an object store (``Task.locations``: ``blimp_dir``,
    ``babylm_dir``, ``finetune.data_dir``) replaced by its copy in the local cache
    (``storage.local_input``)."""
    raw = to_dict(cfg)
    changed = False
    for *path, key in _locations():
        section = raw
        for part in path:
            section = section[part]
        if section.get(key) and storage.is_remote(section[key]):
            section[key] = str(storage.local_input(section[key]))
            changed = True
    return from_dict(EvalConfig, raw) if changed else cfg


def evaluation_inputs(model_dir: str | Path, cfg: EvalConfig) -> dict[str, str]:
    """The inputs part of the evaluate stage's identity: the model folder, each task's data and the
    word-milestone models that will be scored."""
    cfg = with_local_data(cfg)
    model_dir = storage.local_input(model_dir)
    milestones = milestone_models(model_dir) if cfg.milestones != "none" else []
    return {"model": tree_digest(model_dir), **{f"data.{k}": v for k, v in data_digests(cfg).items()},
            **{f"milestone.{name}": tree_digest(folder) for name, _, folder in milestones}}


# ----------------------------------------------------------------------------- word milestones

def milestone_models(model_dir: str | Path) -> list[tuple[str, int, Path]]:
    """``(chck_{N}M, words, folder)`` of the word-milestone models saved beside a pretraining run's
    ``model/`` folder, by words (none for a model folder outside a run)."""
    from ..pretraining import MILESTONES_DIR, milestones_reached

    model_dir = Path(model_dir)
    run = model_dir.parent
    if model_dir.name != "model":
        return []
    out = []
    for name in milestones_reached(run):
        folder = run / MILESTONES_DIR / name
        words = json.loads((folder / "training.json").read_text()).get("milestone_words")
        out.append((name, int(words), folder))
    return out


def milestone_config(cfg: EvalConfig) -> EvalConfig:
    """What a milestone model is scored with: the zero-shot tasks only, at T = 1, at most
    ``milestone_max_items`` per paradigm/UID, and each task's own changes (``Task.milestone``: the
    BabyLM suite's fast_eval when the folder has one)."""
    tasks = [t for t in cfg.tasks if _task(t).zero_shot]
    raw = {**to_dict(cfg), "tasks": tasks, "temperatures": [1.0], "milestones": "none",
           "max_pairs_per_paradigm": cfg.milestone_max_items}
    for name in tasks:
        task = _task(name)
        if task.milestone is not None:
            section = raw[task.section] if task.section else raw
            section.update(task.milestone(task.config(cfg)))
    return from_dict(EvalConfig, raw)


def evaluate_folder(model_dir: str, cfg: dict[str, Any]) -> dict[str, float]:
    """Summary metrics of one model folder under an EvalConfig given as a dict (runs in a Ray task),
    computed on its ``eval.device``."""
    from ..io import load_model_dir

    eval_cfg = from_dict(EvalConfig, cfg)
    model, tokenizer = load_model_dir(model_dir, device=resolve_eval_device(eval_cfg))
    return summary_metrics(evaluate(model, tokenizer, eval_cfg, model_dir=model_dir))


def evaluate_milestones(model_dir: str | Path, cfg: EvalConfig) -> list[dict[str, Any]]:
    """``[{"name", "words", "metrics"}]`` for each word-milestone model beside ``model_dir``, scored
    with ``milestone_config(cfg)``, one after another or as parallel Ray tasks (``eval.milestones``)."""
    models = milestone_models(model_dir) if cfg.milestones != "none" else []
    sub = milestone_config(cfg)
    if not models or not configured_tasks(sub)[0]:
        return []
    calls = [(str(folder), to_dict(sub)) for _, _, folder in models]
    if cfg.milestones == "ray":
        from ..distributed.parallel import ray_map

        metrics = ray_map(evaluate_folder, calls)
    else:
        metrics = [evaluate_folder(*call) for call in calls]
    return [{"name": name, "words": words, "metrics": m} for (name, words, _), m in zip(models, metrics)]


def milestone_report(milestones: list[dict[str, Any]]) -> list[str]:
    """report.md lines: one row per milestone, a column per T = 1 metric."""
    names = curve_metrics(k for m in milestones for k in m["metrics"])
    if not names:
        return []
    lines = ["## Word milestones (T = 1)", "", "| milestone | words | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for m in milestones:
        cells = [m["metrics"].get(n) for n in names]
        lines.append(f"| {m['name']} | {m['words']:,} | " +
                     " | ".join("-" if c is None else format_value(n, c) for n, c in zip(names, cells)) + " |")
    return lines + [""]


def evaluation_config(cfg: EvalConfig) -> dict[str, Any]:
    """The config part of the evaluate stage's identity: ``identity_dict`` (no ``eval.device``) less
    every task's data locations (they are in the inputs' digests)."""
    config = cfg.identity_dict()
    for *path, key in _locations():
        section = config
        for part in path:
            section = section[part]
        section.pop(key, None)
    return config


def evaluate_model_dir(model_dir: str | Path, cfg: EvalConfig, out_dir: str | Path, progress: Progress | None = None,
                       after: Callable[[dict[str, Any], Path], None] | None = None) -> dict[str, Any]:
    """The evaluate stage: load the model folder, run the tasks, write results, report and record
    into ``out_dir`` atomically; ``after(results, folder)`` may add files (plots) before the record.
    Returns the record."""
    from ..io import load_model_dir

    device = resolve_eval_device(cfg)  # before anything is read or written
    cfg = with_local_data(cfg)
    model_dir = storage.local_input(model_dir)
    tasks, _ = configured_tasks(cfg)
    check_outside_inputs(out_dir, [model_dir, *(task.data(task.config(cfg)) for task in tasks.values())])
    check_output_folder(out_dir, STAGE)  # before scoring, not after
    inputs = evaluation_inputs(model_dir, cfg)
    model, tokenizer = load_model_dir(model_dir, device=device)
    if tokenizer is None:
        raise FileNotFoundError(f"model folder {model_dir} lacks tokenizer.json (needed to encode text)")
    results = evaluate(model, tokenizer, cfg, progress=progress, model_dir=model_dir)
    del model  # the milestone models take its place on the device
    results["milestones"] = evaluate_milestones(model_dir, cfg)
    results["lineage"] = inputs
    with staging_dir(out_dir, STAGE) as tmp:
        write_results(results, tmp)
        if after is not None:
            after(results, tmp)
        record = make_record(STAGE, inputs, evaluation_config(cfg), tmp, RESULTS_FILE, summary_metrics(results))
        write_record(tmp, record)
    return record


__all__ = ["Metric", "RESULTS_FILE", "REPORT_FILE", "STAGE", "TASKS", "Task", "configured_tasks", "curve",
           "curve_metrics", "data_digests", "evaluate", "evaluate_folder", "evaluate_milestones", "evaluate_model_dir",
           "evaluation_config", "evaluation_inputs", "format_value", "metric_unit", "milestone_config",
           "milestone_models", "milestone_report", "preflight", "register_task", "render_report",
           "resolve_eval_device", "summary_metrics", "with_local_data", "write_results"]
