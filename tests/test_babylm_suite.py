"""The BabyLM 2025 zero-shot suite (gptbert/evaluation/babylm.py): readers of the official formats,
the pipeline's rules (scored completions by character offsets, ties count as right, mean over UIDs,
entity tracking per split, WUG Spearman), the dev-split temperature, and parity with a
re-implementation of the official pipeline's arithmetic on top of `transformers` run on our export.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import from_dict, to_dict
from common.config.eval import EvalConfig
from gptbert.evaluation import babylm
from gptbert.evaluation.babylm import BabyLMFormatError, Item

# A small evaluation_data/ tree with every zero-shot format (sentences: plain English).
FILES = {
    "blimp_filtered/anaphor_agreement.jsonl": [
        {"sentence_good": "The boys liked themselves.", "sentence_bad": "The boys liked himself.",
         "field": "morphology", "UID": "anaphor_number_agreement", "linguistics_term": "anaphor_agreement"},
        {"sentence_good": "The girl saw herself.", "sentence_bad": "The girl saw themselves.",
         "field": "morphology", "UID": "anaphor_number_agreement", "linguistics_term": "anaphor_agreement"}],
    "blimp_filtered/svo.jsonl": [
        {"sentence_good": "The cats sleep.", "sentence_bad": "The cats sleeps.",
         "field": "syntax_semantics", "UID": "svo", "linguistics_term": "agreement"}],
    "supplement_filtered/turn_taking.jsonl": [
        {"sentence_good": "A: Did you go?\nB: Yes, I did.", "sentence_bad": "A: Did she go?\nB: Yes, I did."},
        {"sentence_good": "A: Can you swim?\nB: No, I can't.", "sentence_bad": "A: Can he swim?\nB: No, I can't."}],
    "ewok_filtered/spatial-relations.jsonl": [
        {"Domain": "spatial-relations", "ContextType": "direct", "ContextDiff": "antonym",
         "TargetDiff": "concept swap", "Context1": "The ball is below the cup.", "Context2": "The ball is above the cup.",
         "Target1": "The cup is above the ball.", "Target2": "The cup is below the ball."},
        {"Domain": "spatial-relations", "ContextType": "indirect", "ContextDiff": "antonym",
         "TargetDiff": "concept swap", "Context1": "The box is left of the tree.", "Context2": "The box is right of the tree.",
         "Target1": "The tree is right of the box.", "Target2": "The tree is left of the box."}],
    "ewok_filtered/physical-dynamics.jsonl": [
        {"Domain": "physical-dynamics", "ContextType": "direct", "ContextDiff": "antonym", "TargetDiff": "concept swap",
         "Context1": "The speed is increasing.", "Context2": "The speed is decreasing.",
         "Target1": "The car is accelerating.", "Target2": "The car is slowing down."}],
    "entity_tracking/regular.jsonl": [
        {"sample_id": 1, "numops": 0, "input_prefix": "Box 0 contains the map, Box 1 contains the hat. Box 1 contains ",
         "options": ["the hat.", "the map.", "nothing."], "example_id": 0},
        {"sample_id": 2, "numops": 1, "input_prefix": "Box 0 contains the key. Move the key into Box 1. Box 1 contains ",
         "options": ["the key.", "nothing.", "the coat."], "example_id": 1}],
    "entity_tracking/ambiref.jsonl": [
        {"sample_id": 3, "numops": 0, "input_prefix": "Box 0 contains the cup. Box 0 contains ",
         "options": ["the cup.", "the pen.", "nothing."], "example_id": 0}],
    "wug_adj_nominalization/wug_adj_nominalization.jsonl": [
        {"sentences": f"Create a noun out of the following adjective: {w}able. {w}ability\t"
                      f"Create a noun out of the following adjective: {w}able. {w}ableness", "ratio": r}
        for w, r in (("blick", 0.2), ("dax", 0.9), ("wug", 0.5), ("fep", 0.7), ("zorp", 0.1), ("tam", 0.6))],
    "comps/comps_base.jsonl": [
        {"prefix_acceptable": "A dog", "prefix_unacceptable": "A stone", "property_phrase": "can bark."}],
}


def write_tree(root: Path, files: dict = FILES) -> Path:
    for rel, rows in files.items():
        path = root / "full_eval" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_readers_decode_each_official_format(tmp_path):
    root = babylm.suite_root(write_tree(tmp_path), "full")
    blimp = babylm.load_subtask("blimp", root / "blimp_filtered")
    assert [i.uid for i in blimp] == ["anaphor_number_agreement", "anaphor_number_agreement", "svo"]
    assert dict(blimp[2].meta)["field"] == "syntax/semantics"  # the pipeline's standardised name
    supplement = babylm.load_subtask("supplement", root / "supplement_filtered")
    assert supplement[0].uid == "turn_taking" and "\n" in supplement[0].sentences[0]
    ewok = babylm.load_subtask("ewok", root / "ewok_filtered")
    item = [i for i in ewok if i.uid == "spatial-relations"][0]
    # Both targets follow Context1 (the pipeline never scores Context2); the targets are scored.
    assert item.sentences == ("The ball is below the cup. The cup is above the ball.",
                              "The ball is below the cup. The cup is below the ball.")
    assert item.completions == (" The cup is above the ball.", " The cup is below the ball.")
    entity = babylm.load_subtask("entity_tracking", root / "entity_tracking")
    assert sorted(i.uid for i in entity) == ["ambiref_0_ops", "regular_0_ops", "regular_1_ops"]
    assert len(entity[0].sentences) == 3
    wug = babylm.load_subtask("wug_adj", root / "wug_adj_nominalization")
    assert len(wug) == 6 and wug[1].ratio == 0.9 and wug[0].sentences[0].endswith("blickability")
    comps = babylm.load_subtask("comps", root / "comps")
    assert comps[0].sentences == ("A dog can bark.", "A stone can bark.") and comps[0].uid == "base"


def test_suite_finds_task_folders_and_skips_the_missing(tmp_path):
    write_tree(tmp_path)
    found, skipped = babylm.find_subtasks(tmp_path, "full")
    assert set(found) == {"blimp", "supplement", "ewok", "entity_tracking", "wug_adj", "comps"}
    assert set(skipped) == {"wug_past", "reading"} and "wug_past_tense" in skipped["wug_past"]
    # The full_eval folder itself is accepted too; fast_eval has no comps.
    assert set(babylm.find_subtasks(tmp_path / "full_eval", "full")[0]) == set(found)
    assert "comps" in babylm.find_subtasks(tmp_path, "fast")[1]
    # The reading task is a CSV file of its own folder.
    assert skipped["reading"] == f"{tmp_path / 'full_eval' / 'reading' / 'reading_data.csv'} not found"
    (tmp_path / "full_eval" / "reading").mkdir()
    (tmp_path / "full_eval" / "reading" / "reading_data.csv").write_text("item,word\n")
    assert babylm.find_subtasks(tmp_path, "full")[0]["reading"].name == "reading_data.csv"


@pytest.mark.parametrize("task,line,message", [
    ("blimp_filtered", {"sentence_good": "a"}, "missing field 'sentence_bad'"),
    ("ewok_filtered", {"Domain": "d", "Context1": "c", "Target1": "t"}, "missing field 'Target2'"),
    ("entity_tracking", {"input_prefix": "p", "options": ["one"], "numops": 0}, "'options' must be a list of at least 2"),
    ("entity_tracking", {"input_prefix": "p", "options": ["a", "b"], "numops": "x"}, "'numops' must be an integer"),
    ("wug_adj_nominalization", {"sentences": "a\tb", "ratio": "high"}, "'ratio' must be a number"),
    ("wug_adj_nominalization", {"sentences": "only one", "ratio": 0.5}, "tab-separated"),
])
def test_malformed_lines_name_file_and_line(tmp_path, task, line, message):
    folder = tmp_path / task
    folder.mkdir()
    good = FILES[next(k for k in FILES if k.startswith(task + "/"))][0]
    (folder / "x.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    name = {"blimp_filtered": "blimp", "ewok_filtered": "ewok", "entity_tracking": "entity_tracking",
            "wug_adj_nominalization": "wug_adj"}[task]
    with pytest.raises(BabyLMFormatError, match=rf"x\.jsonl:2: .*{message}"):
        babylm.load_subtask(name, folder)


def test_official_rules_ties_uid_mean_entity_splits_and_spearman():
    def item(uid, n=2):
        return Item(tuple(f"s{k}" for k in range(n)), tuple(f"s{k}" for k in range(n)), uid, (("UID", uid),))

    # A tie counts as right (torch.max returns index 0); strictly, it is wrong.
    scores = np.array([[-1.0, -2.0], [-3.0, -3.0], [-5.0, -4.0], [-1.0, -1.5]])
    items = [item("a"), item("a"), item("a"), item("b")]
    m = babylm.task_metrics("blimp", items, scores)
    assert m["groups"]["UID"] == {"a": pytest.approx(200 / 3), "b": 100.0}
    assert m["score"] == pytest.approx((200 / 3 + 100) / 2)  # mean over UIDs, not over items
    assert m["strict_score"] == pytest.approx((100 / 3 + 100) / 2)
    # Entity tracking: the mean over UIDs within each file's split, then over the splits.
    ent = [item("regular_0_ops", 3), item("regular_1_ops", 3), item("ambiref_0_ops", 3)]
    s = np.array([[0.0, -1, -2], [-2, -1, 0], [0, -3, -3]])
    assert babylm.task_metrics("entity_tracking", ent, s)["score"] == pytest.approx((50.0 + 100.0) / 2)
    # WUG: Spearman's rho of the first sentence's softmax probability against the human ratio.
    scipy_stats = pytest.importorskip("scipy.stats")
    wug = [Item(("a", "b"), ("a", "b"), "wug_adj", (("UID", "wug_adj"),), r) for r in (0.1, 0.5, 0.5, 0.9, 0.3)]
    ws = np.array([[-1.0, -2.0], [-2.0, -2.0], [-1.5, -1.0], [-0.5, -3.0], [-2.5, -1.8]])
    p0 = torch.softmax(torch.tensor(ws, dtype=torch.float32), 1)[:, 0].tolist()
    expected = scipy_stats.spearmanr(p0, [0.1, 0.5, 0.5, 0.9, 0.3])[0]
    assert babylm.task_metrics("wug_adj", wug, ws)["score"] == pytest.approx(expected, abs=1e-12)


def test_tuned_temperature_is_chosen_on_dev_items_only():
    items = [Item(("g", "b"), ("g", "b"), "u", (("UID", "u"),)) for _ in range(10)]
    dev = babylm.dev_split(items, 5)
    assert dev.tolist() == [True, False, False, False, False, True, False, False, False, False]
    # T index 1 wins on the dev items, T index 0 on the held-out ones: index 1 must be chosen.
    s = np.zeros((10, 2, 2))
    s[:, 0, 0], s[:, 1, 0] = -1.0, 0.0   # T0: every item wrong
    s[~dev, 0, 0] = 1.0                   # ... except the held-out ones
    s[dev, 0, 1], s[dev, 1, 1] = 1.0, 0.0  # T1: dev items right, held-out wrong
    s[~dev, 0, 1], s[~dev, 1, 1] = -1.0, 0.0
    out = babylm.evaluate_subtask("blimp", items, {"causal": s}, [1.0, 2.0], 5)
    tuned = out["causal"]["tuned"]
    assert tuned["temperature"] == 2.0 and tuned["dev_score"] == 100.0 and tuned["heldout_score"] == 0.0
    assert tuned["heldout_t1_score"] == 100.0 and tuned["heldout_items"] == 8
    assert out["causal"]["t1"]["score"] == 80.0  # T = 1 on every item


# ----------------------------------------------------------------------------- parity

transformers = pytest.importorskip("transformers")
from test_export import _auto, _hf_tokenizer, exported  # noqa: E402,F401 (module fixture)


def _pipeline_item_scores(mlm, clm, tok, item: Item) -> dict[str, list[float]]:
    """evaluation_pipeline/sentence_zero_shot for one item, on transformers alone: the scored
    tokens are those whose offset ends after len(sentence) - len(completion); causal sums
    log p(token) from a right-padded batch of inputs[:-1]; mntp masks each scored token in its own
    copy and reads the logits one position to the left."""
    out = {"causal": [], "mntp": []}
    encs = [tok(s, return_offsets_mapping=True) for s in item.sentences]
    for sentence, completion, enc in zip(item.sentences, item.completions, encs):
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        first = len(sentence) - len(completion) + offsets[0][0]
        phrase = [i for i, (_, end) in enumerate(offsets) if end > first]
        x = torch.tensor([ids])
        with torch.no_grad():
            logp = torch.log_softmax(clm(input_ids=x[:, :-1], attention_mask=torch.ones_like(x[:, :-1]))["logits"], -1)
        out["causal"].append(float(sum(logp[0, i - 1, ids[i]] for i in phrase)))
        rows = torch.tensor([ids] * len(phrase))
        for r, i in enumerate(phrase):
            rows[r, i] = tok.mask_token_id
        with torch.no_grad():
            logits = mlm(input_ids=rows, attention_mask=torch.ones_like(rows))["logits"]
        picked = torch.log_softmax(logits[torch.arange(len(phrase)), torch.tensor(phrase) - 1], -1)
        out["mntp"].append(float(picked.gather(-1, torch.tensor([ids[i] for i in phrase])[:, None]).sum()))
    return out


def _pipeline_average(task: str, items: list[Item], scores: np.ndarray) -> float:
    """compute_results.rank_and_evaluate + run.process_results: torch.max picks, accuracy per UID,
    mean over UIDs (entity tracking: per split, then over splits); WUG: scipy's spearmanr."""
    if task.startswith("wug"):
        from scipy.stats import spearmanr

        probs = torch.softmax(torch.tensor(scores, dtype=torch.float32), dim=1)[:, 0]  # float32 log-probs
        return float(spearmanr(probs.tolist(), [i.ratio for i in items])[0])
    chosen = torch.max(torch.tensor(scores), dim=1)[1].tolist()
    total, correct = {}, {}
    for item, c in zip(items, chosen):
        total[item.uid] = total.get(item.uid, 0) + 1
        correct[item.uid] = correct.get(item.uid, 0) + (c == 0)
    acc = {u: 100.0 * correct[u] / total[u] for u in total}
    if task != "entity_tracking":
        return sum(acc.values()) / len(acc)
    splits = [[a for u, a in acc.items() if u.startswith(s)] for s in ("regular", "ambiref", "move_contents")]
    return float(np.mean([sum(s) / len(s) for s in splits if s]))


