"""Evaluation: a registry of tasks and the evaluate stage that runs the configured ones.

A task is a small object (see ``Task``): where its data is in the ``EvalConfig``, ``run`` on a
model and tokenizer, the flat summary metrics that go to MLflow, and its section of ``report.md``.
``evaluate`` runs every task of ``eval.tasks`` whose data is configured and notes the others as
skipped; ``evaluate_model_dir`` is the stage (the CLI's ``gptbert evaluate`` and the Prefect task):
it writes ``results.json``, ``report.md`` and the stage record. Adding a task is one module with a
``TASK`` object, registered below.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Protocol

from common import storage
from common.artifacts import (atomic_write_text, check_output_folder, check_outside_inputs, make_record,
                              staging_dir, tree_digest, write_record)
from common.config import EvalConfig, from_dict, to_dict

from . import babylm, finetune, minimal_pairs

STAGE = "evaluate"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
Progress = Callable[[int, int], None]


class Task(Protocol):
    """One evaluation task."""

    name: str

    def data(self, cfg: EvalConfig) -> Path | None:
        """The task's data (a folder or file) under ``cfg``, or None when it is not configured."""
        ...

    def run(self, model, tokenizer, cfg: EvalConfig, progress: Progress | None = None) -> dict[str, Any]:
        """Results (JSON-serialisable)."""
        ...

    def summary(self, results: dict[str, Any]) -> dict[str, float]:
        """Headline metrics as flat names (``blimp.causal.t1_accuracy``)."""
        ...

    def report(self, results: dict[str, Any]) -> list[str]:
        """The task's section of report.md (markdown lines)."""
        ...


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> None:
    """Make ``task`` available to ``eval.tasks`` under ``task.name``."""
    TASKS[task.name] = task


register_task(minimal_pairs.TASK)
register_task(babylm.TASK)
register_task(finetune.TASK)


def configured_tasks(cfg: EvalConfig) -> tuple[dict[str, Task], dict[str, str]]:
    """(tasks that will run, {task: why it is skipped}) for ``cfg``."""
    run, skipped = {}, {}
    for name in cfg.tasks:
        task = TASKS.get(name)
        if task is None:
            raise ValueError(f"config field 'eval.tasks': unknown task {name!r} (known: {', '.join(sorted(TASKS))})")
        data = task.data(cfg)
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
    return {name: tree_digest(task.data(cfg)) for name, task in tasks.items()}


