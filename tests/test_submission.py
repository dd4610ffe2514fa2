"""The BabyLM submission (gptbert/submission/): the official results layout, what each prediction
records, the collated file, counts refused in one line (2025) or left out as None (2026), reuse by
identity, and interop with the official ``collate_preds.py`` (both layouts) and
``calculate_results_from_pred.py``.

The official code is not part of this repository (we write our own); the interop test reads it
from ``GPTBERT_BABYLM_PIPELINE_2025`` / ``GPTBERT_BABYLM_PIPELINE_2026`` (a folder holding
``evaluation_pipeline/``) or from a ``fetch``-ed snapshot of github:babylm/evaluation-pipeline-2025
under ``/work/.mirror`` (``GPTBERT_MIRROR``), and skips cleanly without them. The dev files lack
several tasks; the test builds those in the official formats (``BUILT`` says which) and sets the
official code's count tables to the dev data's counts (it checks sizes of the full release).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.config import EvalConfig, from_dict, to_dict
from gptbert.submission import build_submission, contract as c
from gptbert.submission.collate import SubmissionError, has_nothing_option

BUILT = ("comps", "wug_past", "global_piqa_parallel", "global_piqa_nonparallel", "reading",
         "glue boolq/mnli/multirc/qqp/wsc", "AoA surprisal.json")


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_data(root: Path, shared) -> Path:
    """An evaluation_data/ tree: dev files where they exist, small official-format files for the rest."""
    full, fast = root / "full_eval", root / "fast_eval"
    blimp = shared("blimp-dev")
    for name in ("adjunct_island", "transitive"):
        rows = _lines(blimp / f"{name}.jsonl")
        _jsonl(full / "blimp_filtered" / f"{name}.jsonl", rows[:60])
        _jsonl(fast / "blimp_fast" / f"{name}.jsonl", rows[:20])
    dev = shared("babylm-eval-dev", "full_eval")
    for folder, fast_folder, name, n_full, n_fast in (
            ("supplement_filtered", "supplement_fast", "turn_taking", 40, 10),
            ("ewok_filtered", "ewok_fast", "physical-dynamics", 40, 10)):
        rows = _lines(dev / folder / f"{name}.jsonl")
        _jsonl(full / folder / f"{name}.jsonl", rows[:n_full])
        _jsonl(fast / fast_folder / f"{name}.jsonl", rows[:n_fast])
    et = _lines(dev / "entity_tracking" / "regular.jsonl")
    et = [r for k in range(3) for r in [x for x in et if x["numops"] == k][:8]]  # numops 0..2, file order kept
    _jsonl(full / "entity_tracking" / "regular.jsonl", et)
    _jsonl(fast / "entity_tracking_fast" / "regular.jsonl", et)
    wug = _lines(dev / "wug_adj_nominalization" / "wug_adj_nominalization.jsonl")[:12]
    wug_past = [{"sentences": f"Yesterday I {w}ed.\tYesterday I {w}.", "ratio": r}
                for w, r in (("blick", .9), ("dax", .2), ("fep", .6), ("zorp", .4), ("tam", .8), ("wug", .1))]
    for split in (full, fast):
        _jsonl(split / "wug_adj_nominalization" / "wug_adj_nominalization.jsonl", wug)
        _jsonl(split / "wug_past_tense" / "wug_past_tense.jsonl", wug_past)
        for name, n in (("global_piqa_parallel", 5), ("global_piqa_nonparallel", 4)):
            _jsonl(split / name / "eng_latn.jsonl", [
                {"example_id": f"{name[12:15]}-{i}", "prompt": f"To dry {w} wet clothes,", "solution0": "hang them up.",
                 "solution1": "put them in water.", "label": i % 2} for i, w in enumerate(["the", "my", "his", "her", "our"][:n])])
        _write_reading(split / "reading" / "reading_data.csv")
    _jsonl(full / "comps" / "comps_base.jsonl", [
        {"prefix_acceptable": p, "prefix_unacceptable": q, "property_phrase": "can fly."}
        for p, q in (("A bird", "A stone"), ("A bee", "A chair"), ("An owl", "A cup"))])
    glue = shared("glue-dev")

    def short(rows, n):  # the n shortest pairs, in file order (fine-tuning time grows with length)
        keep = sorted(range(len(rows)), key=lambda i: len(rows[i]["sentence1"]) + len(rows[i]["sentence2"]))[:n]
        return [rows[i] for i in sorted(keep)]

    for task in ("rte", "mrpc"):  # the dev files, cut
        _jsonl(full / "glue_filtered" / f"{task}.train.jsonl", short(_lines(glue / f"{task}.train.jsonl"), 40))
        _jsonl(full / "glue_filtered" / f"{task}.valid.jsonl", short(_lines(glue / f"{task}.valid.jsonl"), 12))
    rte = short(_lines(glue / "rte.train.jsonl"), 48)
    fields = {"boolq": ("question", "passage"), "mnli": ("premise", "hypothesis"), "qqp": ("question1", "question2")}
    for task, (a, b) in fields.items():
        rows = [{a: r["sentence1"], b: r["sentence2"], "label": r["label"] if task != "mnli" else i % 3, "idx": i}
                for i, r in enumerate(rte)]
        _jsonl(full / "glue_filtered" / f"{task}.train.jsonl", rows[:40])
        _jsonl(full / "glue_filtered" / f"{task}.valid.jsonl", rows[40:])
    multirc = [{"paragraph": r["sentence1"], "question": "Is it so?", "answer": r["sentence2"], "label": r["label"]}
               for r in rte]
    wsc = [{"text": r["sentence1"], "span1_text": "it", "span2_text": "they", "label": r["label"]} for r in rte]
    for task, rows in (("multirc", multirc), ("wsc", wsc)):
        _jsonl(full / "glue_filtered" / f"{task}.train.jsonl", rows[:40])
        _jsonl(full / "glue_filtered" / f"{task}.valid.jsonl", rows[40:])
    return root


def _write_reading(path: Path, n: int = 48) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    words = "the cat sat on a warm mat while the dog slept near an open door".split()
    cols = ["item", "word", "prev_item", "prev_word", "RTfirstfix", "RTfirstpass", "RTgopast", "RTrightbound",
            "self_paced_reading_time", "ELAN", "LAN", "N400", "P600", "EPNP", "PNP", "Subtlex_log10", "length",
            "context_length", "prev_length"]
    lines = [",".join(cols)]
    for i in range(n):
        k = i % len(words)
        context = " ".join(words[:k])
        prev = " ".join(words[:k - 1]) if k > 1 else ""
        nums = [f"{v:.3f}" for v in rng.normal(250, 40, 11)]
        lines.append(",".join([context, words[k], prev, words[k - 1] if k > 1 else "", *nums,
                               f"{rng.uniform(1, 6):.3f}", str(len(words[k])), str(k), str(len(words[k - 1]) if k else 0)]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def data_sizes(data: Path, layout: str) -> dict:
    """The counts of the built data, keyed as the official tables (read from the files directly)."""
    full, fast = data / "full_eval", data / "fast_eval"
    count = lambda p: len(_lines(p))  # noqa: E731
    et: dict[str, int] = {}
    for r in _lines(full / "entity_tracking" / "regular.jsonl"):
        if layout == "2026" and has_nothing_option(r["options"]):
            continue
        et[f"regular_{r['numops']}_ops"] = et.get(f"regular_{r['numops']}_ops", 0) + 1
    return {
        "blimp": {p.stem.lower(): count(p) for p in (full / "blimp_filtered").glob("*.jsonl")},
        "blimp_supplement": {"turn_taking": 40}, "ewok": {"physical-dynamics": 40}, "entity_tracking": et,
        "comps": {"base": 3}, "wug_adj": 12, "wug_past": 6, "reading": 48,
        **{t: count(full / "glue_filtered" / f"{t}.valid.jsonl") for t in c.GLUE},
        "fast": {"blimp": 20, "blimp_supplement": 10, "ewok": 10, "entity_tracking": et, "reading": 48,
                 "wug_adj": 12, "wug_past": 6},
        "global_piqa": {"global_piqa_parallel": 5, "global_piqa_nonparallel": 4}, "aoa": 3,
    }


def dev_contract(layout: str, sizes: dict, backend: str = "causal") -> c.Contract:
    """The official contract with the built data's counts."""
    base = c.official(layout, "strict-small", backend)

    def resize(part: c.Part, fast: bool) -> c.Part:
        table = sizes["fast"] if fast else sizes
        key = {"supplement": "blimp_supplement"}.get(part.task, part.task)
        if part.task.startswith("glue:"):
            t = part.task[5:]
            return dataclasses.replace(part, sizes={t: sizes[t]})
        if part.task.startswith("global_piqa"):
            return dataclasses.replace(part, keys=sizes["global_piqa"][part.task])
        if part.task == "aoa":
            return dataclasses.replace(part, each=sizes["aoa"])
        if part.task == "aoa_score":
            return part
        value = table[key]
        return dataclasses.replace(part, sizes=value, each=None) if isinstance(value, dict) else \
            dataclasses.replace(part, each=value, sizes=None)

    return dataclasses.replace(base, full=tuple(resize(p, False) for p in base.full),
                               fast=tuple(resize(p, True) for p in base.fast))


