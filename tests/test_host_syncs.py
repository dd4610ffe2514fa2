"""A training step makes its GPU's host wait at most once: no scalar read, data-dependent shape or
device->host copy per micro-batch. Counted on CPU with the torch profiler by the method of
``benchmarks/step_syncs.py`` (main thread, per optimizer step, after warm-up steps); on a CUDA
machine a step also runs under ``torch.cuda.set_sync_debug_mode("error")``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def step_syncs():
    spec = importlib.util.spec_from_file_location("step_syncs", ROOT / "benchmarks" / "step_syncs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


READS = {
    "aten::_local_scalar_dense": lambda x: float(x.sum()),
    "aten::nonzero": lambda x: x[x > 2],
    "Tensor.tolist": lambda x: x.tolist(),
    "Tensor.numpy": lambda x: x.numpy(),
    "aten::_unique2": lambda x: torch.unique(x.long()),
    "aten::repeat_interleave": lambda x: x.repeat_interleave(torch.tensor([1, 0, 2, 0, 0, 1])),
}


@pytest.mark.parametrize("op", list(READS))
def test_the_counter_sees_every_kind_of_host_read(op):
    """The counting method counts what it claims to (so the test below can fail)."""
    class Reads:
        def train_step(self):
            READS[op](torch.arange(6.0))

    syncs, _, _ = step_syncs().profile_steps(Reads(), steps=2)
    assert syncs[op] == 2, dict(syncs)


@pytest.mark.parametrize("micro_batches", [1, 8])
def test_one_host_read_per_optimizer_step(micro_batches):
    r = step_syncs().count_per_step("tiny", micro_batches, steps=2, warmup=2)
    assert r["micro_batches"] == micro_batches
    # The step's one read: its loss sums and gradient norm, copied together at its end.
    assert r["by_op"] == {"Tensor.tolist": 1.0}, r["by_op"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_step_runs_under_the_sync_debug_mode(monkeypatch):
    """Every operation of a step but its one read refuses to synchronise (``"error"``)."""
    ss = step_syncs()
    cfg = ss.step_config("tiny", micro_batches=4)
    from common.config.base import replace

    cfg = replace(cfg, train=replace(cfg.train, device="cuda", precision="fp32"))
    trainer = ss.make_trainer(cfg)
    reads = []
    read = torch.Tensor.tolist

    def allowed_read(t):
        torch.cuda.set_sync_debug_mode(0)
        try:
            reads.append(t.device.type)
            return read(t)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    try:
        trainer.train_step()  # warm-up: first allocations, the position table
        torch.cuda.synchronize()
        monkeypatch.setattr(torch.Tensor, "tolist", allowed_read)
        torch.cuda.set_sync_debug_mode("error")
        try:
            trainer.train_step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    finally:
        trainer._drop_prefetch()
        if trainer._executor is not None:
            trainer._executor.shutdown()
    assert reads.count("cuda") == 1