def test_suite_equals_the_pipelines_arithmetic_on_the_export(exported, tmp_path):
    """Per item and per task, our native scores equal the pipeline's arithmetic on the exported
    model (both backends), and so do the task averages."""
    write_tree(tmp_path)
    mlm, clm = _auto("AutoModelForMaskedLM", exported["hf"]), _auto("AutoModelForCausalLM", exported["hf"])
    tok = _hf_tokenizer(exported["hf"])
    cfg = from_dict(EvalConfig, {**to_dict(EvalConfig()), "babylm_dir": str(tmp_path), "modes": ["causal", "mntp"],
                                 "temperatures": [1.0]})
    results = babylm.evaluate_suite(exported["model"], exported["tokenizer"], cfg)
    assert set(results["tasks"]) == {"blimp", "supplement", "ewok", "entity_tracking", "wug_adj", "comps"}
    for task, folder in babylm.find_subtasks(tmp_path)[0].items():
        items = babylm.load_subtask(task, folder)
        ours = babylm.score_items(exported["model"], exported["tokenizer"], items, ["causal", "mntp"], [1.0])
        for backend in ("causal", "mntp"):
            theirs = np.array([_pipeline_item_scores(mlm, clm, tok, it)[backend] for it in items])
            np.testing.assert_allclose(ours[backend][:, :, 0], theirs, atol=1e-4, rtol=0, err_msg=f"{task} {backend}")
            assert results["tasks"][task]["modes"][backend]["t1"]["score"] == pytest.approx(
                _pipeline_average(task, items, theirs), abs=1e-9), (task, backend)