def make_run(root: Path, revisions) -> Path:
    """A run folder: a tiny model (the test tokenizer), trained for a few steps on the dev RTE text,
    and one milestone folder per revision (hard links of the same weights)."""
    from common.config import preset
    from gptbert.io import save_model_dir
    from test_scoring import make_model, make_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    tok.save(str(root / "tokenizer.json"))
    model = make_model(dtype=torch.float32)
    save_model_dir(root / "model", model, preset("tiny").model, root / "tokenizer.json", {"steps": 0})
    for k, name in enumerate(revisions):
        folder = root / "milestones" / name
        folder.mkdir(parents=True)
        for f in ("model.safetensors", "config.json", "tokenizer.json"):
            os.link(root / "model" / f, folder / f)
        (folder / "training.json").write_text(json.dumps({"milestone": name, "milestone_words": (k + 1) * 10**6}))
    return root


def small_cfg(**changes) -> EvalConfig:
    raw = to_dict(EvalConfig())
    raw["finetune"] = {**raw["finetune"], "max_train_examples": 64}
    return from_dict(EvalConfig, {**raw, **changes})


# ----------------------------------------------------------------------------- unit tests

def test_official_contract_counts_and_paths():
    a, b = c.official("2025", "strict-small", "causal"), c.official("2026", "strict", "mntp")
    assert len(a.revisions) == 19 and a.revisions[-1] == "chck_100M" and len(b.revisions) == 28
    assert sum(c.BLIMP.values()) == 59875 and len(c.BLIMP) == 67
    assert sum(c.ENTITY_2025.values()) == 9483 and sum(c.ENTITY_2026.values()) == 6780
    keys = [p.collated for p in b.full]
    assert "wug_adj" not in keys and keys.index("global_piqa_parallel") < keys.index("reading")
    assert [p.collated for p in a.full][:8] == ["blimp", "blimp_supplement", "ewok", "entity_tracking", "wug_adj",
                                                "wug_past", "comps", "reading"]
    assert b.output_name == "all_full_preds_and_fast_scores_mntp.json"
    with pytest.raises(ValueError, match="submission layout '2024': expected one of 2025, 2026"):
        c.official("2024", "strict", "causal")


