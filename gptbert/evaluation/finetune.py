"""The ``glue`` evaluation task: GLUE-style fine-tuning of a pretrained GPT-BERT (recipe §6).

A first-token (`<s>`) classifier head on the encoder with bidirectional attention; pairs are encoded
`<s> A </s> B` (the BabyLM recommendation), evaluation after every epoch, and the best epoch's
weights kept (ties keep the earlier epoch). Metrics: accuracy, F1 of label 1 (MRPC, QQP), Matthews
correlation (CoLA); the task's metric picks the best epoch. Two recipes (``eval.finetune.recipe``):

- ``paper``: the paper's settings, one lr/batch/epochs for every task (the config's fields); AdamW
  (betas 0.9/0.999, eps 1e-8, weight decay on matrices only), linear warmup over 6% of the steps
  then cosine decay to 0.
- ``babylm``: the official BabyLM 2025 pipeline's per-task hyperparameters (``BABYLM_TASKS``: lr
  3e-5, batch 32 (16 for BoolQ and MultiRC), 10 epochs (WSC 30), length 512, seed 42) and its
  trainer's rules: weight decay 0.01 on every parameter, the last partial batch dropped, warmup over
  int(6% of the steps) starting from 0, cosine decay to 10% of the peak.

Data: `<data_dir>/<task>.train.jsonl` and `<task>.valid.jsonl`, one JSON object a line with an
integer `label` >= 0 and the task's text fields: the official layout for the tasks the pipeline
knows (``LAYOUTS``: BoolQ `question`/`passage`, MultiRC `question`+`answer`/`paragraph`, WSC
`span2_text`+`span1_text`/`text`, QQP `question1`/`question2`, MNLI `premise`/`hypothesis`, ...),
else `sentence1` and an optional `sentence2`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from common.jsonl import iter_objects
from gptbert.scoring import padded_batch, special_ids

from .registry import Metric, Task

TASK_METRIC = {"cola": "mcc", "mrpc": "f1", "qqp": "f1"}


@dataclass(frozen=True)
class Layout:
    """Which JSON fields make a task's first and (optional) second text; several fields are joined
    with spaces, or filled into ``template`` (the official pipeline's ``Dataset`` rules)."""

    a_keys: tuple[str, ...]
    b_keys: tuple[str, ...] | None = None
    a_template: str | None = None

    def texts(self, item: dict, where: str) -> tuple[str, str | None]:
        """(text_a, text_b) of one record; a missing or non-string field is a TaskFormatError."""
        def part(keys: tuple[str, ...], template: str | None) -> str:
            values = []
            for key in keys:
                value = item.get(key)
                if not isinstance(value, str):
                    raise TaskFormatError(f"{where}: field {key!r} must be a string, got {value!r}")
                values.append(value)
            return template.format(*values) if template else " ".join(values)

        return part(self.a_keys, self.a_template), (part(self.b_keys, None) if self.b_keys else None)


GENERIC_LAYOUT = Layout(("sentence1",))  # plus an optional sentence2 (load_task_file)
LAYOUTS = {  # the official pipeline's evaluation_pipeline/finetune/dataset.py
    "boolq": Layout(("question",), ("passage",)),
    "cola": Layout(("sentence",)),
    "mnli": Layout(("premise",), ("hypothesis",)),
    "mrpc": Layout(("sentence1",), ("sentence2",)),
    "multirc": Layout(("question", "answer"), ("paragraph",), "Question: {} Answer: {}"),
    "qnli": Layout(("question",), ("sentence",)),
    "qqp": Layout(("question1",), ("question2",)),
    "rte": Layout(("sentence1",), ("sentence2",)),
    "sst2": Layout(("sentence",)),
    "wsc": Layout(("span2_text", "span1_text"), ("text",), 'Does "{}" refer to "{}" in this passage?'),
}


@dataclass(frozen=True)
class TaskSettings:
    """One task's hyperparameters under a recipe (what ``finetune`` trains with)."""

    lr: float
    batch_size: int
    epochs: int
    max_length: int
    warmup_ratio: float
    weight_decay: float
    seed: int
    metric: str
    num_labels: int | None = None  # None: from the labels seen
    min_lr_factor: float = 0.0  # the cosine decays to this fraction of lr
    decay_all: bool = False  # weight decay on every parameter (else matrices only)
    drop_last: bool = False  # drop the last partial training batch
    warmup_from_zero: bool = False  # the official scheduler: factor step/warmup, so step 0 has lr 0


# The official eval_finetuning.sh (lr, batch, epochs, metric_for_valid, num_labels); length 512,
# seed 42, and the trainer defaults (warmup 6%, weight decay 0.01, min factor 0.1) for all.
BABYLM_TASKS = {
    "boolq": dict(batch_size=16, epochs=10, metric="accuracy", num_labels=2),
    "multirc": dict(batch_size=16, epochs=10, metric="accuracy", num_labels=2),
    "rte": dict(batch_size=32, epochs=10, metric="accuracy", num_labels=2),
    "wsc": dict(batch_size=32, epochs=30, metric="accuracy", num_labels=2),
    "mrpc": dict(batch_size=32, epochs=10, metric="f1", num_labels=2),
    "qqp": dict(batch_size=32, epochs=10, metric="f1", num_labels=2),
    "mnli": dict(batch_size=32, epochs=10, metric="accuracy", num_labels=3),
}
BABYLM_COMMON = dict(lr=3e-5, max_length=512, warmup_ratio=0.06, weight_decay=0.01, seed=42,
                     min_lr_factor=0.1, decay_all=True, drop_last=True, warmup_from_zero=True)


def task_settings(task: str, cfg) -> TaskSettings:
    """The hyperparameters ``task`` trains with under ``cfg.recipe`` (a FinetuneConfig): the
    config's own fields for ``paper``, the official table for ``babylm``."""
    if cfg.recipe == "babylm":
        return TaskSettings(**BABYLM_COMMON, **BABYLM_TASKS[task])
    return _paper_settings(cfg, task_metric(task))


def _paper_settings(cfg, metric: str, num_labels: int | None = None) -> TaskSettings:
    return TaskSettings(lr=cfg.lr, batch_size=cfg.batch_size, epochs=cfg.epochs, max_length=cfg.max_length,
                        warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay, seed=cfg.seed,
                        metric=metric, num_labels=num_labels)


class TaskFormatError(ValueError):
    """A fine-tuning file that cannot be read; names file:line and what was expected."""


@dataclass(frozen=True)
class Example:
    """One fine-tuning example: a sentence, an optional second sentence and an integer label."""

    text_a: str
    text_b: str | None
    label: int


def load_task_file(path: str | Path, max_examples: int | None = None, task: str | None = None) -> list[Example]:
    """Read a task's jsonl file (at most ``max_examples`` examples) in ``task``'s layout (``LAYOUTS``;
    by default the file name's prefix, e.g. ``boolq`` for ``boolq.train.jsonl``); a bad record or an
    empty file is a TaskFormatError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fine-tuning data file not found: {path}")
    layout = LAYOUTS.get((task or path.name.split(".")[0]).lower())
    examples: list[Example] = []
    for where, _, item in iter_objects(path, TaskFormatError):
        if layout is not None:
            a, b = layout.texts(item, where)
        else:
            a, b = GENERIC_LAYOUT.texts(item, where)[0], item.get("sentence2")
            if b is not None and not isinstance(b, str):
                raise TaskFormatError(f"{where}: field 'sentence2' must be a string or absent, got {b!r}")
        label = item.get("label")
        if isinstance(label, bool) and layout is not None:
            label = int(label)  # SuperGLUE's boolean labels, read as the pipeline's torch.long does
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise TaskFormatError(f"{where}: field 'label' must be an integer >= 0, got {label!r}")
        examples.append(Example(a, b, label))
        if max_examples is not None and len(examples) >= max_examples:
            break
    if not examples:
        raise TaskFormatError(f"{path}: no examples")
    return examples


def encode_example(tokenizer, ex: Example, max_length: int) -> list[int]:
    """`<s> A` or `<s> A </s> B`, the longer side cut first so the whole fits in max_length."""
    ids = special_ids(tokenizer)
    a = tokenizer.encode(ex.text_a, add_special_tokens=False).ids
    if ex.text_b is None:
        return [ids["bos"]] + a[: max_length - 1]
    b = tokenizer.encode(ex.text_b, add_special_tokens=False).ids
    while len(a) + len(b) + 2 > max_length:
        if len(a) >= len(b):
            a = a[:-1]
        else:
            b = b[:-1]
    return [ids["bos"]] + a + [ids["eos"]] + b


# ---------------------------------------------------------------------------------------------
# Metrics


def classification_metrics(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """accuracy; for binary labels also F1 of label 1 and Matthews correlation (0 when undefined)."""
    p = torch.as_tensor(list(predictions), dtype=torch.long)
    y = torch.as_tensor(list(labels), dtype=torch.long)
    out = {"accuracy": float((p == y).double().mean()) if len(y) else 0.0}
    if int(max(y.max(), p.max(), 1)) <= 1:
        tp = float(((p == 1) & (y == 1)).sum())
        tn = float(((p == 0) & (y == 0)).sum())
        fp = float(((p == 1) & (y == 0)).sum())
        fn = float(((p == 0) & (y == 1)).sum())
        out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0
        denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        out["mcc"] = (tp * tn - fp * fn) / denom if denom > 0 else 0.0
    return out


def task_metric(task: str) -> str:
    """The metric that picks the best epoch: MCC for CoLA, F1 for MRPC and QQP, accuracy elsewhere."""
    return TASK_METRIC.get(task.lower(), "accuracy")


# ---------------------------------------------------------------------------------------------
# Training


def lr_factor(step: int, total_steps: int, warmup_ratio: float, min_factor: float = 0.0,
              from_zero: bool = False) -> float:
    """Linear warmup over warmup_ratio of the steps, then cosine decay to ``min_factor`` (step is
    0-based). The paper's schedule: warmup round(ratio * total) >= 1 steps reaching 1 at the last
    of them. ``from_zero``: the official pipeline's (warmup int(ratio * total), factor step/warmup,
    so the first step has lr 0)."""
    if from_zero:
        warmup = int(warmup_ratio * total_steps)
        if step < warmup:
            return step / max(1, warmup)
    else:
        warmup = max(1, round(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0
        if step < warmup:
            return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.inference_mode()
def predict(model, encoded: list[list[int]], pad_id: int, batch_size: int = 64) -> list[int]:
    """Arg-max labels of the classifier head for encoded examples (eval mode, batched)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds: list[torch.Tensor] = []  # on the device: read once at the end, not per batch
    try:
        for i in range(0, len(encoded), batch_size):
            ids, blocked = padded_batch(encoded[i: i + batch_size], pad_id, False, device)
            preds.append(model.classifier_logits(model(ids, blocked)).argmax(-1))
    finally:
        model.train(was_training)
    return torch.cat(preds).tolist() if preds else []


