"""The collated submission file, from a results folder of per-task ``predictions.json`` files.

``collate`` reads what ``contract.Contract`` names under ``<results>/<model>/`` and writes what the
official ``collate_preds.py --fast`` writes for the same files: every final-model file under its
collated key (GLUE's tasks merged under ``glue``), then ``fast_eval_results``: per task, one entry
per milestone revision, the score the official code computes from the predictions against the
fast_eval gold (accuracy as a fraction per subset, WUG Spearman's rho, reading's R^2 gains). The
2025 layout refuses a missing or wrongly sized file in one line; 2026 writes None for it and says
why (the official code's warning).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import numpy as np

from common.artifacts import atomic_write_text

from .contract import AOA_WORDS, Contract, Part, size_problem


class SubmissionError(ValueError):
    """A submission that cannot be made as the official layout requires; names the file and the
    count expected."""


def read_predictions(path: Path) -> dict[str, Any]:
    """A ``predictions.json`` as the official code reads it (``json.load``: NaN allowed)."""
    with path.open("r") as f:
        return json.load(f)


def counts(predictions: dict[str, Any]) -> dict[str, int]:
    """{key: number of predictions} of a predictions file."""
    return {key: len(value["predictions"]) for key, value in predictions.items()}


def _aoa_problem(results: dict[str, Any], revisions: tuple[str, ...], words: int) -> Optional[str]:
    steps = [r.get("step") for r in results.get("results", [])]
    if set(steps) != set(revisions):
        return f"holds revisions {sorted(set(map(str, steps)))[:4]}..., expected {len(revisions)}: {', '.join(revisions[:3])}, ..."
    per = defaultdict(int)
    for s in steps:
        per[s] += 1
    bad = next((r for r in revisions if per[r] != words), None)
    return None if bad is None else f"{bad} has {per[bad]} words, expected {words}"


def load_part(folder: Path, part: Part, contract: Contract, notes: dict[str, str]) -> Optional[dict[str, Any]]:
    """The part's predictions under revision ``folder``, checked; a problem raises a
    SubmissionError (2025) or is noted in ``notes`` and gives None (2026)."""
    path = folder / part.path
    problem = None
    if not path.is_file():
        problem = "missing"
    else:
        results = read_predictions(path)
        if part.task == "aoa":
            problem = _aoa_problem(results, contract.revisions, part.each or AOA_WORDS)
        elif part.task != "aoa_score":
            problem = size_problem(part, counts(results))
    if problem is None:
        return results
    if contract.layout == "2025":
        raise SubmissionError(f"{path}: {problem} (the {contract.layout} submission needs every file at its "
                              "official size)")
    notes[str(path.relative_to(folder.parent))] = problem
    return None


# ----------------------------------------------------------------------------- fast scores

def _lines(path: Path) -> list[dict[str, Any]]:
    with path.open("r") as f:
        return [json.loads(line) for line in f.readlines()]


def _accuracy(pairs) -> float:
    correct = total = 0
    for pred, target in pairs:
        total += 1
        correct += (pred.strip() if isinstance(pred, str) else pred) == (target.strip() if isinstance(target, str) else target)
    return correct / total


def target_scores(predictions: dict[str, Any], folder: Path, task: str, layout: str) -> dict[str, float]:
    """BLiMP, its supplement and EWoK: per subset file, the fraction of predictions equal to the
    gold (``sentence_good``; EWoK: ``Target1``, 2026 ``Context1 + " " + Target1``)."""
    out = {}
    for key, value in predictions.items():
        rows = _lines((folder / key).with_suffix(".jsonl"))
        if task != "ewok":
            gold = [r["sentence_good"] for r in rows]
        elif layout == "2025":
            gold = [r["Target1"] for r in rows]
        else:
            gold = [" ".join([r["Context1"], r["Target1"]]) for r in rows]
        out[key] = _accuracy((p["pred"], g) for p, g in zip(value["predictions"], gold))
    return out


def has_nothing_option(options) -> bool:
    """The 2026 filter of entity tracking: an item with "nothing" in any option is left out."""
    return any("nothing" in option for option in options)


def entity_scores(predictions: dict[str, Any], folder: Path, layout: str) -> dict[str, float]:
    """Entity tracking (fast_eval: ``regular.jsonl``): per ``regular_<numops>_ops``, the fraction
    of predictions equal to the first option."""
    by = defaultdict(list)
    for row in _lines(folder / "regular.jsonl"):
        if layout == "2026" and has_nothing_option(row["options"]):
            continue
        by[f"regular_{row['numops']}_ops"].append(row["options"][0])
    return {key: _accuracy((p["pred"], g) for p, g in zip(value["predictions"], by[key]))
            for key, value in predictions.items()}


def _average_ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="mergesort")
    _, first, n = np.unique(v[order], return_index=True, return_counts=True)
    r = np.empty(len(v))
    r[order] = np.repeat(first + (n + 1) / 2.0, n)
    return r


def rank_correlation(x, y) -> float:
    """Spearman's rho as the official code gets it (scipy.stats.spearmanr): the correlation matrix
    (``np.corrcoef``) of the two columns of average ranks, to the last bit."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if (a == a[0]).all() or (b == b[0]).all() or np.isnan(a).any() or np.isnan(b).any():
        return math.nan
    return float(np.corrcoef(np.column_stack([_average_ranks(a), _average_ranks(b)]), rowvar=False)[1, 0])


def wug_scores(predictions: dict[str, Any], folder: Path) -> dict[str, float]:
    """WUG: Spearman's rho of each prediction's ``prob`` against the human ``ratio``."""
    rows = _lines(folder / f"{folder.name}.jsonl")
    return {key: rank_correlation([p["prob"] for p in value["predictions"]],
                                  [r["ratio"] for r in rows[:len(value["predictions"])]])
            for key, value in predictions.items()}


