"""The submission stage: a BabyLM leaderboard submission of a model (and its word milestones).

``build_submission(model_or_run, out, ...)`` scores, with gptbert's own scorers, every file the
official submission has (``contract``): the zero-shot suite on ``full_eval`` with the final model,
``fast_eval`` with every ``chck_{N}M`` milestone of the run, the GLUE tasks fine-tuned with the
official hyperparameters (``eval.finetune.recipe: babylm``; predictions of the best epoch on the
valid file, as ``--predict_data`` is the valid file there), reading, and Global PIQA (2026). It
writes them in the official results layout under ``out/results/<name>/`` and collates
``all_full_preds_and_fast_scores_<backend>.json`` beside them (``collate``); ``out/stage.json``
is its record. AoA is not scored by gptbert (it needs the CDI and C4 data): ``aoa_dir`` copies the
official AoA outputs in, else the 2026 file says None (2025 refuses).

Reuse by identity, as every stage: each file is stored with the digest of what makes it (the
model's weights, config and tokenizer; its data; the layout, backend and fine-tuning settings),
listed in ``out/parts.json``; a rerun (another layout, a new milestone, a crash) copies every file
whose digest is unchanged instead of scoring it again, and milestones with equal weights are scored
once. Counts are checked before any scoring: 2025 stops at the first file of the wrong size, in
one line naming the data and the official count; 2026 leaves the task out (None) and lists it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common.artifacts import atomic_write_text, check_output_folder, make_record, staging_dir, tree_digest, write_record
from common.config.base import digest

from . import collate as collation
from .contract import Contract, Part, official, size_problem
from .collate import SubmissionError, has_nothing_option

STAGE = "submission"
RESULTS_DIR = "results"
PARTS_FILE = "parts.json"
SUMMARY_FILE = "summary.json"
MODEL_FILES = ("model.safetensors", "config.json", "tokenizer.json")  # what predictions depend on


def model_identity(folder: str | Path) -> str:
    """Digest of what a model folder's predictions depend on (not its training.json)."""
    return digest({name: tree_digest(Path(folder) / name) for name in MODEL_FILES})


def resolve_model(model_or_run: str | Path) -> tuple[Path, list[tuple[str, Path]]]:
    """(final model folder, [(revision, milestone folder)]) of a run folder or its ``model/``."""
    from gptbert.evaluation import milestone_models

    path = Path(model_or_run)
    model = path / "model" if (path / "model" / "config.json").is_file() else path
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"{path}: neither a model folder nor a run folder with model/ (no config.json)")
    return model, [(name, folder) for name, _, folder in milestone_models(model)]


# ----------------------------------------------------------------------------- predictions

