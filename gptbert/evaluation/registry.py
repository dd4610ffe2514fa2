"""The evaluation task registry: each task is declared once, by the module that implements it.

A module of this package that ends with ``TASK = Task(...)`` is an evaluation task; ``discover``
imports every module of the package and registers its ``TASK``. The declaration says:

- ``name``: its entry in ``eval.tasks`` and its key in ``results.json`` (``tasks``, ``skipped``);
- ``section`` and ``locations``: the config it reads (a section of ``EvalConfig``, "" for the
  shared fields such as ``modes`` and ``temperatures``) and the fields of that section holding its
  data. The typed config stays in ``common/config/eval.py`` (common imports nothing of gptbert,
  and a dataclass there is validated when the config is loaded, before any stage runs); the
  registry checks both names against those dataclasses when it registers the task. From the
  locations follow the local copies of remote data, the input digests of the evaluate stage and
  the fields left out of its config identity;
- ``data``: where its data is in the official layout (None when not configured);
- ``run``: how it scores (results, JSON-serialisable);
- ``metrics``: the metric names it reports (``Metric`` patterns with their unit). ``summary``
  turns results into those names and may emit no other: they are the stage record's stats and
  the MLflow metrics, and ``curve`` metrics are the ones drawn per word milestone and per causal
  fraction of the ratio sweep;
- ``report``: its section of ``report.md``;
- ``zero_shot``: forward passes only, so ``eval.precision`` applies and the word-milestone models
  are scored with it (``milestone`` changes its section for that: ``milestone_config``).

Dispatch (``gptbert.evaluation.evaluate``), results, report, stage identity and MLflow metrics
all read these declarations; nothing else names a task.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Literal, Optional

Unit = Literal["fraction", "percent", "rho", "temperature", "number"]
_PLACEHOLDER = re.compile(r"\{(\w+)(?::([^}]*))?\}")


@dataclass(frozen=True)
class Metric:
    """A family of metric names: ``pattern`` with ``{part}`` placeholders (one dotted part each, or
    ``{part:a|b}`` for one of the alternatives), the ``unit`` of its values (``fraction`` in [0, 1],
    ``percent``, ``rho`` a correlation, ``temperature``, ``number``), and ``curve`` for a headline
    score drawn against the words seen (milestones) and the causal fraction (ratio sweep)."""

    pattern: str
    unit: Unit
    curve: bool = False

    @cached_property
    def _regex(self) -> re.Pattern:
        out, end = [], 0
        for m in _PLACEHOLDER.finditer(self.pattern):
            out.append(re.escape(self.pattern[end:m.start()]))
            alternatives = m.group(2)
            body = "|".join(re.escape(a) for a in alternatives.split("|")) if alternatives else r"[^.]+"
            out.append(f"(?P<{m.group(1)}>{body})")
            end = m.end()
        out.append(re.escape(self.pattern[end:]))
        return re.compile("".join(out))

    def match(self, name: str) -> Optional[dict[str, str]]:
        """The placeholders' values when ``name`` is of this family, else None."""
        m = self._regex.fullmatch(name)
        return m.groupdict() if m else None

    def panel_and_line(self, name: str) -> Optional[tuple[str, str]]:
        """(panel, line) of a figure drawing ``name``: the name up to its last placeholder, and that
        placeholder's value (``blimp.causal.t1_accuracy`` -> ("blimp", "causal"))."""
        parts = self.match(name)
        placeholders = list(_PLACEHOLDER.finditer(self.pattern))
        if parts is None or not placeholders:
            return None
        last = placeholders[-1]
        panel = _PLACEHOLDER.sub(lambda m: parts[m.group(1)], self.pattern[:last.start()]).rstrip(".")
        return panel, parts[last.group(1)]


