"""BLiMP-format evaluation: reading pairs, accuracy bookkeeping, artifacts, and an end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import shared_path
from gptbert.config import EvalConfig, from_dict
from gptbert.evaluate import (
    BlimpFormatError,
    MinimalPair,
    blimp_accuracy,
    load_blimp,
    render_report,
    summary_metrics,
    write_results,
)


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
    # No T=1 in the sweep: no t1 entry; ties between temperatures go to the lowest T.
    r2 = blimp_accuracy(pairs, good[:, [0, 0]], bad[:, :2], [0.3, 0.6])
    assert r2["t1"] is None and r2["best"]["temperature"] == 0.3
    with pytest.raises(ValueError, match="shape"):
        blimp_accuracy(pairs, good[:3], bad[:3], temps)


def test_write_results_is_atomic_and_json(tmp_path):
    pairs = [MinimalPair("g", "b", "u1", "A", "syntax", "")] * 2
    mode = blimp_accuracy(pairs, np.array([[1.0], [-1.0]]), np.zeros((2, 1)), [1.0])
    results = {"model_dir": "m", "blimp": {"data_dir": "d", "data_digest": "0" * 64, "num_pairs": 2,
                                           "num_paradigms": 1, "temperatures": [1.0], "modes": {"causal": mode}}}
    path = write_results(results, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.md", "results.json"]
    assert json.loads(path.read_text()) == results
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| causal | 1 | 50.0 | 50.0 |" in report and "| u1 | 50.0 |" in report
    assert render_report(results) == report
    assert summary_metrics(results) == {"blimp.causal.best_accuracy": 0.5, "blimp.causal.best_temperature": 1.0,
                                        "blimp.causal.t1_accuracy": 0.5}


def test_eval_config_validation():
    from gptbert.config import ConfigError

    cfg = EvalConfig()
    assert cfg.temperatures[0] == 0.05 and cfg.temperatures[-1] == 3.0 and len(cfg.temperatures) == 60
    assert 1.0 in cfg.temperatures and 2.65 in cfg.temperatures
    for bad, field in (({"temperatures": [1.0, 0.0]}, "temperatures[1]"), ({"temperatures": []}, "temperatures"),
                       ({"modes": ["causal", "bert"]}, "modes[1]"), ({"modes": []}, "modes"),
                       ({"max_tokens": 4}, "max_tokens"), ({"max_pairs_per_paradigm": 0}, "max_pairs_per_paradigm"),
                       ({"finetune": {"lr": -1}}, "finetune.lr")):
        with pytest.raises(ConfigError) as info:
            from_dict(EvalConfig, bad)
        assert info.value.field == field


def test_load_shared_blimp_dev():
    folder = shared_path("blimp-dev")
    pairs = load_blimp(folder, max_pairs_per_paradigm=5)
    assert len({p.uid for p in pairs}) == 12 and len(pairs) == 60
    assert all(p.good != p.bad for p in pairs)