def _by_key(keys: list[str], records: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, record in zip(keys, records):
        entry = out.setdefault(key, {"predictions": []})
        entry["predictions"].append({"id": f"{key}_{len(entry['predictions'])}", **record})
    return out


def _zero_shot_items(part: Part, folder: Path, layout: str):
    from gptbert.evaluation import babylm

    items = babylm.load_subtask(part.task, folder)
    if part.task == "entity_tracking" and layout == "2026":
        items = [it for it in items if not has_nothing_option(it.completions)]
    return items


class PartJob:
    """One predictions file to make: its data is read (and counted) first, then scored."""

    def __init__(self, part: Part, data_root: Path, contract: Contract, finetune_cfg=None):
        self.part, self.contract, self.finetune_cfg = part, contract, finetune_cfg
        self.path = data_root / part.data
        self.items: Any = None

    def available(self) -> bool:
        """Whether the data exists (AoA never: gptbert does not score it)."""
        if self.part.task.startswith("aoa"):
            return False
        if self.part.task.startswith("glue:"):
            task = self.part.task.split(":")[1]
            return all((self.path / f"{task}.{s}.jsonl").is_file() for s in ("train", "valid"))
        if self.part.task.startswith("global_piqa"):
            return (self.path / "eng_latn.jsonl").is_file()
        return self.path.is_file() if self.part.task == "reading" else self.path.is_dir() and any(self.path.glob("*.jsonl"))

    def load(self) -> dict[str, int]:
        """Read the data; {key: items} as the predictions file will count them."""
        from gptbert.evaluation import finetune, global_piqa, reading

        task = self.part.task
        if task.startswith("glue:"):
            name = task.split(":")[1]
            self.items = finetune.load_task_file(self.path / f"{name}.valid.jsonl", task=name)
            return {name: len(self.items)}
        if task.startswith("global_piqa"):
            self.items = global_piqa.load_items(self.path / "eng_latn.jsonl")
            ids = self.items[0]
            return {i: ids.count(i) for i in dict.fromkeys(ids)}
        if task == "reading":
            self.items = reading.load_reading(self.path)
            return {"reading": len(self.items["word"])}
        self.items = _zero_shot_items(self.part, self.path, self.contract.layout)
        n: dict[str, int] = {}
        for item in self.items:
            n[item.uid] = n.get(item.uid, 0) + 1
        return n

    def inputs(self) -> dict[str, Any]:
        """What, beside the model, makes this file (for its digest)."""
        extra = {}
        if self.part.task.startswith("glue:"):
            from common.config import to_dict

            extra = {"finetune": {k: v for k, v in to_dict(self.finetune_cfg).items() if k != "data_dir"},
                     "train": tree_digest(self.path / f"{self.part.task.split(':')[1]}.train.jsonl"),
                     "valid": tree_digest(self.path / f"{self.part.task.split(':')[1]}.valid.jsonl")}
        elif self.part.task.startswith("global_piqa"):
            extra = {"data": tree_digest(self.path / "eng_latn.jsonl")}
        else:
            extra = {"data": tree_digest(self.path)}
        return {"task": self.part.task, "layout": self.contract.layout, "backend": self.contract.backend, **extra}

    def predict(self, model, tokenizer, max_tokens: int) -> tuple[dict[str, Any], float | dict[str, float]]:
        """(the predictions file's content, the task's score as ``gptbert evaluate`` reports it)."""
        from gptbert.evaluation import babylm

        task, mode = self.part.task, self.contract.backend
        if task.startswith("glue:"):
            return self._glue(model, tokenizer)
        if task == "reading":
            return self._reading(model, tokenizer, max_tokens)
        if task.startswith("global_piqa"):
            ids, items, _ = self.items
        else:
            items = self.items
        scores = babylm.score_items(model, tokenizer, items, [mode], [1.0], max_tokens)[mode][:, :, 0]
        chosen = np.argmax(scores, axis=1)  # the first of equal maxima, as torch.max
        metric = babylm.task_metrics("blimp" if task.startswith("global_piqa") else task, items, scores)["score"]
        if task.startswith("global_piqa"):
            return _by_key(ids, [{"pred": it.completions[c]} for it, c in zip(items, chosen)]), metric
        whole = task == "comps" or (task == "ewok" and self.contract.layout == "2026")
        records = [{"pred": (it.sentences if whole else it.completions)[c]} for it, c in zip(items, chosen)]
        if task.startswith("wug"):
            for record, p in zip(records, babylm.first_probability(scores)):
                record["prob"] = float(p)
        return _by_key([it.uid for it in items], records), metric

    def _glue(self, model, tokenizer):
        from gptbert.evaluation import finetune
        from gptbert.scoring import special_ids

        name = self.part.task.split(":")[1]
        settings = finetune.task_settings(name, self.finetune_cfg)
        train = finetune.load_task_file(self.path / f"{name}.train.jsonl", self.finetune_cfg.max_train_examples, task=name)
        tuned, results = finetune.finetune(model, tokenizer, train, self.items, settings)
        encoded = [finetune.encode_example(tokenizer, ex, settings.max_length) for ex in self.items]
        preds = finetune.predict(tuned, encoded, special_ids(tokenizer)["pad"])
        del tuned
        return {name: {"predictions": [{"id": f"{name}_{i}", "pred": int(p)} for i, p in enumerate(preds)]}}, \
            100.0 * results["best"]["accuracy"]

    def _reading(self, model, tokenizer, max_tokens):
        from gptbert.evaluation import reading

        data, mode = self.items, self.contract.backend
        pred = reading.surprisals(model, tokenizer, data["item"], data["word"], mode, max_tokens)
        prev = np.full(len(pred), np.nan)
        idx = [i for i, p in enumerate(data["prev_item"]) if p is not None]
        if idx:
            prev[idx] = reading.surprisals(model, tokenizer, [data["prev_item"][i] for i in idx],
                                           [data["prev_word"][i] or "None" for i in idx], mode, max_tokens)
        preds = {"reading": {"predictions": [{"id": i, "pred": float(p), "prev_pred": float(q)}
                                             for i, (p, q) in enumerate(zip(pred, prev))]}}
        scores = collation.reading_scores(preds, self.path)
        return preds, {"eye_tracking": 100.0 * scores["rt"], "self_paced": 100.0 * scores["spr"]}


# ----------------------------------------------------------------------------- the stage

def _split_root(data_dir: Path, split: str) -> Path:
    root = data_dir / f"{split}_eval"
    if not root.is_dir():
        raise FileNotFoundError(f"{data_dir}: no {split}_eval/ folder (the official evaluation_data layout)")
    return root


def submission_config(contract: Contract, name: str, finetune_cfg, max_tokens: int) -> dict[str, Any]:
    """The config part of the stage's identity."""
    from common.config import to_dict

    return {"layout": contract.layout, "track": contract.track, "backend": contract.backend, "name": name,
            "max_tokens": max_tokens, "finetune": {k: v for k, v in to_dict(finetune_cfg).items() if k != "data_dir"},
            "counts": digest([[p.__dict__ for p in contract.full], [p.__dict__ for p in contract.fast],
                              list(contract.revisions)])}


@dataclass
class Setup:
    """What a submission is made of, resolved before any work: the contract, the model and its
    milestones, the data roots, the fine-tuning settings, and the stage identity's parts."""

    contract: Contract
    model_dir: Path
    milestones: list[tuple[str, Path]]
    name: str
    full_root: Path
    fast_root: Path
    finetune_cfg: Any
    inputs: dict[str, str]
    config: dict[str, Any]


def setup(model_or_run: str | Path, data_dir: str | Path, *, layout: str = "2026", track: str = "strict-small",
          backend: str = "causal", name: str | None = None, aoa_dir: str | Path | None = None, cfg=None,
          contract: Contract | None = None) -> Setup:
    """Resolve a submission's parts (``build_submission``'s arguments); its ``inputs`` and
    ``config`` give the stage identity the flows check their cache with."""
    from common.config import EvalConfig, from_dict, to_dict

    cfg = cfg or EvalConfig()
    contract = contract or official(layout, track, backend)
    data_dir = Path(data_dir)
    model_dir, milestones = resolve_model(model_or_run)
    name = name or (model_dir.parent.name if model_dir.name == "model" else model_dir.name)
    full_root, fast_root = _split_root(data_dir, "full"), _split_root(data_dir, "fast")
    finetune_cfg = from_dict(EvalConfig, {**to_dict(cfg), "finetune": {
        **to_dict(cfg.finetune), "recipe": "babylm", "data_dir": str(full_root / "glue_filtered"), "tasks": []}}).finetune
    inputs = {"model": model_identity(model_dir), "data": tree_digest(data_dir),
              **{f"milestone.{r}": model_identity(f) for r, f in milestones if r in contract.revisions}}
    if aoa_dir is not None:
        inputs["aoa"] = tree_digest(aoa_dir)
    return Setup(contract, model_dir, milestones, name, full_root, fast_root, finetune_cfg, inputs,
                 submission_config(contract, name, finetune_cfg, cfg.max_tokens))


def build_submission(model_or_run: str | Path, out: str | Path, data_dir: str | Path, *, layout: str = "2026",
                     track: str = "strict-small", backend: str = "causal", name: str | None = None,
                     aoa_dir: str | Path | None = None, cfg=None, contract: Contract | None = None,
                     log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """The submission stage (see the module docstring); returns its record, whose ``stats`` are the
    per-task scores and ``none`` the files the 2026 layout leaves out. ``cfg`` is an EvalConfig
    (device, max_tokens, finetune); ``contract`` replaces the official counts (tests on small data)."""
    from common.config import EvalConfig
    from gptbert.evaluation import resolve_eval_device
    from gptbert.io import load_model_dir

    cfg = cfg or EvalConfig()
    device = resolve_eval_device(cfg)
    s = setup(model_or_run, data_dir, layout=layout, track=track, backend=backend, name=name, aoa_dir=aoa_dir,
              cfg=cfg, contract=contract)
    contract, model_dir, milestones, name = s.contract, s.model_dir, s.milestones, s.name
    full_root, fast_root, finetune_cfg, inputs = s.full_root, s.fast_root, s.finetune_cfg, s.inputs
    out = Path(out)
    check_output_folder(out, STAGE)
    old_parts = _read_parts(out)
    revisions = dict(milestones)
    plan: list[tuple[str, Path | None, PartJob]] = []
    none: dict[str, str] = {}
    for revision, folder, parts, root in [("main", model_dir, contract.full, full_root)] + [
            (r, revisions.get(r), contract.fast, fast_root) for r in contract.revisions]:
        if folder is None:
            why = f"no milestone model {revision} in the run (train.word_milestones)"
            if contract.layout == "2025":
                raise SubmissionError(f"{model_dir.parent / 'milestones' / revision}: missing; the 2025 {contract.track} "
                                      f"submission needs all {len(contract.revisions)} revisions "
                                      f"({contract.revisions[0]} .. {contract.revisions[-1]})")
            none[revision] = why
            continue
        for part in parts:
            job = PartJob(part, root, contract, finetune_cfg)
            if not job.available():
                if part.task.startswith("aoa") and aoa_dir is not None:
                    continue  # copied below
                why = "gptbert does not score AoA (give --aoa DIR)" if part.task.startswith("aoa") else f"{job.path} not found"
                if contract.layout == "2025":
                    raise SubmissionError(f"{job.path if not part.task.startswith('aoa') else part.path}: "
                                          f"{why}; the 2025 submission needs it")
                none[f"{revision}/{part.path}"] = why
                continue
            problem = size_problem(part, job.load())
            if problem is not None:
                line = f"{job.path}: {problem}"
                if contract.layout == "2025":
                    raise SubmissionError(line)
                none[f"{revision}/{part.path}"] = problem
                log(f"warning: {line}; left out (None)")
                continue
            plan.append((revision, folder, job))
    stats: dict[str, float] = {}
    parts_index: dict[str, Any] = {}
    loaded: dict[str, Any] = {}
    with staging_dir(out, STAGE) as tmp:
        root = tmp / RESULTS_DIR / name
        for revision, folder, job in plan:
            target = root / revision / job.part.path
            key = digest({"model": model_identity(folder), **job.inputs()})
            rel = str(Path(revision) / job.part.path)
            reused = old_parts.get(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            if reused is not None:
                shutil.copyfile(reused[0], target)
                score = reused[1]
                log(f"reused {rel}")
            else:
                if str(folder) not in loaded:
                    loaded.clear()  # one model on the device at a time
                    loaded[str(folder)] = load_model_dir(folder, device=device)
                model, tokenizer = loaded[str(folder)]
                predictions, score = job.predict(model, tokenizer, cfg.max_tokens)
                with target.open("w") as f:
                    json.dump(predictions, f)  # the official writers' json.dump defaults
                old_parts[key] = (target, score)
                log(f"scored {rel}")
            parts_index[rel] = {"digest": key, "score": score}
            _record_score(stats, revision, job.part, score)
        loaded.clear()
        if aoa_dir is not None:
            for part in contract.full:
                src = Path(aoa_dir) / Path(part.path).name
                if part.task.startswith("aoa") and src.is_file():
                    (root / "main" / part.path).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, root / "main" / part.path)
        _, notes = collation.collate(tmp / RESULTS_DIR, name, contract, fast_root)
        none.update({k: v for k, v in notes.items() if not any(k.startswith(n) for n in none)})
        atomic_write_text(tmp / PARTS_FILE, json.dumps(parts_index, indent=2, sort_keys=True) + "\n")
        summary = {"model": str(model_dir), "name": name, "layout": contract.layout, "track": contract.track,
                   "backend": contract.backend, "file": str(Path(RESULTS_DIR) / name / contract.output_name),
                   "scores": stats, "none": none}
        atomic_write_text(tmp / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        record = make_record(STAGE, inputs, s.config, tmp, RESULTS_DIR, stats)
        record["none"] = none
        write_record(tmp, record)
    return record


def _record_score(stats: dict[str, float], revision: str, part: Part, score) -> None:
    """Scores of the final model only (``submission.<task>``, % as ``gptbert evaluate`` reports)."""
    if revision != "main":
        return
    task = part.task.replace(":", ".")
    if isinstance(score, dict):
        stats.update({f"submission.{task}.{k}": float(v) for k, v in score.items()})
    else:
        stats[f"submission.{task}"] = float(score)


def _read_parts(out: Path) -> dict[str, tuple[Path, Any]]:
    """{part digest: (its file, its score)} of a previous submission in ``out`` (none without one)."""
    index = out / PARTS_FILE
    if not index.is_file() or not (out / "stage.json").is_file():
        return {}
    try:
        listed = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    found = {}
    for rel, entry in listed.items():
        for path in (out / RESULTS_DIR).glob(f"*/{rel}"):
            found[entry["digest"]] = (path, entry["score"])
    return found


__all__ = ["PARTS_FILE", "PartJob", "RESULTS_DIR", "STAGE", "SUMMARY_FILE", "Setup", "SubmissionError", "build_submission",
           "model_identity", "resolve_model", "setup", "submission_config"]
