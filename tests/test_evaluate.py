"""BLiMP-format evaluation: reading pairs, accuracy bookkeeping, artifacts, and an end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import shared_path
from common.artifacts import read_record, tree_digest
from test_scoring import one_thread  # noqa: F401 (autouse fixture)
from common.config import EvalConfig, from_dict
from gptbert.evaluation import render_report, summary_metrics, write_results
from gptbert.evaluation.minimal_pairs import BlimpFormatError, MinimalPair, blimp_accuracy, load_blimp


def _pair(uid, term="t", field="syntax", good="A b.", bad="B a."):
    return {"sentence_good": good, "sentence_bad": bad, "UID": uid, "linguistics_term": term, "field": field}


def _write(folder, name, items):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")


def test_load_blimp_reads_folder_and_caps_pairs(tmp_path):
    _write(tmp_path, "b.jsonl", [_pair("p2", good=f"g{i}", bad=f"b{i}") for i in range(5)])
    _write(tmp_path, "a.jsonl", [_pair("p1", good=f"g{i}", bad=f"b{i}") for i in range(3)])
    (tmp_path / "notes.txt").write_text("ignored")
    pairs = load_blimp(tmp_path)
    assert [p.uid for p in pairs] == ["p1"] * 3 + ["p2"] * 5  # files in name order
    assert pairs[0] == MinimalPair("g0", "b0", "p1", "t", "syntax", "a.jsonl:1")
    capped = load_blimp(tmp_path, max_pairs_per_paradigm=2)
    assert [(p.uid, p.good) for p in capped] == [("p1", "g0"), ("p1", "g1"), ("p2", "g0"), ("p2", "g1")]


def test_load_blimp_errors_name_file_and_line(tmp_path):
    good = json.dumps(_pair("p"))
    (tmp_path / "x.jsonl").write_text(good + "\n\n" + '{"sentence_good": "a", oops}\n')
    with pytest.raises(BlimpFormatError, match=r"x\.jsonl:3: not valid JSON"):
        load_blimp(tmp_path)

    missing = _pair("p")
    del missing["linguistics_term"]
    (tmp_path / "x.jsonl").write_text(good + "\n" + json.dumps(missing) + "\n")
    with pytest.raises(BlimpFormatError, match=r"x\.jsonl:2: missing field 'linguistics_term'"):
        load_blimp(tmp_path)

    (tmp_path / "x.jsonl").write_text(json.dumps({**_pair("p"), "sentence_bad": 3}) + "\n")
    with pytest.raises(BlimpFormatError, match=r"x\.jsonl:1: field 'sentence_bad' must be a string"):
        load_blimp(tmp_path)

    (tmp_path / "x.jsonl").write_text("[1, 2]\n")
    with pytest.raises(BlimpFormatError, match=r"x\.jsonl:1: expected a JSON object"):
        load_blimp(tmp_path)

    (tmp_path / "x.jsonl").unlink()
    with pytest.raises(BlimpFormatError, match="no \\*.jsonl files"):
        load_blimp(tmp_path)
    with pytest.raises(FileNotFoundError, match="BLiMP folder not found"):
        load_blimp(tmp_path / "nope")


def test_blimp_accuracy_bookkeeping():
    # Paradigms: u1 (phenomenon A, syntax) 4 pairs, u2 (A, syntax) 2 pairs, u3 (B, semantics) 1 pair.
    pairs = ([MinimalPair("g", "b", "u1", "A", "syntax", "")] * 4 + [MinimalPair("g", "b", "u2", "A", "syntax", "")] * 2
             + [MinimalPair("g", "b", "u3", "B", "semantics", "")])
    temps = [0.5, 1.0, 2.0]
    bad = np.zeros((7, 3))
    good = np.array([
        # T=0.5, 1.0, 2.0
        [1, 1, -1],
        [1, -1, -1],
        [1, -1, -1],
        [-1, -1, 1],   # u1: 3/4, 1/4, 1/4
        [1, 0, 1],     # a tie (0 vs 0) is wrong
        [-1, 1, 1],    # u2: 1/2, 1/2, 2/2
        [-1, 1, 1],    # u3: 0, 1, 1
    ], dtype=float)
    r = blimp_accuracy(pairs, good, bad, temps)
    macro = [(0.75 + 0.5 + 0) / 3, (0.25 + 0.5 + 1) / 3, (0.25 + 1 + 1) / 3]
    assert r["macro_accuracy"] == pytest.approx(macro)
    assert r["best"]["temperature"] == 2.0 and r["best"]["accuracy"] == pytest.approx(2.25 / 3)
    assert r["best"]["paradigms"] == {"u1": 0.25, "u2": 1.0, "u3": 1.0}
    assert r["best"]["phenomena"] == pytest.approx({"A": 0.625, "B": 1.0})  # mean of its paradigms
    assert r["best"]["fields"] == pytest.approx({"syntax": 0.625, "semantics": 1.0})
    assert r["t1"]["temperature"] == 1.0 and r["t1"]["accuracy"] == pytest.approx(1.75 / 3)
    assert r["t1"]["paradigms"] == {"u1": 0.25, "u2": 0.5, "u3": 1.0}
    assert r["pairs_per_paradigm"] == {"u1": 4, "u2": 2, "u3": 1}
    # No T=1 in the sweep: no t1 entry; ties between temperatures go to the T closest to 1.
    r2 = blimp_accuracy(pairs, good[:, [0, 0, 0]], bad, [0.3, 1.6, 0.6])
    assert r2["t1"] is None and r2["best"]["temperature"] == 0.6
    with pytest.raises(ValueError, match="shape"):
        blimp_accuracy(pairs, good[:3], bad[:3], temps)


def test_write_results_is_atomic_and_json(tmp_path):
    pairs = [MinimalPair("g", "b", "u1", "A", "syntax", "")] * 2
    mode = blimp_accuracy(pairs, np.array([[1.0], [-1.0]]), np.zeros((2, 1)), [1.0])
    results = {"model_dir": "m", "tasks": {"blimp": {"data_dir": "d", "data_digest": "0" * 64, "num_pairs": 2,
                                                     "num_paradigms": 1, "temperatures": [1.0],
                                                     "modes": {"causal": mode}}},
               "skipped": {"glue": "no data configured"}}
    path = write_results(results, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.md", "results.json"]
    assert json.loads(path.read_text()) == results
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| causal | 1 | 50.0 | 50.0 |" in report and "| u1 | 50.0 |" in report
    assert "- glue: no data configured" in report
    assert render_report(results) == report
    assert summary_metrics(results) == {"blimp.causal.best_accuracy": 0.5, "blimp.causal.best_temperature": 1.0,
                                        "blimp.causal.t1_accuracy": 0.5}


def test_eval_config_validation():
    from common.config import ConfigError

    cfg = EvalConfig()
    assert cfg.max_tokens == "auto" and from_dict(EvalConfig, {"max_tokens": 4096}).max_tokens == 4096
    assert cfg.temperatures[0] == 0.05 and cfg.temperatures[-1] == 3.0 and len(cfg.temperatures) == 60
    assert 1.0 in cfg.temperatures and 2.65 in cfg.temperatures
    for bad, field in (({"temperatures": [1.0, 0.0]}, "temperatures[1]"), ({"temperatures": []}, "temperatures"),
                       ({"modes": ["causal", "bert"]}, "modes[1]"), ({"modes": []}, "modes"),
                       ({"max_tokens": 4}, "max_tokens"), ({"max_tokens": "big"}, "max_tokens"),
                       ({"max_pairs_per_paradigm": 0}, "max_pairs_per_paradigm"),
                       ({"finetune": {"lr": -1}}, "finetune.lr")):
        with pytest.raises(ConfigError) as info:
            from_dict(EvalConfig, bad)
        assert info.value.field == field


def test_load_shared_blimp_dev():
    folder = shared_path("blimp-dev")
    pairs = load_blimp(folder, max_pairs_per_paradigm=5)
    assert len({p.uid for p in pairs}) == 12 and len(pairs) == 60
    assert all(p.good != p.bad for p in pairs)


# ---------------------------------------------------------------------------------------------
# End to end with a real (tiny) model whose preferences are known


def _bias_model_and_tokenizer():
    import torch

    from test_generate import bias_only_model, descending_bias
    from test_scoring import make_tokenizer

    return bias_only_model(descending_bias()), make_tokenizer()


def _expected_scores(model, tokenizer, sentence, temps):
    """The bias-only model's log p(token) is log_softmax(bias / T) whatever the context or mask."""
    import torch

    ids = tokenizer.encode(sentence, add_special_tokens=False).ids
    bias = model.head_bias.detach().double()
    return np.array([torch.log_softmax(bias / t, -1)[ids].sum().item() for t in temps])


