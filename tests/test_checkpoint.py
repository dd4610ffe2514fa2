"""Checkpoints: exact resumption in a new process, atomic folders, last-K pruning, safe formats."""

from __future__ import annotations

import json
import os
import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gptbert.checkpoint import latest_checkpoint, list_checkpoints, rng_state, set_rng_state
from common.config import load_config
from gptbert.data import save_token_file

REPO = Path(__file__).resolve().parents[1]
# Pinned to the CPU: resuming must continue to 1e-6, and CUDA's atomic-add kernels (embedding and
# index backward) are not bitwise reproducible from run to run.
OVERRIDES = ["train.device=cpu", "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=2",
             "train.validate_every=0", "train.batch_tokens_start=256", "train.batch_tokens_end=512",
             "train.micro_batch_tokens=256", "train.causal_fraction=0.25"]


# Tiny tensors: extra threads only contend with other processes (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def make_corpus(path: Path) -> Path:
    rng = np.random.default_rng(0)
    docs = [rng.integers(16, 512, size=rng.integers(2, 50)) for _ in range(60)]
    save_token_file(path, docs, num_words=1234)
    return path


def run_pretrain(data: Path, out: Path, stop_after=None, extra=()):
    from gptbert.pretraining import pretrain

    cfg = load_config(preset="tiny", overrides=OVERRIDES + list(extra))
    return pretrain(cfg, data, out, stop_after=stop_after)


def globals_in_pickle(pt_file: Path) -> set[str]:
    """Every GLOBAL/STACK_GLOBAL a torch.save zip's pickle would import."""
    found = set()
    with zipfile.ZipFile(pt_file) as z:
        for name in z.namelist():
            if name.endswith(".pkl"):
                ops = list(pickletools.genops(z.read(name)))
                for i, (op, arg, _) in enumerate(ops):
                    if op.name == "GLOBAL":
                        found.add(arg.replace(" ", "."))
                    elif op.name == "STACK_GLOBAL":
                        module, attr = ops[i - 2][1], ops[i - 1][1]
                        found.add(f"{module}.{attr}")
    return found


def test_rng_state_roundtrip():
    import random

    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


@pytest.mark.parametrize("saved, available, restored, warned", [
    (8, 8, [0, 1, 2, 3, 4, 5, 6, 7], False),
    (8, 2, [0, 1], True),   # saved on 8 GPUs, resumed on 2: no IndexError
    (1, 4, [0], True),
    (4, 0, [], True),       # CUDA states, no GPU here
    (1, 1, [0], False),     # one GPU per Ray worker
])
def test_cuda_rng_states_are_restored_per_device_that_exists(saved, available, restored, warned):
    from gptbert.checkpoint import cuda_rng_restore_plan

    indices, message = cuda_rng_restore_plan(saved, available)
    assert indices == restored
    assert (message is not None) == warned
    if warned:
        assert f"{saved} GPU" in message and f"sees {available}" in message and "GPU count changed" in message


def test_a_checkpoint_from_an_8_gpu_machine_resumes_here_with_a_warning(caplog):
    import random

    state = rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8) for _ in range(8)]  # 8 devices' states, as saved
    a = random.random()
    with caplog.at_level("WARNING", logger="gptbert"):
        set_rng_state(state)
    assert random.random() == a  # the other streams are restored
    if not torch.cuda.is_available():
        assert "holds the CUDA RNG states of 8 GPUs and this process sees 0" in caplog.text


@pytest.mark.slow
def test_resume_in_a_new_process_continues_exactly(tmp_path):
    """6 steps straight == 3 steps, then a NEW process resuming for 3 more (dropout on, the
    sequence-length schedule changes at step 5, both example kinds present)."""
    data = make_corpus(tmp_path / "corpus.npz")
    straight = run_pretrain(data, tmp_path / "straight")
    ckpt = run_pretrain(data, tmp_path / "resumed", stop_after=3)
    assert ckpt.name == "step-3" and not (tmp_path / "resumed" / "model").exists()
    script = (
        "import sys, torch; torch.set_num_threads(1); sys.path.insert(0, 'tests');"
        "from pathlib import Path; from test_checkpoint import run_pretrain;"
        f"print(run_pretrain(Path({str(data)!r}), Path({str(tmp_path / 'resumed')!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = tmp_path / "straight" / "checkpoints" / "step-6", tmp_path / "resumed" / "checkpoints" / "step-6"
    for name in ("model.safetensors", "ema.safetensors"):
        sa, sb = load_file(str(a / name)), load_file(str(b / name))
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=0, msg=f"{name}:{k}")
    oa = torch.load(a / "optimizer.pt", weights_only=True)
    ob = torch.load(b / "optimizer.pt", weights_only=True)
    for i, st in oa["state"].items():
        assert st["step"] == ob["state"][i]["step"] == 6
        torch.testing.assert_close(st["exp_avg_sq"], ob["state"][i]["exp_avg_sq"], atol=1e-6, rtol=0)
    ta = torch.load(a / "trainer.pt", weights_only=True)
    tb = torch.load(b / "trainer.pt", weights_only=True)
    assert ta["cursor"] == tb["cursor"] and ta["tokens_seen"] == tb["tokens_seen"]
    final_a = load_file(str(straight / "model.safetensors"))
    final_b = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    for k in final_a:
        torch.testing.assert_close(final_a[k], final_b[k], atol=1e-6, rtol=0)


def test_checkpoints_are_atomic_pruned_and_pickle_free(tmp_path):
    data = make_corpus(tmp_path / "corpus.npz")
    model_dir = run_pretrain(data, tmp_path / "run", extra=["train.steps=5"])
    root = tmp_path / "run" / "checkpoints"
    # every 2 steps and at the end; only the last 2 kept; no temporary folders left behind
    assert [p.name for p in list_checkpoints(root)] == ["step-4", "step-5"]
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-5"]
    ckpt = latest_checkpoint(root)
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "checkpoint.json", "ema.safetensors", "model.safetensors", "optimizer.pt", "rng-0.pt", "trainer.pt"]
    assert json.loads((ckpt / "checkpoint.json").read_text())["step"] == 5
    for pt in ckpt.glob("*.pt"):
        torch.load(pt, weights_only=True)  # raises on anything beyond plain containers and tensors
        for name in globals_in_pickle(pt):
            assert name.startswith(("torch.", "collections.OrderedDict", "builtins.set")), (pt.name, name)
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert state["step"] == 5 and set(state["cursor"]) == {"epoch", "position", "offset"}
    # The final model holds the EMA weights.
    ema = load_file(str(ckpt / "ema.safetensors"))
    final = load_file(str(model_dir / "model.safetensors"))
    for k, v in ema.items():
        torch.testing.assert_close(final[k], v)
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors", "training.json"]
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]


def test_resume_refuses_a_different_config(tmp_path):
    data = make_corpus(tmp_path / "corpus.npz")
    run_pretrain(data, tmp_path / "run", stop_after=2)
    with pytest.raises(ValueError, match="different model or train config"):
        run_pretrain(data, tmp_path / "run", extra=["train.lr=0.5"])


def test_finished_run_is_not_retrained(tmp_path):
    data = make_corpus(tmp_path / "corpus.npz")
    run_pretrain(data, tmp_path / "run", extra=["train.steps=2"])
    before = load_file(str(tmp_path / "run" / "checkpoints" / "step-2" / "model.safetensors"))
    model_dir = run_pretrain(data, tmp_path / "run", extra=["train.steps=2"])
    after = load_file(str(tmp_path / "run" / "checkpoints" / "step-2" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((model_dir / "training.json").read_text())["steps"] == 2