def test_wrong_counts_stop_2025_in_one_line_and_are_none_in_2026(tmp_path, shared_data):
    data = build_data(tmp_path / "data", shared_data)
    run = make_run(tmp_path / "run", [])
    full = data / "full_eval"
    with pytest.raises(SubmissionError) as err:  # the official counts: the dev files are smaller
        build_submission(run, tmp_path / "a", data, layout="2025", cfg=small_cfg())
    assert str(err.value) == f"{full / 'blimp_filtered'}: adjunct_island has 60 items, the official submission expects 928"
    contract = dev_contract("2025", data_sizes(data, "2025"))
    with pytest.raises(SubmissionError, match=r"^zero_shot/causal/AoA_word/surprisal.json: gptbert does not score AoA "
                                              r"\(give --aoa DIR\); the 2025 submission needs it$"):
        build_submission(run, tmp_path / "b", data, cfg=small_cfg(), contract=contract)
    (tmp_path / "aoa").mkdir()
    with pytest.raises(SubmissionError, match=r"milestones/chck_1M: missing; the 2025 strict-small submission needs "
                                              r"all 19 revisions \(chck_1M .. chck_100M\)$"):
        build_submission(run, tmp_path / "b", data, cfg=small_cfg(), contract=contract, aoa_dir=tmp_path / "aoa")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before anything is written
    # 2026 with the official counts: every wrongly sized task is None (as the official code writes it) and listed.
    record = build_submission(run, tmp_path / "c", data, layout="2026", name="tiny", cfg=small_cfg())
    none = record["none"]
    assert none["main/zero_shot/causal/blimp/blimp_filtered/predictions.json"] == \
        "adjunct_island has 60 items, the official submission expects 928"
    assert none["main/zero_shot/causal/global_piqa_parallel/global_piqa_parallel/predictions.json"] == \
        "5 items, the official submission expects 103"
    assert none["main/zero_shot/causal/AoA_word/surprisal.json"] == "gptbert does not score AoA (give --aoa DIR)"
    assert none["main/finetune/rte/predictions.json"] == "rte has 12 items, the official submission expects 139"
    assert len([k for k in none if k.startswith("chck_")]) == 19
    collated = json.loads((tmp_path / "c" / "results" / "tiny" / "all_full_preds_and_fast_scores_causal.json").read_text())
    assert collated["blimp"] is None and collated["aoa"] is None and collated["glue"] == {}
    assert collated["fast_eval_results"]["reading"] == [None] * 19
    assert list(collated) == ["blimp", "blimp_supplement", "ewok", "entity_tracking_filtered", "comps",
                              "global_piqa_parallel", "global_piqa_nonparallel", "reading", "aoa_surprisals", "aoa",
                              "glue", "fast_eval_results"]


