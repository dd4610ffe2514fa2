"""benchmarks/gpu.sh on a machine without a GPU: it refuses with one line and a non-zero status;
``--cpu-smoke`` runs each mode's code path with a tiny budget (throughput rows through the trainer's
micro-batching, the Ray + DeepSpeed row, the quality run's stages + pretraining + BLiMP, the sweep
command); rows are measured on their own (an allocation failure is an OOM row, the run goes on) and
the results file is rewritten after every row."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from venvs import env_with_this_interpreter_first

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke tests (a GPU runs the real benchmark)")


def run(args, tmp_path, timeout=600, expect=0):
    # gpu.sh runs `python3`: this interpreter's, whether the suite runs in a venv or not.
    env = {**env_with_this_interpreter_first(), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == expect, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from flows.demo import write_demo_data

    corpus, pairs = write_demo_data(tmp_path_factory.mktemp("gpu-bench-data"))
    return corpus, pairs


@pytest.fixture
def rows_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_rows

    yield gpu_rows
    sys.path.remove(str(ROOT / "benchmarks"))


def test_without_cuda_it_refuses_in_one_line_before_any_work(tmp_path):
    for args in ([], ["--quality"], ["--sweep"]):
        out = run(args + ["--json", "rows.json"], tmp_path, expect=2)
        assert out.stdout == ""
        [line] = out.stderr.strip().splitlines()
        assert line.startswith("gpu.sh: no CUDA device") and "--cpu-smoke" in line
        assert not (tmp_path / "rows.json").exists()


def test_throughput_smoke_splits_the_global_batch_into_micro_batches(tmp_path):
    out = run(["--cpu-smoke", "--micro-batch-tokens", "128", "--json", "rows.json"], tmp_path).stdout
    assert "CPU smoke" in out
    doc = json.loads((tmp_path / "rows.json").read_text())  # a relative --json is the caller's
    assert doc["complete"] and doc["mode"] == "throughput" and doc["cpu_smoke"]
    [row] = doc["rows"]
    assert (row["kind"], row["preset"], row["seq"], row["variant"], row["status"]) == ("plain", "tiny", 64, "fused", "ok")
    assert row["global_batch_tokens"] == 512 and row["micro_batch_tokens"] == 128 and row["micro_batches"] == 4
    assert row["micro_batch_source"] == "given" and row["timed_steps"] == 3 and row["tokens_per_s"] > 0
    assert "128x4" in out  # the table row


def test_rows_are_measured_on_their_own_and_written_after_each(tmp_path, rows_module):
    """A real plain-loop row, then one whose allocation fails (the CPU allocator refusing 4 EiB), then
    one with another error, then one that finds the file already holding the three before it."""
    gpu_rows = rows_module
    path = tmp_path / "rows.json"
    results = gpu_rows.Results(path, {"mode": "test"})
    seen = []

    def measure(spec):
        if spec.variant == "fused":
            return gpu_rows.plain_row(spec, torch.device("cpu"), 256, steps=1, warmup=0, given_micro=128)
        if spec.variant == "huge":
            torch.empty(2**62, dtype=torch.uint8)
        if spec.variant == "broken":
            raise ValueError("a bug in the row")
        seen.append(json.loads(path.read_text()))
        return {"tokens_per_s": 1.0}

    specs = [gpu_rows.RowSpec("plain", "tiny", 32, v) for v in ("fused", "huge", "broken", "last")]
    rows = gpu_rows.run_rows(specs, measure, results)
    assert [r["status"] for r in rows] == ["ok", "OOM", "error", "ok"]
    assert "can't allocate memory" in rows[1]["error"] and rows[2]["error"] == "ValueError: a bug in the row"
    assert rows[0]["micro_batches"] == 2 and rows[0]["tokens_per_s"] > 0
    [before_last] = seen
    assert not before_last["complete"] and [r["status"] for r in before_last["rows"]] == ["ok", "OOM", "error"]
    assert [r["status"] for r in json.loads(path.read_text())["rows"]] == ["ok", "OOM", "error", "ok"]
    # A spent time budget: the rows not started are written as skipped.
    skipped = gpu_rows.run_rows(specs[:2], measure, gpu_rows.Results(tmp_path / "late.json", {}), deadline=time.time() - 1)
    assert [r["status"] for r in skipped] == ["skipped", "skipped"]


def test_the_peak_is_named_per_device(rows_module):
    describe, peak = rows_module.describe_peak, rows_module.device_peak
    assert peak("NVIDIA H200") == ("H200", 989e12) and "H200: 989 TFLOP/s" in describe("NVIDIA H200")
    assert peak("NVIDIA H100 80GB HBM3")[1] == 989e12 and "H100 SXM: 989" in describe("NVIDIA H100 80GB HBM3")
    assert peak("NVIDIA H100 PCIe")[1] == 756e12 and peak("NVIDIA A100-SXM4-80GB")[1] == 312e12
    assert peak("Tesla T4") is None and "MFU not reported" in describe("Tesla T4")


@pytest.mark.slow
def test_ray_deepspeed_row_smoke(tmp_path):
    run(["--cpu-smoke", "--only", "ray", "--micro-batch-tokens", "128", "--json", str(tmp_path / "rows.json")], tmp_path)
    [row] = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert (row["kind"], row["status"], row["micro_batches"]) == ("ray-zero1", "ok", 4)
    assert row["tokens_per_s"] > 0 and row["wall_s_with_startup"] > 0


@pytest.mark.slow
def test_quality_mode_smoke(tmp_path, demo_data):
    corpus, pairs = demo_data
    out = run(["--cpu-smoke", "--quality", "--data", str(corpus), "--blimp", str(pairs), "--workdir",
               str(tmp_path / "run"), "--json", str(tmp_path / "rows.json")], tmp_path).stdout
    [row] = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert row["status"] == "ok", row
    assert row["preset"] == "tiny" and row["steps"] >= 4 and row["tokens"] > 0 and row["words"] > 0
    assert row["micro_batch_source"] == "cpu default" and row["micro_batch_tokens"] > 0
    for mode in ("causal", "mntp", "fused"):
        assert 0.0 <= row[f"blimp.{mode}.best_accuracy"] <= 1.0
    assert f"{row['tokens']:,}" in out  # the table row


@pytest.mark.slow
def test_sweep_mode_smoke(tmp_path, demo_data):
    corpus, pairs = demo_data
    out = run(["--cpu-smoke", "--sweep", "--fractions", "0", "1", "--data", str(corpus), "--blimp", str(pairs),
               "--workdir", str(tmp_path / "sweep"), "--json", str(tmp_path / "rows.json")], tmp_path).stdout
    assert "gptbert sweep finished" in out and "2 trials" in out and "probed in a child process" in out
    [folder] = (tmp_path / "sweep" / "sweeps").iterdir()
    results = json.loads((folder / "results.json").read_text())
    assert set(results["table"]["blimp.causal.t1_accuracy"]) == {"0.0", "1.0"}
    [row] = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert row["kind"] == "sweep" and row["rc"] == 0 and row["probe"]["tokens_per_s"] > 0