HAND_MADE = {
    "p_agree.jsonl": [_pair("agree", "agreement", "morphology", "The cat sat.", "The cats sat on."),
                      _pair("agree", "agreement", "morphology", "Dogs ran far away.", "Dog ran."),
                      _pair("agree", "agreement", "morphology", "A child read.", "A child reads.")],
    "p_island.jsonl": [_pair("island", "island_effects", "syntax", "Who should Derek hug?", "Who should Derek hugs?"),
                       _pair("island", "island_effects", "syntax", "The ships sailed away.", "The ship sailed.")],
    "p_npi.jsonl": [_pair("npi", "npi_licensing", "semantics", "Every teacher praised them.", "Ever teacher praised.")],
}


def test_evaluate_blimp_end_to_end_matches_known_preferences(tmp_path):
    from gptbert.evaluation import evaluate
    from gptbert.evaluation.minimal_pairs import evaluate_blimp

    model, tok = _bias_model_and_tokenizer()
    for name, items in HAND_MADE.items():
        _write(tmp_path / "blimp", name, items)
    temps = [0.5, 1.0, 3.0]
    cfg = from_dict(EvalConfig, {"blimp_dir": str(tmp_path / "blimp"), "temperatures": temps, "max_tokens": 64})
    result = evaluate_blimp(model, tok, cfg)
    assert result["num_pairs"] == 6 and result["num_paradigms"] == 3 and result["temperatures"] == temps

    # The same accuracies from the closed-form scores of this model.
    pairs = load_blimp(tmp_path / "blimp")
    good = np.stack([_expected_scores(model, tok, p.good, temps) for p in pairs])
    bad = np.stack([_expected_scores(model, tok, p.bad, temps) for p in pairs])
    for mode, factor in (("causal", 1), ("mntp", 1), ("fused", 2)):  # mask and context do not matter here
        expected = blimp_accuracy(pairs, factor * good, factor * bad, temps)
        got = result["modes"][mode]
        assert got["macro_accuracy"] == pytest.approx(expected["macro_accuracy"], abs=1e-12)
        assert got["best"]["paradigms"] == expected["best"]["paradigms"]
    correct = (good > bad).mean()
    assert 0 < correct < 1  # the hand-made data has both outcomes, so the test can tell them apart

    full = evaluate(model, tok, cfg, model_dir="somewhere")
    assert full["tasks"]["blimp"]["modes"]["mntp"]["macro_accuracy"] == result["modes"]["mntp"]["macro_accuracy"]
    assert full["skipped"] == {"babylm": "no data configured", "glue": "no data configured"}
    assert full["config"]["temperatures"] == temps and full["model_dir"] == "somewhere"
    json.dumps(full)  # plain JSON