def test_cli_suite_writes_results_and_report(exported, tmp_path, capsys):
    from cli.main import main

    write_tree(tmp_path / "data")
    out = tmp_path / "eval"
    assert main(["evaluate", str(exported["root"] / "model"), "--suite", "babylm", "--data", str(tmp_path / "data"),
                 "--out", str(out), "--set", "eval.temperatures=[0.5,1.0,2.0]"]) == 0
    printed = capsys.readouterr().out
    assert "babylm.ewok.mntp.t1\t" in printed and "babylm.wug_adj.causal.t1\t" in printed
    results = json.loads((out / "results.json").read_text())
    suite = results["tasks"]["babylm"]
    full = tmp_path / "data" / "full_eval"
    assert suite["skipped"] == {"wug_past": f"{full / 'wug_past_tense'} not found (or holds no *.jsonl)",
                                "reading": f"{full / 'reading' / 'reading_data.csv'} not found"}
    assert set(results["tasks"]) == {"babylm"}  # no glue_filtered/: nothing to fine-tune
    assert f"fine-tuning: skipped: {full / 'glue_filtered'} not found" in printed
    report = (out / "report.md").read_text()
    assert "## BabyLM zero-shot suite (full_eval)" in report and "| entity_tracking | 3 |" in report
    # Without --suite, --data is refused in one line.
    assert main(["evaluate", str(exported["root"] / "model"), "--data", str(tmp_path), "--out", str(tmp_path / "x")]) == 1
    assert "--data, --fast and --no-finetune go with --suite babylm" in capsys.readouterr().err