# ----------------------------------------------------------------------------- the official code

MIRROR = Path(os.environ.get("GPTBERT_MIRROR", "/work/.mirror"))


def official_pipeline(layout: str, tmp: Path) -> Path:
    """The folder holding the official ``evaluation_pipeline/`` of ``layout``, or skip."""
    env = os.environ.get(f"GPTBERT_BABYLM_PIPELINE_{layout}")
    if env:
        if not (Path(env) / "evaluation_pipeline" / "collate_preds.py").is_file():
            pytest.skip(f"GPTBERT_BABYLM_PIPELINE_{layout}={env} holds no evaluation_pipeline/collate_preds.py")
        return Path(env)
    git = MIRROR / "babylm+evaluation-pipeline-2025" / "repo"
    if layout != "2025" or not git.is_dir():
        pytest.skip(f"the official {layout} pipeline is not here (set GPTBERT_BABYLM_PIPELINE_{layout})")
    out = tmp / "official"
    for name in ("collate_preds.py", "calculate_results_from_pred.py", "utils.py", "__init__.py"):
        text = subprocess.run(["git", "--git-dir", str(git), "show", f"HEAD:evaluation_pipeline/{name}"],
                              check=True, capture_output=True, text=True).stdout
        (out / "evaluation_pipeline").mkdir(parents=True, exist_ok=True)
        (out / "evaluation_pipeline" / name).write_text(text)
    return out


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def set_official_counts(module, sizes: dict, layout: str) -> None:
    """The official count tables set to the built data's (the rest of the code runs unchanged)."""
    full = {"blimp": sizes["blimp"], "blimp_supplement": sizes["blimp_supplement"], "ewok": sizes["ewok"],
            "entity_tracking": sizes["entity_tracking"], "comps": sizes["comps"], "reading": sizes["reading"],
            **{t: sizes[t] for t in c.GLUE}}
    fast = {k: v for k, v in sizes["fast"].items()}
    if layout == "2025":
        full.update(wug_adj=sizes["wug_adj"], wug_past=sizes["wug_past"])
    else:
        fast = {k: v for k, v in fast.items() if not k.startswith("wug")}
        module.GLOBAL_PIQA_SIZES = dict(sizes["global_piqa"])
    module.FULL_SIZES.update(full)
    module.FAST_SIZES.clear()
    module.FAST_SIZES.update(fast)
    module.AOA_SIZE = sizes["aoa"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["2025", "2026"])
