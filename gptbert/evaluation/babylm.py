"""The ``babylm`` evaluation task: the BabyLM 2025 zero-shot suite, scored natively.

Reads a folder laid out like the official pipeline's ``evaluation_data`` (github:
babylm/evaluation-pipeline-2025): ``full_eval/`` (or ``fast_eval/``) with one sub-folder per task,
each holding ``*.jsonl`` files in the official formats, and reproduces the pipeline's rules:

- Every item is a list of candidate sentences, the right one first, and for each candidate the
  *completion* whose tokens are scored: the whole sentence (BLiMP, the supplement, WUG), the target
  after the first context (EWoK: ``Context1 + " " + TargetN``, the pipeline never uses Context2),
  the option after the prefix (entity tracking) or the property phrase (COMPS). The scored tokens are
  those whose character span ends after ``len(sentence) - len(completion)``, with ``<s>`` prepended.
- ``causal`` sums log p(token | left context); ``mntp`` masks each scored token in its own copy and
  reads the prediction one position to the left; ``fused`` is their sum (ours, not the pipeline's).
- An item is right when candidate 0 scores at least as high as every other: the pipeline takes
  ``torch.max``, which returns the first index on ties, so a tie counts as right. The strict
  ``ties are wrong`` accuracy is reported next to it.
- Accuracy per value of every metadata key (UID, field, phenomenon, EWoK context/target types);
  the headline is the mean over UIDs, except entity tracking (mean over the ``regular``,
  ``ambiref`` and ``move_contents`` files of the mean over their ``{file}_{numops}_ops`` UIDs).
  WUG tasks report Spearman's rho between the softmax probability of the first sentence (over the
  two) and the human ratio.

The pipeline picks the temperature that scores best on the very items it reports. Here T = 1 is the
number comparable with the pipeline's default run, and the tuned temperature is chosen on a dev
split (every ``tune_every``-th item of each UID) and reported on the other items only.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from common.artifacts import tree_digest
from common.jsonl import iter_objects

from .reading import READING_FILE, evaluate_reading, load_reading
from .registry import Metric, Task


class BabyLMFormatError(ValueError):
    """A BabyLM evaluation file that cannot be read; the message names file:line and what was expected."""


@dataclass(frozen=True)
class Item:
    """One zero-shot item: candidate sentences (the right one first), the scored ending of each, the
    UID it is averaged under, the metadata it is also grouped by, and a human ratio (WUG only)."""

    sentences: tuple[str, ...]
    completions: tuple[str, ...]
    uid: str
    meta: tuple[tuple[str, str], ...]
    ratio: float | None = None


def _fields(obj: dict[str, Any], where: str, names: Sequence[str], kind: type = str) -> None:
    for name in names:
        if name not in obj:
            raise BabyLMFormatError(f"{where}: missing field '{name}' (required: {', '.join(names)})")
        if not isinstance(obj[name], kind) or isinstance(obj[name], bool):
            raise BabyLMFormatError(f"{where}: field '{name}' must be {kind.__name__}, got {obj[name]!r}")


def decode_blimp(obj: dict[str, Any], where: str, path: Path) -> Item:
    """BLiMP (``field``, ``UID``, ``linguistics_term``) or a supplement file (UID = the file's name)."""
    _fields(obj, where, ("sentence_good", "sentence_bad"))
    pair = (obj["sentence_good"], obj["sentence_bad"])
    if "field" in obj:
        _fields(obj, where, ("field", "UID", "linguistics_term"))
        field = "syntax/semantics" if obj["field"] == "syntax_semantics" else obj["field"]
        meta = (("field", field), ("UID", obj["UID"]), ("linguistics_term", obj["linguistics_term"]))
        return Item(pair, pair, obj["UID"], meta)
    return Item(pair, pair, path.stem, (("field", "supplement"), ("UID", path.stem),
                                        ("linguistics_term", "supplement")))


def decode_ewok(obj: dict[str, Any], where: str, path: Path) -> Item:
    """EWoK: both targets after Context1; the targets (with their leading space) are scored."""
    _fields(obj, where, ("Domain", "Context1", "Target1", "Target2", "ContextType", "ContextDiff", "TargetDiff"))
    sentences = (f"{obj['Context1']} {obj['Target1']}", f"{obj['Context1']} {obj['Target2']}")
    completions = (" " + obj["Target1"], " " + obj["Target2"])
    meta = (("UID", obj["Domain"]), ("context_type", obj["ContextType"]),
            ("context_contrast", obj["ContextDiff"]), ("target_contrast", obj["TargetDiff"]))
    return Item(sentences, completions, obj["Domain"], meta)


def decode_entity_tracking(obj: dict[str, Any], where: str, path: Path) -> Item:
    """Entity tracking: prefix + each option; the options are scored; UID = file_numops_ops."""
    _fields(obj, where, ("input_prefix",))
    options = obj.get("options")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise BabyLMFormatError(f"{where}: field 'options' must be a list of at least 2 strings")
    if not isinstance(obj.get("numops"), int) or isinstance(obj.get("numops"), bool):
        raise BabyLMFormatError(f"{where}: field 'numops' must be an integer, got {obj.get('numops')!r}")
    uid = f"{path.stem}_{obj['numops']}_ops"
    return Item(tuple(obj["input_prefix"] + o for o in options), tuple(options), uid, (("UID", uid),))


def decode_wug(obj: dict[str, Any], where: str, path: Path, task: str) -> Item:
    """WUG: two tab-separated sentences, scored whole, and the human preference for the first."""
    _fields(obj, where, ("sentences",))
    ratio = obj.get("ratio")
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not np.isfinite(ratio):
        raise BabyLMFormatError(f"{where}: field 'ratio' must be a number, got {ratio!r}")
    sentences = tuple(obj["sentences"].split("\t"))
    if len(sentences) < 2:
        raise BabyLMFormatError(f"{where}: field 'sentences' must hold tab-separated sentences, got one")
    return Item(sentences, sentences, task, (("UID", task),), float(ratio))


def decode_comps(obj: dict[str, Any], where: str, path: Path) -> Item:
    """COMPS: each prefix + the property phrase; the phrase is scored; UID from the file name."""
    _fields(obj, where, ("prefix_acceptable", "prefix_unacceptable", "property_phrase"))
    phrase = obj["property_phrase"]
    subset = {"comps_base": "base", "comps_wugs": "wugs",
              "comps_wugs_dist-before": "wugs_dist_before"}.get(path.stem, "wugs_dist_in_between")
    sentences = (f"{obj['prefix_acceptable']} {phrase}", f"{obj['prefix_unacceptable']} {phrase}")
    return Item(sentences, (phrase, phrase), subset, (("UID", subset),))


@dataclass(frozen=True)
class Subtask:
    """One task of the suite: how its lines decode, its folder in full_eval and in fast_eval, and
    whether it reports an accuracy or a correlation."""

    name: str
    decode: Callable[[dict[str, Any], str, Path], Item]
    full: str
    fast: str | None
    metric: str = "accuracy"


SUBTASKS: dict[str, Subtask] = {t.name: t for t in (
    Subtask("blimp", decode_blimp, "blimp_filtered", "blimp_fast"),
    Subtask("supplement", decode_blimp, "supplement_filtered", "supplement_fast"),
    Subtask("ewok", decode_ewok, "ewok_filtered", "ewok_fast"),
    Subtask("entity_tracking", decode_entity_tracking, "entity_tracking", "entity_tracking_fast"),
    Subtask("wug_adj", lambda o, w, p: decode_wug(o, w, p, "wug_adj"), "wug_adj_nominalization",
            "wug_adj_nominalization", "spearman"),
    Subtask("wug_past", lambda o, w, p: decode_wug(o, w, p, "wug_past"), "wug_past_tense", "wug_past_tense",
            "spearman"),
    Subtask("comps", decode_comps, "comps", None),
)}
ENTITY_SPLITS = ("regular", "ambiref", "move_contents")
NOT_SCORED: dict[str, str] = {}  # folders of the official layout this suite does not score
FINETUNE_FOLDER = "glue_filtered"  # fine-tuned by the `glue` task (gptbert evaluate --suite babylm)


def suite_root(data_dir: str | Path, split: str = "full") -> Path:
    """The folder holding the task folders: ``DIR/full_eval`` (or ``fast_eval``) when it exists,
    else ``DIR`` itself."""
    root = Path(data_dir)
    nested = root / f"{split}_eval"
    return nested if nested.is_dir() else root


def find_subtasks(data_dir: str | Path, split: str = "full",
                  names: Sequence[str] | None = None) -> tuple[dict[str, Path], dict[str, str]]:
    """({task: its folder} found under the suite folder, {task: why it is skipped})."""
    root = suite_root(data_dir, split)
    found, skipped = {}, {}
    for name in names or [*SUBTASKS, "reading"]:
        if name == "reading":  # a CSV, not a folder of jsonl items (reading.py)
            path = root / READING_FILE
            if path.is_file():
                found[name] = path
            else:
                skipped[name] = f"{path} not found"
            continue
        task = SUBTASKS[name]
        folder_name = task.full if split == "full" else task.fast
        if folder_name is None:
            skipped[name] = f"no {split}_eval version in the official layout"
            continue
        folder = root / folder_name
        if folder.is_dir() and any(folder.glob("*.jsonl")):
            found[name] = folder
        else:
            skipped[name] = f"{folder} not found (or holds no *.jsonl)"
    # Parts of the official layout this suite does not score (yet): said, not silently ignored.
    for folder_name, why in NOT_SCORED.items():
        if (root / folder_name).exists():
            skipped[folder_name] = why
    return found, skipped


def load_subtask(name: str, folder: str | Path, max_items_per_uid: int | None = None) -> list[Item]:
    """Every item of a task folder's ``*.jsonl`` files (sorted by name); at most N items per UID."""
    task = SUBTASKS[name]
    items: list[Item] = []
    per_uid: dict[str, int] = defaultdict(int)
    for path in sorted(Path(folder).glob("*.jsonl")):
        for where, _, obj in iter_objects(path, BabyLMFormatError):
            item = task.decode(obj, where, path)
            if max_items_per_uid is not None and per_uid[item.uid] >= max_items_per_uid:
                continue
            per_uid[item.uid] += 1
            items.append(item)
    if not items:
        raise BabyLMFormatError(f"{folder}: the jsonl files hold no items")
    return items


# ----------------------------------------------------------------------------- scoring

def completion_inputs(tokenizer, sentences: Sequence[str], completions: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """Token ids (``<s>`` first) of each sentence and the index of its first scored token: the first
    token whose character span ends after ``len(sentence) - len(completion)``."""
    from gptbert.scoring import special_ids

    bos = special_ids(tokenizer)["bos"]
    encodings = tokenizer.encode_batch(list(sentences), add_special_tokens=False) if sentences else []
    ids, starts = [], []
    for sentence, completion, enc in zip(sentences, completions, encodings):
        first_char = len(sentence) - len(completion)
        start = next((i for i, (_, end) in enumerate(enc.offsets) if end > first_char), len(enc.ids))
        ids.append([bos] + list(enc.ids))
        starts.append(start + 1)  # + 1 for <s>
    return ids, starts


def score_items(model, tokenizer, items: Sequence[Item], modes: Sequence[str], temperatures: Sequence[float],
                max_tokens: int | str = "auto", progress=None) -> dict[str, np.ndarray]:
    """{mode: (items, candidates, temperatures)} completion log-probabilities; each distinct
    (sentence, completion) is scored once. Items with fewer candidates are padded with -inf."""
    from gptbert.scoring import score_ids, special_ids

    index: dict[tuple[str, str], int] = {}
    for item in items:
        for s, c in zip(item.sentences, item.completions):
            index.setdefault((s, c), len(index))
    keys = list(index)
    ids, starts = completion_inputs(tokenizer, [k[0] for k in keys], [k[1] for k in keys])
    special = special_ids(tokenizer)
    flat = score_ids(model, ids, modes, temperatures, max_tokens, score_from=starts,
                     mask_id=special["mask"], pad_id=special["pad"], progress=progress)
    width = max(len(item.sentences) for item in items)
    out = {}
    for mode, values in flat.items():
        scores = np.full((len(items), width, len(temperatures)), -np.inf)
        for i, item in enumerate(items):
            for j, key in enumerate(zip(item.sentences, item.completions)):
                scores[i, j] = values[index[key]]
        out[mode] = scores
    return out


# ----------------------------------------------------------------------------- metrics

def rank_correct(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(official, strict) correctness of items from (items, candidates) scores: candidate 0 is
    chosen when it is at least as high as every other (the pipeline's torch.max tie rule), and
    strictly when it is higher than every other."""
    others = scores[:, 1:].max(axis=1)
    return scores[:, 0] >= others, scores[:, 0] > others


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho with average ranks for ties (scipy.stats.spearmanr's definition)."""
    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        _, first, counts = np.unique(v[order], return_index=True, return_counts=True)
        r = np.empty(len(v))
        r[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based, ties share their mean rank
        return r

    a, b = ranks(np.asarray(x, dtype=np.float64)), ranks(np.asarray(y, dtype=np.float64))
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def first_probability(scores: np.ndarray) -> np.ndarray:
    """Softmax over the candidates' log-probabilities, probability of candidate 0, in float32 as
    the pipeline computes it: probabilities that round to exactly 1 tie in the rank correlation
    (on a weak model, float64 would move WUG's rho by 0.015)."""
    s = np.asarray(scores, dtype=np.float32)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return (e[:, 0] / e.sum(axis=1, dtype=np.float32)).astype(np.float32)


def task_metrics(name: str, items: Sequence[Item], scores: np.ndarray) -> dict[str, Any]:
    """The official numbers of one task at one temperature: ``score`` (mean accuracy over UIDs in
    %, entity tracking per split, or Spearman's rho for WUG), ``strict_score`` (ties wrong) and the
    accuracy per value of each metadata key."""
    if SUBTASKS[name].metric == "spearman":
        rho = spearman(first_probability(scores), [item.ratio for item in items])
        return {"score": rho, "strict_score": rho, "groups": {}}
    official, strict = rank_correct(scores)
    groups: dict[str, dict[str, float]] = {}
    strict_uid: dict[str, float] = {}
    keys = [k for k, _ in items[0].meta]
    for key in keys:
        values = [dict(item.meta)[key] for item in items]
        by: dict[str, list[int]] = defaultdict(list)
        for i, v in enumerate(values):
            by[v].append(i)
        groups[key] = {v: 100.0 * float(official[idx].mean()) for v, idx in sorted(by.items())}
        if key == "UID":
            strict_uid = {v: 100.0 * float(strict[idx].mean()) for v, idx in sorted(by.items())}

    def headline(per_uid: dict[str, float]) -> float:
        if name != "entity_tracking":
            return float(np.mean(list(per_uid.values())))
        splits = []
        for split in ENTITY_SPLITS:
            accs = [acc for uid, acc in per_uid.items() if uid.startswith(split)]
            if accs:
                splits.append(float(np.mean(accs)))
        return float(np.mean(splits))

    return {"score": headline(groups["UID"]), "strict_score": headline(strict_uid), "groups": groups}


def dev_split(items: Sequence[Item], every: int) -> np.ndarray:
    """Boolean mask of the dev items: every ``every``-th item of each UID, in file order."""
    seen: dict[str, int] = defaultdict(int)
    mask = np.zeros(len(items), dtype=bool)
    for i, item in enumerate(items):
        mask[i] = seen[item.uid] % every == 0
        seen[item.uid] += 1
    return mask


def evaluate_subtask(name: str, items: Sequence[Item], scores: dict[str, np.ndarray],
                     temperatures: Sequence[float], tune_every: int) -> dict[str, Any]:
    """Per mode: the metrics at T = 1 on every item, and the temperature chosen on the dev split
    with its score (and T = 1's) on the held-out items."""
    temperatures = [float(t) for t in temperatures]
    t1 = next((k for k, t in enumerate(temperatures) if abs(t - 1.0) < 1e-9), None)
    dev = dev_split(items, tune_every)
    held = [item for item, d in zip(items, dev) if not d]
    dev_items = [item for item, d in zip(items, dev) if d]
    out: dict[str, Any] = {}
    for mode, s in scores.items():
        result: dict[str, Any] = {"t1": task_metrics(name, items, s[:, :, t1]) if t1 is not None else None}
        if len(temperatures) > 1 and held and dev_items:
            dev_scores = [task_metrics(name, dev_items, s[dev][:, :, k])["score"] for k in range(len(temperatures))]
            # A correlation is undefined (nan) where every probability saturates: never chosen.
            ranked = [s_ if np.isfinite(s_) else -np.inf for s_ in dev_scores]
            best = max(range(len(temperatures)), key=lambda k: (ranked[k], -abs(temperatures[k] - 1.0)))
            held_scores = s[~dev]
            result["tuned"] = {
                "temperature": temperatures[best], "dev_score": dev_scores[best], "dev_items": len(dev_items),
                "heldout_items": len(held), "heldout_score": task_metrics(name, held, held_scores[:, :, best])["score"],
                "heldout_t1_score": task_metrics(name, held, held_scores[:, :, t1])["score"] if t1 is not None else None,
            }
        out[mode] = result
    return out


def evaluate_suite(model, tokenizer, cfg, progress=None) -> dict[str, Any]:
    """Every task of ``cfg.babylm_tasks`` found under ``cfg.babylm_dir`` (``full`` or ``fast`` split);
    the missing ones are listed as skipped."""
    found, skipped = find_subtasks(cfg.babylm_dir, cfg.babylm_split, cfg.babylm_tasks)
    if not found:
        raise FileNotFoundError(f"no BabyLM task folder under {suite_root(cfg.babylm_dir, cfg.babylm_split)} "
                                f"(expected some of: {', '.join(SUBTASKS[n].full for n in SUBTASKS)})")
    results: dict[str, Any] = {"data_dir": str(cfg.babylm_dir), "split": cfg.babylm_split, "tasks": {},
                               "skipped": skipped, "temperatures": [float(t) for t in cfg.temperatures],
                               "tune_every": cfg.tune_every}
    for name, folder in found.items():
        if name == "reading":
            data = load_reading(folder)
            results["tasks"][name] = {
                "data_dir": str(folder), "data_digest": tree_digest(folder), "metric": "reading",
                "num_items": len(data["word"]),
                "modes": evaluate_reading(model, tokenizer, data, cfg.modes, cfg.max_tokens)}
            continue
        items = load_subtask(name, folder, cfg.max_pairs_per_paradigm)
        scores = score_items(model, tokenizer, items, list(cfg.modes), list(cfg.temperatures), cfg.max_tokens,
                             progress=progress)
        results["tasks"][name] = {
            "data_dir": str(folder), "data_digest": tree_digest(folder), "num_items": len(items),
            "num_uids": len({item.uid for item in items}), "metric": SUBTASKS[name].metric,
            "modes": evaluate_subtask(name, items, scores, cfg.temperatures, cfg.tune_every),
        }
    return results


def summary(results: dict[str, Any]) -> dict[str, float]:
    """Flat headline metrics: ``babylm.{task}.{mode}.t1`` (and ``.t1_strict``, ``.tuned``,
    ``.tuned_temperature``)."""
    out: dict[str, float] = {}
    for name, r in results["tasks"].items():
        if r["metric"] == "reading":
            for mode, m in r["modes"].items():
                out[f"babylm.reading.{mode}.eye_tracking"] = m["eye_tracking"]
                out[f"babylm.reading.{mode}.self_paced"] = m["self_paced"]
            continue
        for mode, m in r["modes"].items():
            base = f"babylm.{name}.{mode}"
            if m["t1"] is not None:
                out[f"{base}.t1"] = m["t1"]["score"]
                if r["metric"] == "accuracy":
                    out[f"{base}.t1_strict"] = m["t1"]["strict_score"]
            if "tuned" in m:
                out[f"{base}.tuned"] = m["tuned"]["heldout_score"]
                out[f"{base}.tuned_temperature"] = m["tuned"]["temperature"]
    return out


def report(results: dict[str, Any]) -> list[str]:
    """report.md lines: one headline table (T = 1, official tie rule), then each task's groups."""
    reading = results["tasks"].get("reading")
    tasks = {n: r for n, r in results["tasks"].items() if n != "reading"}
    modes = sorted({m for r in tasks.values() for m in r["modes"]}, key=["causal", "mntp", "fused"].index)
    lines = [f"## BabyLM zero-shot suite ({results['split']}_eval)", "",
             f"Data: `{results['data_dir']}`. Accuracy % (mean over UIDs; a tie counts as right, as in the "
             "official pipeline; ties-wrong in brackets) or Spearman's rho (WUG), at T = 1. "
             f"Tuned: T chosen on every {results['tune_every']}-th item of each UID, scored on the other items.", "",
             "| task | items | " + " | ".join(f"{m} T=1" for m in modes) + " | " +
             " | ".join(f"{m} tuned (T)" for m in modes) + " |",
             "|---|---|" + "---|" * (2 * len(modes))]
    for name, r in tasks.items():
        cells = []
        for m in modes:
            t1 = r["modes"][m]["t1"]
            if t1 is None:
                cells.append("-")
            elif r["metric"] == "spearman":
                cells.append(f"{t1['score']:.3f}")
            else:
                cells.append(f"{t1['score']:.2f} ({t1['strict_score']:.2f})")
        for m in modes:
            tuned = r["modes"][m].get("tuned")
            fmt = "{:.3f}" if r["metric"] == "spearman" else "{:.2f}"
            cells.append("-" if tuned is None else f"{fmt.format(tuned['heldout_score'])} ({tuned['temperature']:g})")
        lines.append(f"| {name} | {r['num_items']} | " + " | ".join(cells) + " |")
    for name, r in tasks.items():
        first = next(iter(r["modes"].values()))["t1"]
        if first is None or not first["groups"]:
            continue
        for key in first["groups"]:
            values = sorted({v for m in modes for v in (r["modes"][m]["t1"] or {"groups": {}})["groups"].get(key, {})})
            if key != "UID" and len(values) < 2:
                continue
            lines += ["", f"### {name}: accuracy % by {key} (T = 1)", "",
                      f"| {key} | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
            for v in values:
                lines.append(f"| {v} | " + " | ".join(
                    f"{r['modes'][m]['t1']['groups'][key][v]:.2f}" for m in modes) + " |")
    if reading is not None:
        lines += ["", "### reading: surprisal as a predictor of reading measures (T = 1)", "",
                  f"{reading['num_items']} words. Gain in R^2 from adding surprisal, as % of the possible gain "
                  "(the official scores).", "",
                  "| mode | eye tracking | self-paced reading (spillover) |", "|---|---|---|"]
        for mode, m in reading["modes"].items():
            lines.append(f"| {mode} | {m['eye_tracking']:.2f} | {m['self_paced']:.2f} |")
    if results.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{n} ({why})" for n, why in results["skipped"].items())]
    lines.append("")
    return lines


def _data(cfg) -> Path | None:
    return suite_root(cfg.babylm_dir, cfg.babylm_split) if cfg.babylm_dir else None


def _run(model, tokenizer, cfg, progress=None) -> dict[str, Any]:
    return evaluate_suite(model, tokenizer, cfg, progress=progress)


def _milestone(cfg) -> dict[str, Any]:
    """A milestone model is scored on fast_eval when the folder has it (the official fast suite)."""
    return {"babylm_split": "fast"} if cfg.babylm_dir and (Path(cfg.babylm_dir) / "fast_eval").is_dir() else {}


_WUG = "{task:wug_adj|wug_past}"  # a Spearman correlation; every other subtask an accuracy in %

# The BabyLM 2025 zero-shot suite: every official task found in eval.babylm_dir.
TASK = Task(
    name="babylm", section="", locations=("babylm_dir",), data=_data, run=_run, summary=summary, report=report,
    zero_shot=True, milestone=_milestone,
    metrics=(Metric("babylm.reading.{mode}.eye_tracking", "percent"),
             Metric("babylm.reading.{mode}.self_paced", "percent"),
             Metric(f"babylm.{_WUG}.{{mode}}.t1", "rho", curve=True),
             Metric("babylm.{task}.{mode}.t1", "percent", curve=True),
             Metric("babylm.{task}.{mode}.t1_strict", "percent"),
             Metric(f"babylm.{_WUG}.{{mode}}.tuned", "rho"),
             Metric("babylm.{task}.{mode}.tuned", "percent"),
             Metric("babylm.{task}.{mode}.tuned_temperature", "temperature")),
)
