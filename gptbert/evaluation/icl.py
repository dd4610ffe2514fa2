"""The ``icl`` evaluation task: in-context learning, k-shot classification of GLUE-format tasks.

For each task of ``eval.icl.tasks`` (``<task>.train.jsonl`` and ``<task>.valid.jsonl`` in
``eval.icl.data_dir``, read by the ``glue`` task's reader), each template of ``TEMPLATES``, each
seed and each k of ``eval.icl.shots``:

- k demonstrations are drawn (seeded, without replacement) from the training split, leaving out
  any training example whose texts equal a validation item's; they are the same for every test
  item of the run, in the drawn order (a seed is a demonstration set and order);
- each validation item becomes ``demo_1 SEP ... demo_k SEP query``, and every label's verbaliser
  (``VERBALIZERS``, or ``eval.icl.verbalizers``) is scored as the completion ``" " + word`` with
  ``score_ids(..., score_from=...)`` in each of ``eval.modes`` (MNTP: the masked label tokens read
  one position left, as everywhere else), at T = 1; the prediction is the best-scoring label;
- with ``calibrate``, contextual calibration (Zhao et al. 2021) too: the label probabilities
  (normalised over the labels) divided by those of the same prompt with the content-free input
  (``content_free``, "N/A", in place of every text), i.e. ``argmax_y log p(y|x) - log p_cf(y)``.

A prompt longer than the model's ``max_position_embeddings`` keeps ``<s>`` and its last tokens:
the demonstrations are cut from the left; the results count the truncated prompts per k.

Reported per task, mode and k: the mean accuracy over the (template, seed) runs, their standard
deviation and standard error, beside the majority-class baseline (the training split's most
frequent label, scored on the validation items).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common.config.base import to_dict

from .babylm import completion_inputs
from .finetune import Example, load_task_file
from .registry import Metric, Task

# (with a second text, with one text) per template; the verbalised label follows after a space.
TEMPLATES = (
    ("{a}\nQuestion: {b} Yes or no?\nAnswer:", "{a}\nQuestion: Is this right? Yes or no?\nAnswer:"),
    ("Sentence 1: {a}\nSentence 2: {b}\nLabel:", "Sentence: {a}\nLabel:"),
    ('"{a}" and "{b}":', '"{a}":'),
)
SEPARATOR = "\n\n"
# Label i -> word i (GLUE's label ids: RTE 0 = entailment, MRPC 1 = equivalent, ...).
VERBALIZERS = {
    "rte": ("yes", "no"), "mrpc": ("no", "yes"), "qnli": ("yes", "no"), "mnli": ("yes", "maybe", "no"),
    "qqp": ("no", "yes"), "boolq": ("no", "yes"), "multirc": ("no", "yes"), "wsc": ("no", "yes"),
    "cola": ("no", "yes"), "sst2": ("bad", "good"),
}


class IclError(ValueError):
    """Bad ICL configuration or data (one line naming the file or field)."""


def verbalizers(cfg) -> dict[str, tuple[str, ...]]:
    """The label words per task: ``VERBALIZERS`` overridden by ``eval.icl.verbalizers``."""
    out = dict(VERBALIZERS)
    for entry in cfg.icl.verbalizers:
        task, _, words = entry.partition("=")
        out[task] = tuple(w.strip() for w in words.split(",") if w.strip())
    return out


def render(example: Example, template: int, label_word: str | None = None) -> str:
    """One example in template ``template``, followed by ``" " + label_word`` when given."""
    pair, single = TEMPLATES[template]
    text = pair.format(a=example.text_a, b=example.text_b) if example.text_b is not None else single.format(a=example.text_a)
    return text if label_word is None else f"{text} {label_word}"


def draw_demonstrations(train: Sequence[Example], test: Sequence[Example], k: int, seed: int) -> list[Example]:
    """k training examples drawn with ``seed`` (without replacement, in the drawn order), none of
    whose texts equal a test item's."""
    held_out = {(ex.text_a, ex.text_b) for ex in test}
    pool = [ex for ex in train if (ex.text_a, ex.text_b) not in held_out]
    if k > len(pool):
        raise IclError(f"icl: {k} demonstrations asked for, the training split has {len(pool)} usable examples")
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)] if k else []


def build_prompt(demos: Sequence[Example], query: Example, template: int, words: Sequence[str]) -> str:
    """``demo_1 SEP ... demo_k SEP query`` (each demonstration with its label word), without the
    query's label."""
    parts = [render(d, template, words[d.label]) for d in demos]
    return SEPARATOR.join(parts + [render(query, template)])


def truncate_left(ids: list[int], start: int, max_length: int) -> tuple[list[int], int, bool]:
    """(ids, start, truncated): ``<s>`` kept, the oldest tokens after it dropped until the whole
    fits in ``max_length`` (the scored tokens are never cut unless they alone exceed it)."""
    if len(ids) <= max_length:
        return ids, start, False
    drop = len(ids) - max_length
    return [ids[0]] + ids[1 + drop:], max(1, start - drop), True