def test_official_collate_accepts_ours_and_scores_equal_evaluate(tmp_path, shared_data, layout):
    pytest.importorskip("statsmodels")
    pytest.importorskip("pandas")
    pytest.importorskip("transformers")  # the official utils.py imports it
    official = official_pipeline(layout, tmp_path)
    data = build_data(tmp_path / "data", shared_data)
    sizes = data_sizes(data, layout)
    contract = dev_contract(layout, sizes)
    run = make_run(tmp_path / "run", contract.revisions)
    aoa = tmp_path / "aoa"
    aoa.mkdir()
    (aoa / "surprisal.json").write_text(json.dumps({"results": [
        {"step": r, "word": w, "surprisal": 1.0 + i} for i, r in enumerate(contract.revisions) for w in ("a", "b", "c")]}))
    (aoa / "aoa_score.json").write_text(json.dumps({"curve_fitness": 0.5}))
    out = tmp_path / "sub"
    record = build_submission(run, out, data, layout=layout, name="tiny", aoa_dir=aoa, cfg=small_cfg(), contract=contract)
    assert record["none"] == {}
    ours = (out / "results" / "tiny" / contract.output_name).read_bytes()

    # The official collation on a copy of our folder.
    copy = tmp_path / "copy"
    shutil.copytree(out / "results", copy)
    (copy / "tiny" / contract.output_name).unlink()
    module = _module(official / "evaluation_pipeline" / "collate_preds.py", f"official_collate_{layout}")
    set_official_counts(module, sizes, layout)
    module.collate_preds(argparse.Namespace(model_path_or_name=Path("tiny"), backend="causal", results_dir=copy,
                                            revision_name="main", fast=True, fast_eval_dir=data / "fast_eval",
                                            track="strict-small", multimodal=False))
    theirs = (copy / "tiny" / contract.output_name).read_bytes()
    a, b = json.loads(ours), json.loads(theirs)
    assert list(a) == list(b)
    for key in a:
        if key != "fast_eval_results":
            assert json.dumps(a[key]) == json.dumps(b[key]), key  # the predictions, byte for byte
    assert list(a["fast_eval_results"]) == list(b["fast_eval_results"])
    assert all(len(per_revision) == 19 for per_revision in b["fast_eval_results"].values())
    assert ours == theirs  # the fast scores too, to the last bit (Spearman's rho, the reading R^2 gains)

    # Task by task, the official scores of the collated predictions equal `gptbert evaluate`'s.
    if layout == "2025":
        sys.path.insert(0, str(official / "evaluation_pipeline"))
        try:
            calc = _module(official / "evaluation_pipeline" / "calculate_results_from_pred.py", "official_calculate")
        finally:
            sys.path.remove(str(official / "evaluation_pipeline"))
        from gptbert.evaluation import evaluate
        from gptbert.io import load_model_dir

        model, tokenizer = load_model_dir(run / "model")
        # `evaluate` fine-tunes the two tasks of the dev files (time); the five built ones are compared
        # with the submission's own scores, which come from the same fine-tuning function.
        cfg = small_cfg(tasks=["babylm", "glue"], babylm_dir=str(data), modes=["causal"], temperatures=[1.0],
                        finetune={**to_dict(small_cfg().finetune), "recipe": "babylm", "tasks": ["mrpc", "rte"],
                                  "data_dir": str(data / "full_eval" / "glue_filtered")})
        results = evaluate(model, tokenizer, cfg)["tasks"]
        suite = results["babylm"]["tasks"]
        t1 = {t: suite[t]["modes"]["causal"]["t1"]["score"] for t in suite if t != "reading"}
        fe = data / "full_eval"
        theirs_scores = {
            "blimp": calc._calculate_blimp_results(a["blimp"], fe / "blimp_filtered"),
            "supplement": calc._calculate_blimp_results(a["blimp_supplement"], fe / "supplement_filtered"),
            "ewok": calc._calculate_ewok_results(a["ewok"], fe / "ewok_filtered"),
            "entity_tracking": calc._calculate_entity_tracking_results(a["entity_tracking"], fe / "entity_tracking"),
            "comps": calc._calculate_comps_results(a["comps"], fe / "comps"),
        }
        rows = []
        for task, score in theirs_scores.items():
            rows.append((task, score, t1[task]))
            assert score == pytest.approx(t1[task], abs=1e-9), task
        for task in ("wug_adj", "wug_past"):
            score = calc._calculate_wug_results({task: a[task][task]}, fe / ("wug_adj_nominalization" if task == "wug_adj"
                                                                               else "wug_past_tense"))
            rows.append((task, score, 100 * t1[task]))
            assert score == pytest.approx(100 * t1[task], abs=1e-9), task
        spr, rt = calc._calculate_reading_results(a["reading"], fe / "reading" / "reading_data.csv")
        ours_reading = suite["reading"]["modes"]["causal"]
        rows += [("reading.self_paced", spr, ours_reading["self_paced"]), ("reading.eye_tracking", rt, ours_reading["eye_tracking"])]
        assert spr == pytest.approx(ours_reading["self_paced"], abs=1e-8)
        assert rt == pytest.approx(ours_reading["eye_tracking"], abs=1e-8)
        for task in c.GLUE:
            score = calc._calculate_glue_results({task: a["glue"][task]}, fe / "glue_filtered")
            ours_glue = (100 * results["glue"][task]["best"]["accuracy"] if task in results["glue"]
                         else record["stats"][f"submission.glue.{task}"])
            rows.append((f"glue.{task}", score, ours_glue))
            assert score == pytest.approx(ours_glue, abs=1e-9), task
        assert record["stats"]["submission.glue.rte"] == 100 * results["glue"]["rte"]["best"]["accuracy"]
        print("| task | official calculate_results_from_pred | gptbert evaluate |\n|---|---|---|")
        for task, x, y in rows:
            print(f"| {task} | {x:.6f} | {y:.6f} |")