def test_reads_the_official_dev_files(shared_data):
    """Every file of babylm-eval-dev reads, with the item counts of its lines."""
    found, skipped = babylm.find_subtasks(shared_data("babylm-eval-dev"))
    assert set(found) == {"supplement", "ewok", "entity_tracking", "wug_adj"}
    for task, folder in found.items():
        lines = sum(1 for p in folder.glob("*.jsonl") for line in p.read_text().splitlines() if line.strip())
        assert len(babylm.load_subtask(task, folder)) == lines


# ----------------------------------------------------------------------------- word milestones

def _run_with_milestones(root: Path, exported) -> Path:
    """A pretraining run folder: model/ and two milestone models (the same tiny weights, perturbed)."""
    from common.config import preset
    from gptbert.io import save_model_dir

    tokenizer = exported["root"] / "tokenizer.json"
    save_model_dir(root / "model", exported["model"], preset("tiny").model, tokenizer, {"steps": 9})
    for k, (name, words) in enumerate((("chck_0.001M", 1000), ("chck_0.002M", 2000))):
        model = exported["model"]
        state = {n: p + 0.01 * (k + 1) for n, p in model.state_dict().items()}
        clone = type(model)(model.config)
        clone.load_state_dict(state)
        save_model_dir(root / "milestones" / name, clone, preset("tiny").model, tokenizer,
                       {"milestone": name, "milestone_words": words})
    return root / "model"


