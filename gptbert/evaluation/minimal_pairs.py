"""The ``blimp`` evaluation task: BLiMP-format minimal pairs (recipe §6).

A pair is right when the good sentence scores strictly higher than the bad one (recipe §6). Accuracy is
computed per paradigm (UID); a phenomenon's (linguistics_term) and a field's accuracy are the mean
of their paradigms' accuracies, and the headline number is the macro-average over paradigms. Every
scoring mode (causal, mntp, fused) is reported at every temperature of the sweep, with the best T
(the paper's protocol: it picks T on the same data; ties go to the T closest to 1) and T=1 for an
honest comparison.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common.artifacts import tree_digest
from common.jsonl import iter_objects

from .registry import Metric, Task

REQUIRED_FIELDS = ("sentence_good", "sentence_bad", "UID", "linguistics_term", "field")


class BlimpFormatError(ValueError):
    """A BLiMP file that cannot be read; the message names file:line and what was expected."""


@dataclass(frozen=True)
class MinimalPair:
    """One BLiMP pair: the good and the bad sentence, with paradigm, phenomenon, field and source line."""

    good: str
    bad: str
    uid: str  # paradigm
    phenomenon: str  # linguistics_term
    field: str
    source: str  # "file.jsonl:line", for error messages


def load_blimp(folder: str | Path, max_pairs_per_paradigm: int | None = None) -> list[MinimalPair]:
    """Read every `*.jsonl` file of `folder` (sorted by name); keep at most N pairs per paradigm."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"BLiMP folder not found: {folder}")
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise BlimpFormatError(f"{folder}: no *.jsonl files (expected one BLiMP paradigm per file)")
    pairs: list[MinimalPair] = []
    per_uid: dict[str, int] = defaultdict(int)
    for path in files:
        for where, lineno, item in iter_objects(path, BlimpFormatError):
            for name in REQUIRED_FIELDS:
                if name not in item:
                    raise BlimpFormatError(f"{where}: missing field '{name}' (required: {', '.join(REQUIRED_FIELDS)})")
                if not isinstance(item[name], str):
                    raise BlimpFormatError(f"{where}: field '{name}' must be a string, got {item[name]!r}")
            for name in ("UID", "sentence_good", "sentence_bad"):
                if not item[name].strip():
                    raise BlimpFormatError(f"{where}: field '{name}' is empty")
            uid = item["UID"]
            if max_pairs_per_paradigm is not None and per_uid[uid] >= max_pairs_per_paradigm:
                continue
            per_uid[uid] += 1
            pairs.append(MinimalPair(item["sentence_good"], item["sentence_bad"], uid,
                                     item["linguistics_term"], item["field"], f"{path.name}:{lineno}"))
    if not pairs:
        raise BlimpFormatError(f"{folder}: the jsonl files hold no minimal pairs")
    return pairs


def _group_mean(keys: Sequence[str], values: np.ndarray) -> dict[str, np.ndarray]:
    groups: dict[str, list[np.ndarray]] = defaultdict(list)
    for k, v in zip(keys, values):
        groups[k].append(v)
    return {k: np.mean(np.stack(v), axis=0) for k, v in sorted(groups.items())}


def blimp_accuracy(pairs: Sequence[MinimalPair], good: np.ndarray, bad: np.ndarray,
                   temperatures: Sequence[float]) -> dict[str, Any]:
    """Accuracies of one scoring mode. good/bad: (num_pairs, num_temperatures) sentence scores."""
    good, bad = np.asarray(good, dtype=np.float64), np.asarray(bad, dtype=np.float64)
    if good.shape != (len(pairs), len(temperatures)) or bad.shape != good.shape:
        raise ValueError(f"scores must have shape ({len(pairs)}, {len(temperatures)}), "
                         f"got {good.shape} and {bad.shape}")
    correct = (good > bad).astype(np.float64)  # a tie is not a preference for the good sentence

    by_uid: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        by_uid[p.uid].append(i)
    uids = sorted(by_uid)
    paradigm_acc = np.stack([correct[by_uid[u]].mean(axis=0) for u in uids])  # (P, nT)
    # A paradigm's phenomenon and field are those of its first pair.
    phenomenon = [pairs[by_uid[u][0]].phenomenon for u in uids]
    field = [pairs[by_uid[u][0]].field for u in uids]
    phenomenon_acc = _group_mean(phenomenon, paradigm_acc)
    field_acc = _group_mean(field, paradigm_acc)
    macro = paradigm_acc.mean(axis=0)  # (nT,)

    def at(k: int) -> dict[str, Any]:
        return {
            "temperature": float(temperatures[k]),
            "accuracy": float(macro[k]),
            "paradigms": {u: float(paradigm_acc[j, k]) for j, u in enumerate(uids)},
            "phenomena": {name: float(acc[k]) for name, acc in phenomenon_acc.items()},
            "fields": {name: float(acc[k]) for name, acc in field_acc.items()},
        }

    # Among temperatures that tie for the best accuracy, the one closest to T=1 (plain scoring).
    tied = np.flatnonzero(macro == macro.max())
    best = int(tied[np.argmin([abs(temperatures[k] - 1.0) for k in tied])])
    t1 = next((k for k, t in enumerate(temperatures) if abs(t - 1.0) < 1e-9), None)
    return {
        "macro_accuracy": [float(a) for a in macro],  # aligned with the temperature list
        "best": at(best),
        "t1": at(t1) if t1 is not None else None,
        "pairs_per_paradigm": {u: len(by_uid[u]) for u in uids},
    }