# ----------------------------------------------------------------------------- Global PIQA, the stage

def test_global_piqa_task_reads_scores_and_names_bad_lines(tmp_path):
    from gptbert.evaluation import evaluate, global_piqa
    from gptbert.evaluation.babylm import BabyLMFormatError, score_items, task_metrics
    from gptbert.io import load_model_dir

    path = tmp_path / "full_eval" / "global_piqa_parallel" / "eng_latn.jsonl"
    _jsonl(path, [{"example_id": "a", "prompt": "To open a jar,", "solution0": "twist the lid.", "solution1": "eat it.",
                   "label": 1},
                  {"example_id": "b", "prompt": "To cool tea,", "solution0": "wait.", "solution1": "boil it.",
                   "solution2": "burn it.", "label": 0}])
    ids, items, orders = global_piqa.load_items(path)
    assert ids == ["a", "b"] and orders == [[1, 0], [0, 1, 2]]
    assert items[0].sentences == ("To open a jar, eat it.", "To open a jar, twist the lid.")
    assert items[0].completions == (" eat it.", " twist the lid.") and items[0].uid == "global_piqa_parallel"
    run = make_run(tmp_path / "run", [])
    model, tok = load_model_dir(run / "model")
    cfg = small_cfg(tasks=["global_piqa"], babylm_dir=str(tmp_path), modes=["causal", "mntp"])
    results = evaluate(model, tok, cfg)["tasks"]["global_piqa"]
    assert results["skipped"] == {"global_piqa_nonparallel": "not found"}
    scores = score_items(model, tok, items, ["mntp"], [1.0])["mntp"][:, :, 0]
    assert results["sets"]["global_piqa_parallel"]["modes"]["mntp"]["score"] == task_metrics("blimp", items, scores)["score"]
    _jsonl(path, [{"example_id": "a", "prompt": "p", "solution0": "x", "solution1": "y", "label": 2}])
    with pytest.raises(BabyLMFormatError, match=r"eng_latn\.jsonl:1: field 'label' must be a solution index 0\.\.1, got 2"):
        global_piqa.load_items(path)