@pytest.mark.parametrize("backend", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_milestone_models_are_scored_at_t1_with_words(exported, tmp_path, backend):
    """The evaluate stage scores each word-milestone model beside the run's model (zero-shot tasks,
    T = 1, capped items) in order of words; Ray tasks give the same numbers as the local loop."""
    from gptbert.evaluation import evaluate_folder, evaluate_model_dir, milestone_config

    write_tree(tmp_path / "data")
    model_dir = _run_with_milestones(tmp_path / "run", exported)
    cfg = from_dict(EvalConfig, {**to_dict(EvalConfig()), "babylm_dir": str(tmp_path / "data"),
                                 "modes": ["causal", "mntp"], "temperatures": [0.5, 1.0], "milestones": backend,
                                 "milestone_max_items": 3,
                                 # Ray tasks score on CPUs; the in-process reference must too (1e-9)
                                 "device": "cpu"})
    record = evaluate_model_dir(model_dir, cfg, tmp_path / "eval")
    assert {k for k in record["inputs"] if k.startswith("milestone.")} == {"milestone.chck_0.001M", "milestone.chck_0.002M"}
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    milestones = results["milestones"]
    assert [(m["name"], m["words"]) for m in milestones] == [("chck_0.001M", 1000), ("chck_0.002M", 2000)]
    sub = milestone_config(cfg)
    assert sub.temperatures == [1.0] and sub.tasks == ["blimp", "babylm"] and sub.max_pairs_per_paradigm == 3
    expected = evaluate_folder(str(tmp_path / "run" / "milestones" / "chck_0.002M"), to_dict(sub))
    assert milestones[1]["metrics"] == pytest.approx(expected, abs=1e-9)
    assert "babylm.ewok.mntp.t1" in expected and not any(k.endswith("tuned") for k in expected)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Word milestones (T = 1)" in report and "| chck_0.002M | 2,000 |" in report
    if backend == "local":
        from flows.plots import plot_milestones

        drawn = plot_milestones(milestones, tmp_path / "m.png")
        assert "babylm.wug_adj.causal.t1" in drawn and (tmp_path / "m.png").stat().st_size > 10_000


def test_bf16_scoring_is_autocast_and_close_to_fp32(exported, tmp_path):
    """eval.precision=bf16 runs the zero-shot forward passes under bf16 autocast: the scores move
    (so autocast is on) but stay within a few hundredths of a nat per token of fp32."""
    from gptbert.evaluation import evaluate

    write_tree(tmp_path)
    base = {**to_dict(EvalConfig()), "tasks": ["babylm"], "babylm_dir": str(tmp_path), "modes": ["causal"],
            "temperatures": [1.0], "babylm_tasks": ["ewok"]}
    fp32 = evaluate(exported["model"], exported["tokenizer"], from_dict(EvalConfig, base))
    bf16 = evaluate(exported["model"], exported["tokenizer"], from_dict(EvalConfig, {**base, "precision": "bf16"}))
    items = babylm.load_subtask("ewok", tmp_path / "full_eval" / "ewok_filtered")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = babylm.score_items(exported["model"], exported["tokenizer"], items, ["causal"], [1.0])["causal"]
    high = babylm.score_items(exported["model"], exported["tokenizer"], items, ["causal"], [1.0])["causal"]
    assert 0 < np.abs(low - high).max() < 0.1 * max(len(s.split()) for it in items for s in it.completions)
    assert bf16["config"]["precision"] == "bf16" and fp32["config"]["precision"] == "fp32"
    for result, scores in ((fp32, high), (bf16, low)):
        expected = babylm.task_metrics("ewok", items, scores[:, :, 0])["score"]
        assert result["tasks"]["babylm"]["tasks"]["ewok"]["modes"]["causal"]["t1"]["score"] == expected