def evaluate_blimp(model, tokenizer, cfg, blimp_dir: str | Path | None = None, progress=None) -> dict[str, Any]:
    """Score every pair of the BLiMP folder in every configured mode and temperature.

    cfg: an EvalConfig. Each distinct sentence is scored once, in one batched pass over all files.
    ``model`` is a GPTBERT, or an ``NGramLM`` (gptbert.ngram): a count baseline, scored as one mode
    ``ngram`` at T = 1.
    """
    from gptbert.ngram import NGramLM
    from gptbert.scoring import score_sentences

    folder = Path(blimp_dir or cfg.blimp_dir)
    pairs = load_blimp(folder, cfg.max_pairs_per_paradigm)
    index: dict[str, int] = {}
    for p in pairs:
        index.setdefault(p.good, len(index))
        index.setdefault(p.bad, len(index))
    if isinstance(model, NGramLM):
        mode_names, temperatures = [f"{model.order}-gram"], [1.0]
        scores = {mode_names[0]: model.score_sentences(tokenizer, list(index))[:, None]}
    else:
        mode_names, temperatures = list(cfg.modes), list(cfg.temperatures)
        scores = score_sentences(model, tokenizer, list(index), modes=mode_names, temperatures=temperatures,
                                 max_tokens=cfg.max_tokens, progress=progress)
    good_idx = np.array([index[p.good] for p in pairs])
    bad_idx = np.array([index[p.bad] for p in pairs])
    modes = {m: blimp_accuracy(pairs, scores[m][good_idx], scores[m][bad_idx], temperatures)
             for m in mode_names}
    return {
        "data_dir": str(folder),
        "data_digest": tree_digest(folder),
        "num_pairs": len(pairs),
        "num_paradigms": len({p.uid for p in pairs}),
        "temperatures": [float(t) for t in temperatures],
        "modes": modes,
    }


def report_section(results: dict[str, Any]) -> list[str]:
    """report.md lines: headline table, then per-field, phenomenon and paradigm accuracies."""
    modes = results["modes"]
    lines = [f"## BLiMP ({results['num_pairs']} pairs, {results['num_paradigms']} paradigms)", "",
             f"Data: `{results['data_dir']}` (sha256 {results['data_digest'][:12]})", "",
             "Macro-average accuracy over paradigms (%). Best T is chosen on this data, as in the paper.",
             "", "| mode | best T | accuracy at best T | accuracy at T=1 |", "|---|---|---|---|"]
    for m, r in modes.items():
        t1 = r["t1"]["accuracy"] if r["t1"] else None
        lines.append(f"| {m} | {r['best']['temperature']:g} | {_pct(r['best']['accuracy'])} | {_pct(t1)} |")
    for title, key in (("field", "fields"), ("phenomenon", "phenomena"), ("paradigm", "paradigms")):
        names = sorted({n for r in modes.values() for n in r["best"][key]})
        lines += ["", f"### Per {title} (accuracy % at each mode's best T)", "",
                  f"| {title} | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
        for n in names:
            lines.append(f"| {n} | " + " | ".join(_pct(r["best"][key].get(n)) for r in modes.values()) + " |")
    lines.append("")
    return lines


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def summary(results: dict[str, Any]) -> dict[str, float]:
    """``blimp.{mode}.best_accuracy`` and ``.best_temperature`` per mode, and ``.t1_accuracy`` when T = 1
    was scored."""
    out: dict[str, float] = {}
    for mode, r in results["modes"].items():
        out[f"blimp.{mode}.best_accuracy"] = r["best"]["accuracy"]
        out[f"blimp.{mode}.best_temperature"] = r["best"]["temperature"]
        if r["t1"] is not None:
            out[f"blimp.{mode}.t1_accuracy"] = r["t1"]["accuracy"]
    return out


def _data(cfg) -> Path | None:
    return Path(cfg.blimp_dir) if cfg.blimp_dir else None


def _run(model, tokenizer, cfg, progress=None) -> dict[str, Any]:
    return evaluate_blimp(model, tokenizer, cfg, progress=progress)


# BLiMP (and any folder in its format): a pair is right when the good sentence scores higher.
TASK = Task(
    name="blimp", section="", locations=("blimp_dir",), data=_data, run=_run, summary=summary,
    report=report_section, zero_shot=True,
    metrics=(Metric("blimp.{mode}.best_accuracy", "fraction"),
             Metric("blimp.{mode}.best_temperature", "temperature"),
             Metric("blimp.{mode}.t1_accuracy", "fraction", curve=True)),
)