def test_pipeline_stage_is_cached_by_identity(tmp_path, shared_data):
    """flows.stages.submission: the same run, data and settings are a cached stage folder; another
    layout is another folder. (The official counts: on the dev files every task is None.)"""
    from common.config import PipelineConfig
    from flows import stages

    data = build_data(tmp_path / "data", shared_data)
    shutil.rmtree(data / "full_eval" / "glue_filtered")  # nothing to fine-tune: the test stays fast
    run = make_run(tmp_path / "run", ["chck_1M"])
    raw = to_dict(PipelineConfig())
    raw.update(workdir=str(tmp_path / "work"), submission={**raw["submission"], "data_dir": str(data), "name": "tiny"})
    cfg = from_dict(PipelineConfig, raw)
    model = stages.Artifact("pretrain", str(run), "x" * 64, "y" * 64)
    first = stages.submission(cfg, model)
    again = stages.submission(cfg, model)
    assert not first.cached and again.cached and again.path == first.path
    summary = json.loads((Path(first.path) / "summary.json").read_text())
    assert summary["layout"] == "2026" and "chck_2M" in summary["none"]
    assert (Path(first.path) / summary["file"]).is_file()
    raw["submission"]["layout"] = "2025"
    with pytest.raises(SubmissionError, match="expects 928"):
        stages.submission(from_dict(PipelineConfig, raw), model)


@pytest.mark.slow
def test_submission_task_logs_the_file_and_the_scores_to_mlflow(prefect_harness, tmp_path, shared_data):
    """The Prefect task: a child MLflow run with the collated file as an artifact and the per-task
    scores as metrics (Global PIQA at its official sizes, so something is scored)."""
    from prefect import flow

    from common.config import PipelineConfig
    from flows import stages
    from flows.pipeline import submission_task
    from flows.tracking import client_for

    data = build_data(tmp_path / "data", shared_data)
    shutil.rmtree(data / "full_eval" / "glue_filtered")
    for split in ("full_eval", "fast_eval"):
        for name, n in c.GLOBAL_PIQA.items():
            _jsonl(data / split / name / "eng_latn.jsonl", [
                {"example_id": f"{name}-{i}", "prompt": f"To dry clothes number {i},", "solution0": "hang them up.",
                 "solution1": "put them in water.", "label": i % 2} for i in range(n)])
    run = make_run(tmp_path / "run", [])
    raw = to_dict(PipelineConfig())
    raw.update(workdir=str(tmp_path / "work"), submission={**raw["submission"], "data_dir": str(data), "name": "tiny"})
    raw["tracking"] = {**raw["tracking"], "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "sub-test"}
    cfg = from_dict(PipelineConfig, raw)

    @flow
    def one_stage():
        return submission_task(cfg, stages.Artifact("pretrain", str(run), "x" * 64, "y" * 64))

    artifact = one_stage()
    client = client_for(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sub-test").experiment_id])
    (child,) = [r for r in runs if r.data.tags.get("gptbert.stage") == "submission"]
    metrics = child.data.metrics
    assert set(artifact.record["stats"]) == {"submission.global_piqa_parallel", "submission.global_piqa_nonparallel"}
    for name, value in artifact.record["stats"].items():
        assert metrics[f"stage.{name}"] == pytest.approx(value)
    logged = [f.path for f in client.list_artifacts(child.info.run_id, "submission")]
    assert "submission/all_full_preds_and_fast_scores_causal.json" in logged
