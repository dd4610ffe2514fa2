"""The ``glue`` evaluation task: GLUE-style fine-tuning of a pretrained GPT-BERT (recipe §6).

A first-token (`<s>`) classifier head on the encoder with bidirectional attention; pairs are encoded
`<s> A </s> B` (the BabyLM recommendation). AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0.01 on
matrices only), linear warmup over 6% of the steps then cosine decay to 0, evaluation after every
epoch, and the best epoch's weights kept. Metrics: accuracy, F1 of label 1 (MRPC, QQP), Matthews
correlation (CoLA); the task's metric picks the best epoch.

Data: `<data_dir>/<task>.train.jsonl` and `<task>.valid.jsonl`, one JSON object a line with
`sentence1`, optional `sentence2`, and an integer `label` >= 0.
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
from gptbert.scoring import special_ids

TASK_METRIC = {"cola": "mcc", "mrpc": "f1", "qqp": "f1"}


class TaskFormatError(ValueError):
    """A fine-tuning file that cannot be read; names file:line and what was expected."""


@dataclass(frozen=True)
class Example:
    """One fine-tuning example: a sentence, an optional second sentence and an integer label."""

    text_a: str
    text_b: str | None
    label: int


def load_task_file(path: str | Path, max_examples: int | None = None) -> list[Example]:
    """Read a task's jsonl file (at most ``max_examples`` examples); a bad record or an empty file
    is a TaskFormatError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fine-tuning data file not found: {path}")
    examples: list[Example] = []
    for where, _, item in iter_objects(path, TaskFormatError):
        if not isinstance(item.get("sentence1"), str):
            raise TaskFormatError(f"{where}: field 'sentence1' must be a string, got {item.get('sentence1')!r}")
        b = item.get("sentence2")
        if b is not None and not isinstance(b, str):
            raise TaskFormatError(f"{where}: field 'sentence2' must be a string or absent, got {b!r}")
        label = item.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise TaskFormatError(f"{where}: field 'label' must be an integer >= 0, got {label!r}")
        examples.append(Example(item["sentence1"], b, label))
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


def lr_factor(step: int, total_steps: int, warmup_ratio: float) -> float:
    """Linear warmup over warmup_ratio of the steps, then cosine decay to 0 (step is 0-based)."""
    warmup = max(1, round(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _batch(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    from gptbert.model import build_blocked_mask

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    seg = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        seg[i, : len(r)] = 1
    blocked = build_blocked_mask(seg, torch.zeros(len(rows), dtype=torch.bool))  # bidirectional
    return ids.to(device), blocked.to(device)


@torch.inference_mode()
def predict(model, encoded: list[list[int]], pad_id: int, batch_size: int = 64) -> list[int]:
    """Arg-max labels of the classifier head for encoded examples (eval mode, batched)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds: list[int] = []
    try:
        for i in range(0, len(encoded), batch_size):
            ids, blocked = _batch(encoded[i: i + batch_size], pad_id, device)
            preds += model.classifier_logits(model(ids, blocked)).argmax(-1).tolist()
    finally:
        model.train(was_training)
    return preds


def finetune(model, tokenizer, train: list[Example], valid: list[Example], cfg, metric: str = "accuracy",
             num_labels: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Fine-tune a copy of `model` on `train`; returns (model with the best epoch's weights, results).

    cfg: a FinetuneConfig. The input model is not modified.
    """
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(model)
    device = next(model.parameters()).device
    labels_seen = {ex.label for ex in train} | {ex.label for ex in valid}
    num_labels = num_labels or max(2, max(labels_seen) + 1)
    model.add_classifier(num_labels)
    model.to(device)
    pad_id = special_ids(tokenizer)["pad"]
    train_ids = [encode_example(tokenizer, ex, cfg.max_length) for ex in train]
    valid_ids = [encode_example(tokenizer, ex, cfg.max_length) for ex in valid]
    train_y = torch.tensor([ex.label for ex in train])
    valid_y = [ex.label for ex in valid]

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # biases, norms, layer weights
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    generator = torch.Generator().manual_seed(cfg.seed)

    history: list[dict[str, Any]] = []
    best_state, best = None, None
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        loss_sum = 0.0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i: i + cfg.batch_size]
            ids, blocked = _batch([train_ids[j] for j in idx], pad_id, device)
            logits = model.classifier_logits(model(ids, blocked))
            loss = F.cross_entropy(logits.float(), train_y[idx].to(device))
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, total, cfg.warmup_ratio)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            step += 1
        metrics = classification_metrics(predict(model, valid_ids, pad_id), valid_y)
        entry = {"epoch": epoch, "train_loss": loss_sum / len(train), **metrics}
        history.append(entry)
        if best is None or entry[metric] > best[metric]:  # ties keep the earlier epoch
            best = entry
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    return model, {"metric": metric, "num_labels": num_labels, "train_examples": len(train),
                   "valid_examples": len(valid), "steps": total, "epochs": history, "best": best}


def finetune_tasks(model, tokenizer, cfg) -> dict[str, Any]:
    """Every task of cfg.tasks from `<data_dir>/<task>.{train,valid}.jsonl`; {task: results}."""
    data = Path(cfg.data_dir)
    results: dict[str, Any] = {}
    for task in cfg.tasks:
        train = load_task_file(data / f"{task}.train.jsonl", cfg.max_train_examples)
        valid = load_task_file(data / f"{task}.valid.jsonl")
        _, results[task] = finetune(model, tokenizer, train, valid, cfg, metric=task_metric(task))
    return results


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


class FinetuneTask:
    """Fine-tuning on every task of ``eval.finetune.tasks`` (one classifier per task, best epoch)."""

    name = "glue"

    def data(self, cfg) -> Path | None:
        """``cfg.finetune.data_dir``, or None when no fine-tuning task is configured."""
        return Path(cfg.finetune.data_dir) if cfg.finetune.tasks else None

    def run(self, model, tokenizer, cfg, progress=None) -> dict[str, Any]:
        """Fine-tune on every task of ``cfg.finetune`` (``finetune_tasks``); {task: results}."""
        return finetune_tasks(model, tokenizer, cfg.finetune)

    def summary(self, results: dict[str, Any]) -> dict[str, float]:
        """The numeric values of each task's best epoch as ``finetune.{task}.{name}``."""
        out: dict[str, float] = {}
        for task, r in results.items():
            for name, value in r.get("best", {}).items():
                if isinstance(value, (int, float)):
                    out[f"finetune.{task}.{name}"] = float(value)
        return out

    def report(self, results: dict[str, Any]) -> list[str]:
        """report.md lines: a table with each task's metric and best epoch (values in %)."""
        lines = ["## Fine-tuning", "", "| task | metric | best epoch | value | accuracy |", "|---|---|---|---|---|"]
        for task, r in results.items():
            best = r["best"]
            lines.append(f"| {task} | {r['metric']} | {best['epoch']} | {_pct(best[r['metric']])} | "
                         f"{_pct(best['accuracy'])} |")
        lines.append("")
        return lines


TASK = FinetuneTask()