def piqa_scores(predictions: dict[str, Any], path: Path, task: str) -> dict[str, float]:
    """Global PIQA: the fraction of examples whose prediction is the gold ``solution<label>``."""
    rows = _lines(path)
    return {task: _accuracy((predictions[r["example_id"]]["predictions"][0]["pred"], r[f"solution{r['label']}"])
                            for r in rows)}


def _pinv_r2(y: np.ndarray, x: np.ndarray) -> float:
    """Centred R^2 of least squares by the SVD pseudo-inverse, the arithmetic of the official
    code's statsmodels OLS (``method="pinv"``), so the collated value matches to the last bit."""
    u, sv, vt = np.linalg.svd(x, False)
    keep = sv > 1e-15 * sv.max()
    inv = np.where(keep, 1.0 / np.where(keep, sv, 1.0), 0.0)
    beta = np.dot(np.dot(vt.T, inv[:, None] * u.T), y)
    resid = y - np.dot(x, beta)
    ones = np.ones_like(y)  # OLS is WLS with unit weights there: the weighted mean and sum
    return 1 - np.dot(resid, resid) / np.sum(ones * (y - np.average(y, weights=ones)) ** 2)


def _r2(cols: dict[str, np.ndarray], variable: str, mains: list[str]) -> float:
    """R^2 of ``variable ~ mains + their pairwise products (+ pred)`` on the rows where every named
    column is known; the design's columns in the official formula's order (intercept, main effects,
    products, ``pred`` last: the order changes the last bits)."""
    used = [variable, *mains]
    keep = np.all([~np.isnan(cols[c]) for c in used], axis=0)
    base = [m for m in mains if m != "pred"]
    pairs = [(a, b) for i, a in enumerate(base) for b in base[i + 1:]]
    design = ([np.ones(int(keep.sum()))] + [cols[m][keep] for m in base] + [cols[a][keep] * cols[b][keep] for a, b in pairs]
              + [cols["pred"][keep]] * ("pred" in mains))
    # Column-major, as the formula library hands the design to statsmodels (the layout moves the SVD's last bits).
    return float(_pinv_r2(cols[variable][keep], np.asfortranarray(np.column_stack(design))))


def reading_scores(predictions: dict[str, Any], csv_path: Path) -> dict[str, float]:
    """Reading: ``rt`` the mean over the four eye-tracking measures and ``spr`` (self-paced, with
    spillover) of the R^2 gain (R2 - R2_base) / (1 - R2_base) from adding the surprisal ``pred``."""
    from gptbert.evaluation import reading

    data = reading.load_reading(csv_path)
    cols = {c: np.asarray(v, dtype=np.float64) for c, v in data.items() if c not in reading.TEXT_COLUMNS}
    rows = predictions["reading"]["predictions"]
    cols["pred"] = np.asarray([r["pred"] for r in rows], dtype=np.float64)
    cols["prev_pred"] = np.asarray([r["prev_pred"] for r in rows], dtype=np.float64)

    def gain(variable: str, mains: list[str]) -> float:
        base, model = _r2(cols, variable, mains), _r2(cols, variable, mains + ["pred"])
        return (model - base) / (1 - base)

    eye = [gain(v, list(reading.PREDICTORS)) for v in reading.EYE_TRACKING]
    return {"spr": gain(reading.SELF_PACED, list(reading.SPILLOVER)), "rt": sum(eye) / len(eye)}


def fast_score(part: Part, predictions: dict[str, Any], fast_dir: Path, layout: str) -> Any:
    """The collated fast score of one part of one revision."""
    folder = fast_dir / part.data
    if part.task in ("blimp", "supplement", "ewok"):
        return target_scores(predictions, folder, part.task, layout)
    if part.task == "entity_tracking":
        return entity_scores(predictions, folder, layout)
    if part.task.startswith("wug"):
        return wug_scores(predictions, folder)
    if part.task.startswith("global_piqa"):
        return piqa_scores(predictions, folder / "eng_latn.jsonl", part.task)
    if part.task == "reading":
        return reading_scores(predictions, folder)
    raise ValueError(f"no fast score for {part.task}")


# ----------------------------------------------------------------------------- the file

def collate(results_dir: str | Path, model: str, contract: Contract, fast_dir: str | Path) -> tuple[Path, dict[str, str]]:
    """Write ``<results>/<model>/<contract.output_name>``; returns (its path, {file: why it is
    None}) (always empty for 2025, which raises instead)."""
    root = Path(results_dir) / model
    fast_dir = Path(fast_dir)
    notes: dict[str, str] = {}
    full: dict[str, Any] = {}
    for part in contract.full:
        value = load_part(root / "main", part, contract, notes)
        if part.collated == "glue":
            full.setdefault("glue", {})
            if value is not None:
                full["glue"] |= value
        else:
            full[part.collated] = value
    fast: dict[str, list] = {part.collated: [] for part in contract.fast}
    for revision in contract.revisions:
        for part in contract.fast:
            value = load_part(root / revision, part, contract, notes)
            fast[part.collated].append(None if value is None else fast_score(part, value, fast_dir, contract.layout))
    full["fast_eval_results"] = fast
    path = root / contract.output_name
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(full))
    return path, notes


__all__ = ["SubmissionError", "collate", "counts", "entity_scores", "fast_score", "has_nothing_option", "load_part",
           "piqa_scores", "rank_correlation", "read_predictions", "reading_scores", "target_scores",
           "wug_scores"]