def finetune(model, tokenizer, train: list[Example], valid: list[Example], cfg, metric: str = "accuracy",
             num_labels: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Fine-tune a copy of `model` on `train`; returns (model with the best epoch's weights, results).

    cfg: a TaskSettings, or a FinetuneConfig read as the paper recipe with ``metric``. The input
    model is not modified.
    """
    s = cfg if isinstance(cfg, TaskSettings) else _paper_settings(cfg, metric, num_labels)
    metric = s.metric
    torch.manual_seed(s.seed)
    model = copy.deepcopy(model)
    device = next(model.parameters()).device
    labels_seen = {ex.label for ex in train} | {ex.label for ex in valid}
    num_labels = s.num_labels or max(2, max(labels_seen) + 1)
    if max(labels_seen) >= num_labels:
        raise TaskFormatError(f"label {max(labels_seen)} found, but the task has {num_labels} labels")
    model.add_classifier(num_labels)
    model.to(device)
    pad_id = special_ids(tokenizer)["pad"]
    train_ids = [encode_example(tokenizer, ex, s.max_length) for ex in train]
    valid_ids = [encode_example(tokenizer, ex, s.max_length) for ex in valid]
    train_y = torch.tensor([ex.label for ex in train], device=device)  # indexed on the device per step
    valid_y = [ex.label for ex in valid]

    if s.decay_all:
        groups = [{"params": list(model.parameters()), "weight_decay": s.weight_decay}]
    else:
        groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": s.weight_decay},
                  {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]  # biases, norms
    optimizer = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.999), eps=1e-8)
    steps_per_epoch = len(train) // s.batch_size if s.drop_last else math.ceil(len(train) / s.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train)} training examples make no full batch of {s.batch_size}")
    total = steps_per_epoch * s.epochs
    generator = torch.Generator().manual_seed(s.seed)

    history: list[dict[str, Any]] = []
    best_state, best = None, None
    step = 0
    for epoch in range(1, s.epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        order_on_device = order.to(device)  # labels are picked there: no copy per step
        # The epoch's loss is summed on the device (float64, as Python floats summed it): no host
        # synchronisation per step; it is read once, at the end of the epoch.
        loss_sum, seen = torch.zeros((), dtype=torch.float64, device=device), 0
        for i in range(0, steps_per_epoch * s.batch_size, s.batch_size):
            idx = order[i: i + s.batch_size].tolist()
            ids, blocked = padded_batch([train_ids[j] for j in idx], pad_id, False, device)  # bidirectional
            logits = model.classifier_logits(model(ids, blocked))
            loss = F.cross_entropy(logits.float(), train_y[order_on_device[i: i + s.batch_size]])
            for group in optimizer.param_groups:
                group["lr"] = s.lr * lr_factor(step, total, s.warmup_ratio, s.min_lr_factor, s.warmup_from_zero)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double() * len(idx)
            seen += len(idx)
            step += 1
        metrics = classification_metrics(predict(model, valid_ids, pad_id), valid_y)
        entry = {"epoch": epoch, "train_loss": float(loss_sum) / seen, **metrics}
        history.append(entry)
        if best is None or entry[metric] > best[metric]:  # ties keep the earlier epoch
            best = entry
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    hyper = {"lr": s.lr, "batch_size": s.batch_size, "epochs": s.epochs, "max_length": s.max_length,
             "seed": s.seed}
    return model, {"metric": metric, "num_labels": num_labels, "train_examples": len(train),
                   "valid_examples": len(valid), "steps": total, "hyperparameters": hyper,
                   "epochs": history, "best": best}


def missing_tasks(cfg) -> dict[str, str]:
    """{task: why} for the configured tasks whose train or valid file is absent from data_dir."""
    data = Path(cfg.data_dir)
    out = {}
    for task in cfg.tasks:
        absent = [f"{task}.{split}.jsonl" for split in ("train", "valid") if not (data / f"{task}.{split}.jsonl").is_file()]
        if absent:
            out[task] = f"{' and '.join(absent)} not in {data}"
    return out


def finetune_tasks(model, tokenizer, cfg) -> dict[str, Any]:
    """Every task of cfg.tasks from `<data_dir>/<task>.{train,valid}.jsonl`; {task: results}.

    With ``cfg.skip_missing`` a task whose files are absent is listed under ``"missing"`` instead
    of failing (the BabyLM suite runs what the folder has)."""
    data = Path(cfg.data_dir)
    results: dict[str, Any] = {}
    missing = missing_tasks(cfg) if cfg.skip_missing else {}
    for task in cfg.tasks:
        if task in missing:
            continue
        settings = task_settings(task, cfg)
        train = load_task_file(data / f"{task}.train.jsonl", cfg.max_train_examples, task=task)
        valid = load_task_file(data / f"{task}.valid.jsonl", task=task)
        _, results[task] = finetune(model, tokenizer, train, valid, settings)
    if missing:
        results["missing"] = missing
    return results


def _trained(results: dict[str, Any]):
    return [(task, r) for task, r in results.items() if task != "missing"]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def summary(results: dict[str, Any]) -> dict[str, float]:
    """The numeric values of each task's best epoch as ``finetune.{task}.{name}``."""
    out: dict[str, float] = {}
    for task, r in _trained(results):
        for name, value in r.get("best", {}).items():
            if isinstance(value, (int, float)):
                out[f"finetune.{task}.{name}"] = float(value)
    return out


def report(results: dict[str, Any]) -> list[str]:
    """report.md lines: a table with each task's metric and best epoch (values in %)."""
    lines = ["## Fine-tuning", "", "| task | metric | best epoch | value | accuracy | lr | batch | epochs |",
             "|---|---|---|---|---|---|---|---|"]
    for task, r in _trained(results):
        best, hp = r["best"], r.get("hyperparameters", {})
        lines.append(f"| {task} | {r['metric']} | {best['epoch']} | {_pct(best[r['metric']])} | "
                     f"{_pct(best['accuracy'])} | {hp.get('lr', '-')} | {hp.get('batch_size', '-')} | "
                     f"{hp.get('epochs', '-')} |")
    lines.append("")
    for task, why in results.get("missing", {}).items():
        lines.append(f"- {task}: skipped, {why}")
    if results.get("missing"):
        lines.append("")
    return lines


def _data(cfg) -> Path | None:
    return Path(cfg.data_dir) if cfg.tasks else None


def _run(model, tokenizer, cfg, progress=None) -> dict[str, Any]:
    return finetune_tasks(model, tokenizer, cfg)


# Fine-tuning on every task of eval.finetune.tasks (one classifier per task, its best epoch).
TASK = Task(
    name="glue", section="finetune", locations=("data_dir",), data=_data, run=_run, summary=summary,
    report=report, requires="eval.finetune.data_dir and eval.finetune.tasks",
    metrics=(Metric("finetune.{task}.{metric:accuracy|f1|mcc}", "fraction", curve=True),
             Metric("finetune.{task}.epoch", "number"),
             Metric("finetune.{task}.train_loss", "number")),
)