@dataclass(frozen=True)
class Task:
    """One evaluation task's declaration (see the module docstring)."""

    name: str
    section: str
    locations: tuple[str, ...]
    data: Callable[[Any], Optional[Path]]
    run: Callable[..., dict[str, Any]]
    summary: Callable[[dict[str, Any]], dict[str, float]]
    report: Callable[[dict[str, Any]], list[str]]
    metrics: tuple[Metric, ...]
    zero_shot: bool = False
    milestone: Optional[Callable[[Any], dict[str, Any]]] = None
    # What to set to give it data, for the "nothing to evaluate" error (default: its locations).
    requires: str = ""

    def config(self, cfg) -> Any:
        """The section of ``cfg`` (an EvalConfig) this task reads."""
        return getattr(cfg, self.section) if self.section else cfg

    def location_fields(self) -> list[str]:
        """The data-location fields as dotted names within ``eval`` (``finetune.data_dir``)."""
        return [f"{self.section}.{loc}" if self.section else loc for loc in self.locations]

    def what_to_set(self) -> str:
        """The config fields that give the task its data (for messages)."""
        return self.requires or " or ".join(f"eval.{f}" for f in self.location_fields())

    def metric(self, name: str) -> Optional[Metric]:
        """The first declared family ``name`` belongs to, or None."""
        return next((m for m in self.metrics if m.match(name) is not None), None)

    def checked_summary(self, results: dict[str, Any]) -> dict[str, float]:
        """``summary(results)``, refusing a name that no declared metric covers (the declaration is
        what the stage record, MLflow and the figures rely on)."""
        out = self.summary(results)
        undeclared = sorted(k for k in out if self.metric(k) is None)
        if undeclared:
            raise ValueError(f"evaluation task {self.name!r} reported metrics its declaration does not name: "
                             f"{', '.join(undeclared[:5])}")
        return out


TASKS: dict[str, Task] = {}


def _field_type(cls, dotted: str) -> Any:
    """The annotation of the dotted field of dataclass ``cls``, or None when there is no such field."""
    from typing import get_type_hints

    tp: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp) or part not in {f.name for f in dataclasses.fields(tp)}:
            return None
        tp = get_type_hints(tp)[part]
    return tp


def register_task(task: Task) -> None:
    """Make ``task`` available to ``eval.tasks`` under ``task.name``, after checking that its
    declaration names a config section and location fields that EvalConfig has."""
    from common.config import EvalConfig

    if not task.name or "." in task.name or task.name in TASKS:
        raise ValueError(f"evaluation task name {task.name!r} is empty, dotted or already registered")
    if task.section and not dataclasses.is_dataclass(_field_type(EvalConfig, task.section)):
        raise ValueError(f"evaluation task {task.name!r}: EvalConfig has no section {task.section!r}")
    for loc in task.location_fields():
        if _field_type(EvalConfig, loc) is not str:
            raise ValueError(f"evaluation task {task.name!r}: eval.{loc} is not a string field of EvalConfig")
    if not task.metrics:
        raise ValueError(f"evaluation task {task.name!r} declares no metrics")
    TASKS[task.name] = task


def discover() -> dict[str, Task]:
    """Import every module of this package and register each ``TASK`` it declares (by module name,
    so the order is the same everywhere); returns the registry."""
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "registry":
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        task = getattr(module, "TASK", None)
        if isinstance(task, Task) and TASKS.get(task.name) is not task:
            register_task(task)
    return TASKS


def declared_metric(name: str) -> Optional[Metric]:
    """The declared family of metric ``name`` (over every registered task), or None."""
    for task in TASKS.values():
        metric = task.metric(name)
        if metric is not None:
            return metric
    return None


def curve(name: str) -> Optional[tuple[str, str]]:
    """(panel, line) when ``name`` is a declared curve metric (see ``Metric``), else None."""
    metric = declared_metric(name)
    return metric.panel_and_line(name) if metric is not None and metric.curve else None


def curve_metrics(names) -> list[str]:
    """The curve metrics among ``names``, sorted."""
    return sorted(n for n in set(names) if curve(n) is not None)


def metric_unit(name: str) -> Optional[Unit]:
    """The unit of metric ``name`` as its task declares it, or None for an undeclared name."""
    metric = declared_metric(name)
    return metric.unit if metric is not None else None


def format_value(name: str, value: float) -> str:
    """A metric value as the reports print it: a fraction in % with one decimal, else two decimals."""
    return f"{100 * value:.1f}" if metric_unit(name) == "fraction" else f"{value:.2f}"


__all__ = ["Metric", "TASKS", "Task", "Unit", "curve", "curve_metrics", "declared_metric", "discover",
           "format_value", "metric_unit", "register_task"]