def score_labels(model, tokenizer, prompts: Sequence[str], words: Sequence[str], modes: Sequence[str],
                 max_tokens: int | str = "auto", max_length: int | None = None,
                 progress=None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({mode: (prompts, labels) log p(" " + word | prompt)}, truncated per prompt); each distinct
    sentence is scored once."""
    from gptbert.scoring import score_ids, special_ids

    index: dict[tuple[str, str], int] = {}
    for p in prompts:
        for w in words:
            index.setdefault((p, w), len(index))
    ids, starts = completion_inputs(tokenizer, [f"{p} {w}" for p, w in index], [f" {w}" for _, w in index])
    cut = np.zeros(len(ids), dtype=bool)
    if max_length is not None:
        for i in range(len(ids)):
            ids[i], starts[i], cut[i] = truncate_left(ids[i], starts[i], max_length)
    special = special_ids(tokenizer)
    flat = score_ids(model, ids, modes, [1.0], max_tokens, score_from=starts, mask_id=special["mask"],
                     pad_id=special["pad"], progress=progress)
    rows = np.array([[index[(p, w)] for w in words] for p in prompts], dtype=np.int64).reshape(len(prompts), len(words))
    return {m: v[:, 0][rows] for m, v in flat.items()}, cut[rows].any(axis=1)


def calibrated_predictions(scores: np.ndarray, content_free: np.ndarray) -> np.ndarray:
    """argmax over labels of p(y|x) / p_cf(y), both normalised over the labels: ``scores``
    (items, labels) and ``content_free`` (labels,) are log-likelihoods."""
    def log_normalise(x: np.ndarray) -> np.ndarray:
        m = x.max(axis=-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))

    return np.argmax(log_normalise(scores) - log_normalise(content_free), axis=-1)


def aggregate(accuracies: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation (n - 1; 0 for one run), standard error and count of run accuracies."""
    a = np.asarray(accuracies, dtype=np.float64)
    std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return {"mean": float(a.mean()), "std": std, "se": std / np.sqrt(len(a)), "runs": int(len(a))}


def majority_baseline(train_labels: Sequence[int], test_labels: Sequence[int]) -> tuple[int, float]:
    """(the training split's most frequent label, the smallest on a tie; its accuracy on the test items)."""
    counts = np.bincount(np.asarray(train_labels))
    label = int(np.argmax(counts))
    return label, float(np.mean(np.asarray(test_labels) == label))


def _model_max_length(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def evaluate_task(model, tokenizer, cfg, task: str, progress=None) -> dict[str, Any]:
    """One task's runs and their aggregates (see the module docstring)."""
    icl = cfg.icl
    root = Path(icl.data_dir)
    train = load_task_file(root / f"{task}.train.jsonl", task=task)
    test = load_task_file(root / f"{task}.valid.jsonl", max_examples=icl.max_items, task=task)
    words = verbalizers(cfg).get(task)
    if words is None:
        raise IclError(f"config field 'eval.icl.verbalizers': no label words for task {task!r} "
                       f"(add \"{task}=word0,word1\")")
    for name, split in (("train", train), ("valid", test)):
        bad = sorted({ex.label for ex in split if ex.label >= len(words)})
        if bad:
            raise IclError(f"{root / f'{task}.{name}.jsonl'}: label {bad[0]} has no label word "
                           f"(expected labels 0..{len(words) - 1}: {', '.join(words)})")
    labels = np.array([ex.label for ex in test])
    majority_label, majority = majority_baseline([ex.label for ex in train], labels)
    cf = Example(icl.content_free, icl.content_free if any(ex.text_b is not None for ex in test) else None, 0)
    # Every prompt of every run, scored in one call (shared sentences once: k = 0 is seed-free).
    runs, prompts = [], []
    for k in icl.shots:
        for seed in icl.seeds:
            demos = draw_demonstrations(train, test, k, seed)
            for template in icl.templates:
                first = len(prompts)
                prompts += [build_prompt(demos, q, template, words) for q in test]
                prompts.append(build_prompt(demos, cf, template, words))
                runs.append((k, seed, template, first))
    scores, cut = score_labels(model, tokenizer, prompts, words, list(cfg.modes), cfg.max_tokens,
                               _model_max_length(model), progress=progress)
    n = len(test)
    per_run: list[dict[str, Any]] = []
    for k, seed, template, first in runs:
        run = {"k": k, "seed": seed, "template": template, "truncated": int(cut[first:first + n].sum()),
               "accuracy": {}, "calibrated": {}}
        for mode, s in scores.items():
            run["accuracy"][mode] = float(np.mean(np.argmax(s[first:first + n], axis=1) == labels))
            if icl.calibrate:
                pred = calibrated_predictions(s[first:first + n], s[first + n])
                run["calibrated"][mode] = float(np.mean(pred == labels))
        per_run.append(run)
    curves: dict[str, Any] = {}
    for kind in ("accuracy", "calibrated") if icl.calibrate else ("accuracy",):
        curves[kind] = {mode: {str(k): aggregate([r[kind][mode] for r in per_run if r["k"] == k]) for k in icl.shots}
                        for mode in scores}
    return {"num_train": len(train), "num_items": n, "labels": list(words), "majority_label": majority_label,
            "majority": majority, "max_length": _model_max_length(model),
            "truncated": {str(k): sum(r["truncated"] for r in per_run if r["k"] == k) for k in icl.shots},
            "prompts_per_k": n * len(icl.seeds) * len(icl.templates),
            "curves": curves, "runs": per_run}


def evaluate_icl(model, tokenizer, cfg, progress=None) -> dict[str, Any]:
    """Every task of ``eval.icl.tasks``: {"data_dir", "shots", "templates", "seeds", "tasks"}."""
    from common.artifacts import tree_digest

    icl = cfg.icl
    out: dict[str, Any] = {"data_dir": icl.data_dir, "shots": list(icl.shots), "templates": list(icl.templates),
                           "seeds": list(icl.seeds), "content_free": icl.content_free, "tasks": {}}
    for task in icl.tasks:
        result = evaluate_task(model, tokenizer, cfg, task, progress=progress)
        result["data_digest"] = tree_digest(Path(icl.data_dir) / f"{task}.valid.jsonl")
        out["tasks"][task] = result
    return out


def summary(results: dict[str, Any]) -> dict[str, float]:
    """``icl.{task}.{mode}.k{k}`` (mean accuracy, ``_se`` its standard error), the calibrated
    ``icl.{task}.{mode}.k{k}_cal`` (and ``_cal_se``), and ``icl.{task}.majority``: fractions."""
    out = {}
    for task, r in results["tasks"].items():
        out[f"icl.{task}.majority"] = r["majority"]
        for kind, suffix in (("accuracy", ""), ("calibrated", "_cal")):
            for mode, by_k in r["curves"].get(kind, {}).items():
                for k, agg in by_k.items():
                    out[f"icl.{task}.{mode}.k{k}{suffix}"] = agg["mean"]
                    out[f"icl.{task}.{mode}.k{k}{suffix}_se"] = agg["se"]
    return out


def report(results: dict[str, Any]) -> list[str]:
    """report.md lines: per task a k x mode table of mean ± SE (calibrated beside), the majority
    baseline, the truncated prompts, and the curve figure."""
    lines = ["## In-context learning (icl)", "",
             f"Accuracy % over {len(results['templates'])} templates x {len(results['seeds'])} demonstration "
             "seeds (mean ± standard error); cal: contextual calibration against "
             f"{results['content_free']!r}. Figure: `icl_curve.png`.", ""]
    for task, r in results["tasks"].items():
        modes = list(r["curves"]["accuracy"])
        kinds = list(r["curves"])
        head = [f"{m}{' cal' if kind == 'calibrated' else ''}" for kind in kinds for m in modes]
        lines += [f"### {task} ({r['num_items']} items, labels {', '.join(r['labels'])}; majority class "
                  f"{100 * r['majority']:.1f}%)", "",
                  "| k | " + " | ".join(head) + " | truncated |", "|---|" + "---|" * (len(head) + 1)]
        for k in results["shots"]:
            cells = [f"{100 * r['curves'][kind][m][str(k)]['mean']:.1f} ± {100 * r['curves'][kind][m][str(k)]['se']:.1f}"
                     for kind in kinds for m in modes]
            lines.append(f"| {k} | " + " | ".join(cells) + f" | {r['truncated'][str(k)]}/{r['prompts_per_k']} |")
        if any(r["truncated"].values()):
            lines += ["", f"Prompts over the model's {r['max_length']} positions were cut from the left "
                      "(their oldest demonstration tokens dropped)."]
        lines.append("")
    return lines


def _data(cfg) -> Path | None:
    return Path(cfg.icl.data_dir) if cfg.icl.tasks else None


def _run(model, tokenizer, cfg, progress=None) -> dict[str, Any]:
    return evaluate_icl(model, tokenizer, cfg, progress=progress)


def _milestone(cfg) -> dict[str, Any]:
    # Milestone models: the first seed only, at most milestone_max_items test items.
    caps = [c for c in (cfg.icl.max_items, cfg.milestone_max_items) if c is not None]
    cap = min(caps) if caps else None
    return {"icl": {**to_dict(cfg.icl), "seeds": list(cfg.icl.seeds[:1]), "max_items": cap}}


TASK = Task(
    name="icl", section="", locations=("icl.data_dir",), data=_data, run=_run, summary=summary,
    report=report, zero_shot=True, milestone=_milestone, requires="eval.icl.data_dir and eval.icl.tasks",
    # The _se family first: a name is of the first family it matches ({k} would match "k4_se").
    metrics=(Metric("icl.{task}.majority", "fraction"),
             Metric("icl.{task}.{mode}.{k}_se", "fraction"),
             Metric("icl.{task}.{mode}.{k}", "fraction", curve=True)),
)