def evaluate(model, tokenizer, cfg: EvalConfig, progress: Progress | None = None,
             model_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the configured tasks; ``{"config", "model_dir", "tasks": {name: results}, "skipped": {...}}``."""
    tasks, skipped = configured_tasks(cfg)
    if not tasks:
        raise ValueError("nothing to evaluate: no task of eval.tasks has data "
                         "(set eval.blimp_dir, eval.babylm_dir, or eval.finetune.data_dir and eval.finetune.tasks)")
    results: dict[str, Any] = {"config": to_dict(cfg), "tasks": {}, "skipped": skipped}
    if model_dir is not None:
        results["model_dir"] = str(model_dir)
    for name, task in tasks.items():
        with _scoring_precision(model, cfg, name):
            results["tasks"][name] = task.run(model, tokenizer, cfg, progress=progress)
    return results


SCORING_TASKS = ("blimp", "babylm")  # zero-shot: forward passes only (eval.precision applies)


def _scoring_precision(model, cfg: EvalConfig, task: str):
    """bf16 autocast around a zero-shot task when ``eval.precision`` asks for it (fine-tuning and
    count baselines are left alone)."""
    import contextlib

    import torch

    if task not in SCORING_TASKS or not isinstance(model, torch.nn.Module):
        return contextlib.nullcontext()
    from ..optim import resolve_precision

    device = next(model.parameters()).device
    dtype = resolve_precision(cfg.precision, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def summary_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Flat name -> number view of every task's headline results (for MLflow metrics)."""
    out: dict[str, float] = {}
    for name, task_results in results.get("tasks", {}).items():
        out.update(TASKS[name].summary(task_results))
    return out


def render_report(results: dict[str, Any]) -> str:
    """report.md: each task's section, then the skipped tasks."""
    lines = ["# Evaluation report", ""]
    if "model_dir" in results:
        lines += [f"Model: `{results['model_dir']}`", ""]
    for name, task_results in results.get("tasks", {}).items():
        lines += TASKS[name].report(task_results)
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


def with_local_data(cfg: EvalConfig) -> EvalConfig:
    """``cfg`` with each data location on an object store (``blimp_dir``, ``babylm_dir``,
    ``finetune.data_dir``) replaced by its copy in the local cache (``storage.local_input``)."""
    raw = to_dict(cfg)
    changed = False
    for section, key in ((raw, "blimp_dir"), (raw, "babylm_dir"), (raw["finetune"], "data_dir")):
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
    """What a milestone model is scored with: the zero-shot tasks only, at T = 1, the BabyLM
    suite's fast_eval when the folder has one, at most ``milestone_max_items`` per paradigm/UID."""
    from common.config import from_dict

    split = "fast" if cfg.babylm_dir and (Path(cfg.babylm_dir) / "fast_eval").is_dir() else cfg.babylm_split
    return from_dict(EvalConfig, {**to_dict(cfg), "tasks": [t for t in cfg.tasks if t in ("blimp", "babylm")],
                                  "temperatures": [1.0], "babylm_split": split, "milestones": "none",
                                  "max_pairs_per_paradigm": cfg.milestone_max_items})


def evaluate_folder(model_dir: str, cfg: dict[str, Any]) -> dict[str, float]:
    """Summary metrics of one model folder under an EvalConfig given as a dict (runs in a Ray task)."""
    from common.config import from_dict

    from ..io import load_model_dir

    model, tokenizer = load_model_dir(model_dir)
    return summary_metrics(evaluate(model, tokenizer, from_dict(EvalConfig, cfg), model_dir=model_dir))


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
    names = sorted({k for m in milestones for k in m["metrics"] if k.endswith((".t1", ".t1_accuracy"))})
    if not names:
        return []
    lines = ["## Word milestones (T = 1)", "", "| milestone | words | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for m in milestones:
        cells = [m["metrics"].get(n) for n in names]
        lines.append(f"| {m['name']} | {m['words']:,} | " +
                     " | ".join("-" if c is None else f"{100 * c:.1f}" if n.endswith("_accuracy") else f"{c:.2f}"
                                for n, c in zip(names, cells)) + " |")
    return lines + [""]


def evaluation_config(cfg: EvalConfig) -> dict[str, Any]:
    """The config part of the evaluate stage's identity (data locations are in the inputs' digests)."""
    config = cfg.identity_dict()
    config.pop("blimp_dir", None)
    config.pop("babylm_dir", None)
    config["finetune"] = {k: v for k, v in config["finetune"].items() if k != "data_dir"}
    return config


def evaluate_model_dir(model_dir: str | Path, cfg: EvalConfig, out_dir: str | Path, progress: Progress | None = None,
                       after: Callable[[dict[str, Any], Path], None] | None = None) -> dict[str, Any]:
    """The evaluate stage: load the model folder, run the tasks, write results, report and record
    into ``out_dir`` atomically; ``after(results, folder)`` may add files (plots) before the record.
    Returns the record."""
    from ..io import load_model_dir

    cfg = with_local_data(cfg)
    model_dir = storage.local_input(model_dir)
    tasks, _ = configured_tasks(cfg)
    check_outside_inputs(out_dir, [model_dir, *(task.data(cfg) for task in tasks.values())])
    check_output_folder(out_dir, STAGE)  # before scoring, not after
    inputs = evaluation_inputs(model_dir, cfg)
    model, tokenizer = load_model_dir(model_dir)
    if tokenizer is None:
        raise FileNotFoundError(f"model folder {model_dir} lacks tokenizer.json (needed to encode text)")
    results = evaluate(model, tokenizer, cfg, progress=progress, model_dir=model_dir)
    results["milestones"] = evaluate_milestones(model_dir, cfg)
    results["lineage"] = inputs
    with staging_dir(out_dir, STAGE) as tmp:
        write_results(results, tmp)
        if after is not None:
            after(results, tmp)
        record = make_record(STAGE, inputs, evaluation_config(cfg), tmp, RESULTS_FILE, summary_metrics(results))
        write_record(tmp, record)
    return record


__all__ = ["RESULTS_FILE", "REPORT_FILE", "STAGE", "TASKS", "Task", "configured_tasks", "data_digests", "evaluate",
           "evaluate_folder", "evaluate_milestones", "evaluate_model_dir", "evaluation_config", "evaluation_inputs",
           "milestone_config", "milestone_models", "milestone_report", "register_task",
           "render_report", "summary_metrics", "with_local_data", "write_results"]