def test_evaluate_cli_score_and_generate(tmp_path, capsys):
    pytest.importorskip("gptbert.io")
    from cli.main import main
    from gptbert.io import save_model_dir

    model, tok = _bias_model_and_tokenizer()
    tok.save(str(tmp_path / "tok.json"))
    model_dir = save_model_dir(tmp_path / "model", model, model.config, tmp_path / "tok.json", {})
    for name, items in HAND_MADE.items():
        _write(tmp_path / "blimp", name, items)

    out = tmp_path / "eval"
    rc = main(["evaluate", str(model_dir), "--blimp", str(tmp_path / "blimp"), "--out", str(out),
               "--set", "eval.temperatures=[1.0, 2.0]", "--set", "eval.modes=[causal, mntp]", "--max-pairs", "1"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    blimp = results["tasks"]["blimp"]
    assert blimp["num_pairs"] == 3 and set(blimp["modes"]) == {"causal", "mntp"}
    record = read_record(out, "evaluate")  # the stage record: lineage of model and data, headline metrics
    assert record["inputs"]["model"] == tree_digest(model_dir) and set(record["inputs"]) == {"model", "data.blimp"}
    assert record["stats"]["blimp.mntp.t1_accuracy"] == blimp["modes"]["mntp"]["t1"]["accuracy"]
    assert "blimp.mntp.t1_accuracy" in capsys.readouterr().out
    assert "| mntp |" in (out / "report.md").read_text()

    assert main(["score", str(model_dir), "The cat sat.", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    expected = _expected_scores(model, tok, "The cat sat.", [1.0])[0]
    assert scored[0]["scores"]["causal"]["1.0"] == pytest.approx(expected, abs=1e-3)
    assert scored[0]["scores"]["fused"]["1.0"] == pytest.approx(2 * expected, abs=1e-3)

    assert main(["generate", str(model_dir), "The cat", "--greedy", "--repetition-penalty", "1.5",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == "The cat " + tok.decode([16, 17, 18, 19]).lstrip()

    # A bad BLiMP file is a clear CLI error naming file and line.
    (tmp_path / "blimp" / "p_npi.jsonl").write_text("{not json\n")
    assert main(["evaluate", str(model_dir), "--blimp", str(tmp_path / "blimp"), "--out", str(out)]) == 1
    assert "p_npi.jsonl:1: not valid JSON" in capsys.readouterr().err


def test_evaluate_shared_blimp_dev_quick(tmp_path):
    import torch

    from gptbert.evaluation.minimal_pairs import evaluate_blimp
    from test_scoring import make_model, make_tokenizer

    folder = shared_path("blimp-dev")
    cfg = from_dict(EvalConfig, {"blimp_dir": str(folder), "max_pairs_per_paradigm": 2,
                                 "temperatures": [0.5, 1.0, 2.0]})
    r = evaluate_blimp(make_model(dtype=torch.float32), make_tokenizer(), cfg)
    assert r["num_pairs"] == 24 and r["num_paradigms"] == 12 and len(r["data_digest"]) == 64
    for mode in ("causal", "mntp", "fused"):
        m = r["modes"][mode]
        assert len(m["macro_accuracy"]) == 3 and set(m["pairs_per_paradigm"].values()) == {2}
        assert m["best"]["accuracy"] == max(m["macro_accuracy"]) and m["t1"]["temperature"] == 1.0
        assert all(acc in (0.0, 0.5, 1.0) for acc in m["best"]["paradigms"].values())


def test_task_registry_runs_configured_tasks_and_notes_the_rest(tmp_path):
    from common.config import ConfigError
    from gptbert.evaluation import TASKS, configured_tasks, evaluate

    assert {"blimp", "babylm", "glue"} <= set(TASKS)
    model, tok = _bias_model_and_tokenizer()
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(model, tok, EvalConfig())
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        configured_tasks(EvalConfig(tasks=["blimp", "nope"]))
    with pytest.raises(FileNotFoundError, match="task 'blimp' not found"):
        configured_tasks(EvalConfig(blimp_dir=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="duplicates"):
        EvalConfig(tasks=["blimp", "blimp"])
    _write(tmp_path / "blimp", "p.jsonl", HAND_MADE["p_agree.jsonl"])
    run, skipped = configured_tasks(EvalConfig(blimp_dir=str(tmp_path / "blimp")))
    assert list(run) == ["blimp"] and skipped == {"babylm": "no data configured", "glue": "no data configured"}
    run, skipped = configured_tasks(EvalConfig(tasks=["glue"], blimp_dir=str(tmp_path / "blimp")))
    assert run == {} and skipped == {"glue": "no data configured"}  # blimp not asked for
