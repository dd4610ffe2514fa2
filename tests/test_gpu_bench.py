"""benchmarks/gpu.sh on a machine without a GPU: each mode says so and runs its code path with a
tiny budget (throughput step, the quality run's stages + pretraining + BLiMP, the sweep command)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from venvs import env_with_this_interpreter_first

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke tests (a GPU runs the real benchmark)")


def run(args, tmp_path, timeout=600):
    # gpu.sh runs `python3`: this interpreter's, whether the suite runs in a venv or not.
    env = {**env_with_this_interpreter_first(), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    out = subprocess.run([str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from flows.demo import write_demo_data

    corpus, pairs = write_demo_data(tmp_path_factory.mktemp("gpu-bench-data"))
    return corpus, pairs


def test_throughput_mode_smoke(tmp_path):
    out = run(["--json", str(tmp_path / "rows.json")], tmp_path)
    assert "no CUDA device" in out
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["preset"], r["seq"], r["variant"]) for r in rows] == [("tiny", 64, "fused")]
    assert rows[0]["tokens_per_s"] > 0 and rows[0]["tokens_per_step"] == 256


@pytest.mark.slow
def test_quality_mode_smoke(tmp_path, demo_data):
    corpus, pairs = demo_data
    out = run(["--quality", "--data", str(corpus), "--blimp", str(pairs), "--workdir", str(tmp_path / "run"),
               "--json", str(tmp_path / "rows.json")], tmp_path)
    [row] = json.loads((tmp_path / "rows.json").read_text())
    assert row["preset"] == "tiny" and row["steps"] >= 4 and row["tokens"] > 0 and row["words"] > 0
    for mode in ("causal", "mntp", "fused"):
        assert 0.0 <= row[f"blimp.{mode}.best_accuracy"] <= 1.0
    assert f"{row['tokens']:,}" in out  # the table row


@pytest.mark.slow
def test_sweep_mode_smoke(tmp_path, demo_data):
    corpus, pairs = demo_data
    out = run(["--sweep", "--fractions", "0", "1", "--data", str(corpus), "--blimp", str(pairs),
               "--workdir", str(tmp_path / "sweep")], tmp_path)
    assert "gptbert sweep finished" in out and "2 trials" in out
    [folder] = (tmp_path / "sweep" / "sweeps").iterdir()
    results = json.loads((folder / "results.json").read_text())
    assert set(results["table"]["blimp.causal.t1_accuracy"]) == {"0.0", "1.0"}
