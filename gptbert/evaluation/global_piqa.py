"""The ``global_piqa`` evaluation task: Global PIQA's English items (BabyLM 2026, strict tracks).

The 2026 challenge (github: babylm-org/babylm-eval, ``strict/``) adds two physical-commonsense
sets to the zero-shot suite, each one file ``eng_latn.jsonl`` in its own folder of the official
``evaluation_data/{full,fast}_eval`` layout (the fast copy is the full set):

- ``global_piqa_parallel`` (103 items) and ``global_piqa_nonparallel`` (100 items); each line has
  ``example_id``, ``prompt``, ``solution0``, ``solution1`` (more ``solutionN`` are read when
  present) and ``label``, the index of the right solution.

Each solution is scored as the completion ``" " + solution`` of ``prompt + " " + solution`` (the
chosen completion is what the official predictions record); an item is right when the labelled
solution scores at least as high as every other (the pipeline's tie rule), and the score is the
accuracy in %. The data is read from ``eval.babylm_dir``, beside the rest of the suite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.artifacts import tree_digest
from common.jsonl import iter_objects

from .babylm import BabyLMFormatError, Item, score_items, suite_root, task_metrics
from .registry import Metric, Task

SETS = {"global_piqa_parallel": 103, "global_piqa_nonparallel": 100}  # name -> official item count
DATA_FILE = "eng_latn.jsonl"


def load_items(path: str | Path) -> tuple[list[str], list[Item], list[list[int]]]:
    """(example ids, items, order) of one Global PIQA file: each item's candidates are its
    solutions with the labelled one first (the suite's convention), and ``order[i][j]`` is the
    solution index of candidate ``j`` (to map a choice back to the file's solution)."""
    path = Path(path)
    task = path.parent.name
    ids, items, orders = [], [], []
    for where, _, obj in iter_objects(path, BabyLMFormatError):
        for key in ("example_id", "prompt", "solution0", "solution1", "label"):
            if key not in obj:
                raise BabyLMFormatError(f"{where}: missing field '{key}' (Global PIQA: example_id, prompt, "
                                        "solution0, solution1, label)")
        n = 2
        while f"solution{n}" in obj:
            n += 1
        label = obj["label"]
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < n:
            raise BabyLMFormatError(f"{where}: field 'label' must be a solution index 0..{n - 1}, got {label!r}")
        order = [label] + [k for k in range(n) if k != label]
        completions = tuple(" " + str(obj[f"solution{k}"]) for k in order)
        sentences = tuple(str(obj["prompt"]) + c for c in completions)
        ids.append(str(obj["example_id"]))
        items.append(Item(sentences, completions, task, (("UID", task),)))
        orders.append(order)
    if not items:
        raise BabyLMFormatError(f"{path}: holds no items")
    return ids, items, orders


def find_sets(data_dir: str | Path, split: str = "full") -> dict[str, Path]:
    """{set: its eng_latn.jsonl} of the Global PIQA sets present under the suite folder."""
    root = suite_root(data_dir, split)
    return {name: root / name / DATA_FILE for name in SETS if (root / name / DATA_FILE).is_file()}


def evaluate_sets(model, tokenizer, cfg, progress=None) -> dict[str, Any]:
    """Accuracy at T = 1 per set and mode (``task_metrics``' official tie rule)."""
    found = find_sets(cfg.babylm_dir, cfg.babylm_split)
    out: dict[str, Any] = {"data_dir": str(cfg.babylm_dir), "split": cfg.babylm_split, "sets": {},
                           "skipped": {n: "not found" for n in SETS if n not in found}}
    for name, path in found.items():
        _, items, _ = load_items(path)
        scores = score_items(model, tokenizer, items, list(cfg.modes), [1.0], cfg.max_tokens, progress=progress)
        out["sets"][name] = {"data_digest": tree_digest(path), "num_items": len(items), "modes": {
            mode: {k: v for k, v in task_metrics("blimp", items, s[:, :, 0]).items() if k != "groups"}  # an accuracy
            for mode, s in scores.items()}}
    return out


def summary(results: dict[str, Any]) -> dict[str, float]:
    """``global_piqa.{set}.{mode}.t1`` (and ``.t1_strict``: ties wrong), in %."""
    out = {}
    for name, r in results["sets"].items():
        for mode, m in r["modes"].items():
            out[f"global_piqa.{name}.{mode}.t1"] = m["score"]
            out[f"global_piqa.{name}.{mode}.t1_strict"] = m["strict_score"]
    return out


def report(results: dict[str, Any]) -> list[str]:
    """report.md lines: accuracy per set and mode."""
    modes = sorted({m for r in results["sets"].values() for m in r["modes"]})
    lines = [f"## Global PIQA ({results['split']}_eval)", "",
             "Accuracy % at T = 1 (a tie counts as right, as in the official pipeline).", "",
             "| set | items | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    for name, r in results["sets"].items():
        lines.append(f"| {name} | {r['num_items']} | " + " | ".join(f"{r['modes'][m]['score']:.2f}" for m in modes) + " |")
    if results["skipped"]:
        lines += ["", "Skipped: " + ", ".join(results["skipped"])]
    return lines + [""]


def _data(cfg) -> Path | None:
    if not cfg.babylm_dir:
        return None
    # The suite folder, as for the babylm task (its digest covers both sets); no set: not configured.
    return suite_root(cfg.babylm_dir, cfg.babylm_split) if find_sets(cfg.babylm_dir, cfg.babylm_split) else None


def _run(model, tokenizer, cfg, progress=None) -> dict[str, Any]:
    return evaluate_sets(model, tokenizer, cfg, progress=progress)


def _milestone(cfg) -> dict[str, Any]:
    return {"babylm_split": "fast"} if cfg.babylm_dir and find_sets(cfg.babylm_dir, "fast") else {}


TASK = Task(
    name="global_piqa", section="", locations=("babylm_dir",), data=_data, run=_run, summary=summary,
    report=report, zero_shot=True, milestone=_milestone,
    metrics=(Metric("global_piqa.{set}.{mode}.t1", "percent", curve=True),
             Metric("global_piqa.{set}.{mode}.t1_strict", "percent")),
)
