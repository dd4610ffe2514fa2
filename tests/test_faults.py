"""Real faults (slow): the whole `gptbert pretrain` process, or the pipeline's flow process, is
SIGKILLed mid-training; the same command again resumes from the last checkpoint, finishes, and
matches an uninterrupted run. (A killed Ray worker: tests/test_launch.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gptbert.data import save_token_file

REPO = Path(__file__).resolve().parents[1]
STEPS = ["--set", "train.steps=120", "--set", "train.checkpoint_every=10", "--set", "train.validate_every=0",
         "--set", "train.precision=fp32", "--set", "train.prefetch=false"]


def _start(argv: list[str], env: dict | None = None) -> subprocess.Popen:
    # Its own process group: the kill takes what it started too (the flow's ephemeral Prefect
    # server), as a machine failure would, instead of leaving it running under init.
    return subprocess.Popen([sys.executable, "-m", "cli.main", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (it must not have finished before)."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before it could be killed:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "never reached the point to kill it"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _corpus(path: Path) -> Path:
    rng = np.random.default_rng(0)
    docs = [(rng.integers(16, 400) + 3 * np.arange(rng.integers(8, 60))) % 496 + 16 for _ in range(300)]
    save_token_file(path, docs, num_words=9000)
    return path


@pytest.mark.slow
def test_sigkill_of_gptbert_pretrain_then_the_same_command_resumes(tmp_path):
    data = _corpus(tmp_path / "corpus.npz")
    args = ["pretrain", "--data", str(data), "--preset", "tiny", "--no-progress", *STEPS]
    straight = _start([*args, "--out", str(tmp_path / "straight")])
    assert straight.wait(timeout=600) == 0, straight.stdout.read()[-3000:]

    run = tmp_path / "run"
    proc = _start([*args, "--out", str(run)])
    _kill_when(proc, lambda: (run / "checkpoints" / "step-40").is_dir())
    assert not (run / "model").exists()
    again = _start([*args, "--out", str(run)])
    assert again.wait(timeout=600) == 0, again.stdout.read()[-3000:]
    summary = json.loads((run / "model" / "training.json").read_text())
    assert summary["steps"] == 120 and 0 < summary["steps_this_session"] <= 80  # it resumed
    ours = load_file(str(run / "model" / "model.safetensors"))
    theirs = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-5
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no leftovers of the killed process


@pytest.mark.slow
def test_sigkill_of_the_pipeline_flow_then_the_flow_again(prefect_harness, tmp_path):
    """Kill the flow process during pretraining; the flow again takes the finished stages from the
    cache, resumes pretraining, evaluates, and the registry ends with one version."""
    from flows.demo import demo_config, with_demo_data
    from flows.pipeline import pipeline
    from flows.tracking import client_for

    overrides = ["launch.backend=local", "train.steps=120", "train.checkpoint_every=10", "train.validate_every=0",
                 "train.batch_tokens_start=512", "train.batch_tokens_end=512", "train.micro_batch_tokens=512",
                 "train.prefetch=false", "eval.max_pairs_per_paradigm=10", "eval.temperatures=[1.0]",
                 "tracking.experiment=faults", "tracking.registered_model=faults"]
    workdir = tmp_path / "run"
    argv = ["demo", "--workdir", str(workdir)]
    for item in overrides:
        argv += ["--set", item]
    env = {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    proc = _start(argv, env)
    _kill_when(proc, lambda: any(workdir.glob("artifacts/pretrain/*/checkpoints/step-30")))
    summary = pipeline(config=with_demo_data(demo_config(str(workdir), overrides)))
    assert summary["cached"] == ["clean", "tokenizer", "shard"] and summary["ran"] == ["pretrain", "export", "evaluate"]
    assert 0 < summary["training"]["steps_this_session"] < 120 and summary["training"]["steps"] == 120
    versions = client_for(summary["tracking_uri"]).search_model_versions("name='faults'")
    assert len(versions) == 1 and summary["registered"]["version"] == 1
