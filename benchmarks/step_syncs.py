"""Host synchronisations and aten ops per optimizer step of the training loop, counted on CPU.

A GPU's host waits for the device at every scalar read, data-dependent shape or device->host copy;
this counts, with ``torch.profiler`` on the main thread (the prefetch thread that builds batches is
left out), the operations of one optimizer step that would do so on a GPU:

* profiler ops ``SYNC_OPS``: ``aten::_local_scalar_dense`` (``.item()``, ``float()``, ``bool()``),
  ``aten::nonzero`` (boolean-mask indexing), ``masked_select``, ``unique`` and ``repeat_interleave``;
* Python reads of tensors that the profiler does not see on a CPU (``Tensor.tolist``, ``.numpy``,
  ``.cpu``), counted by wrapping those methods while the steps run.

Steps run with the step's shapes fixed (no sequence-length or batch schedule) after warm-up steps
outside the profiler, so start-up (compilation, first allocations) is not counted; counts are per
step over the profiled steps. ``aten ops`` is every ``aten::`` event on the main thread (nested
ones included: a proxy for kernel launches, the same method before and after a change).

The model's dropout is 0 by default: the CPU dropout kernel (``gptbert.kernels.dropout``) seeds its
numpy stream with one scalar read of a CPU tensor per call, a path that a GPU never takes
(``F.dropout`` there); ``--dropout`` keeps the preset's rates and counts those too.

    python benchmarks/step_syncs.py                          # tiny and small, 1 and 8 micro-batches
    python benchmarks/step_syncs.py --presets small --micro-batches 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import load_config  # noqa: E402
from gptbert.data import ListDocumentSource  # noqa: E402

# Profiler ops that make a GPU's host wait for the device.
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique",
            "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim", "aten::repeat_interleave")
# Tensor methods that copy to the host (invisible to the profiler when the tensor is on the CPU).
HOST_READS = ("tolist", "numpy", "cpu")


def step_config(preset: str, micro_batches: int, seq_len: int = 32, sequences: int = 32,
                dropout: bool = False):
    """A preset's config with one fixed step shape: ``sequences`` x ``seq_len`` per step, split
    into ``micro_batches`` micro-batches, no validation or checkpoints."""
    if sequences % micro_batches:
        raise ValueError(f"{sequences} sequences do not split into {micro_batches} micro-batches")
    tokens = sequences * seq_len
    overrides = [f"train.seq_len={seq_len}", "train.seq_len_schedule=false",
                 f"train.batch_tokens_start={tokens}", f"train.batch_tokens_end={tokens}",
                 f"train.micro_batch_tokens={tokens // micro_batches}", "train.steps=1000",
                 "train.validate_every=0", "train.checkpoint_every=0", "train.device=cpu"]
    if not dropout:
        overrides += ["model.hidden_dropout=0.0", "model.attention_dropout=0.0"]
    return load_config(preset=preset, overrides=overrides)


def make_trainer(cfg, seed: int = 0):
    """A ``Trainer`` over random documents with the local backend on ``train.device``, as
    ``pretraining`` builds it."""
    from gptbert.pretraining import build_local_backend
    from gptbert.trainer import Trainer

    rng = np.random.default_rng(seed)
    docs = [rng.integers(16, cfg.model.vocab_size, size=int(n)) for n in rng.integers(8, 120, size=400)]
    backend = build_local_backend(cfg.model, cfg.train)  # on train.device
    return Trainer(cfg.model, cfg.train, ListDocumentSource(docs), backend)


@contextmanager
def counting_host_reads(counter: Counter):
    """Count calls of ``HOST_READS`` on tensors made from the main thread while the block runs."""
    main = threading.main_thread().ident
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name, method):
        def read(self, *args, **kwargs):
            if threading.get_ident() == main:
                counter[f"Tensor.{name}"] += 1
            return method(self, *args, **kwargs)
        return read

    for name, method in saved.items():
        setattr(torch.Tensor, name, wrap(name, method))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def profile_steps(trainer, steps: int) -> tuple[Counter, int, float]:
    """Run ``steps`` optimizer steps under the profiler; returns (sync counts by op per run, aten
    ops on the main thread, seconds per step)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    reads: Counter = Counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("main-thread-marker"):
            pass
        with counting_host_reads(reads):
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            seconds = (time.perf_counter() - t0) / steps
    events = prof.events()
    main = next(e.thread for e in events if e.name == "main-thread-marker")
    names = Counter(e.name for e in events if e.thread == main)
    # An op calling an overload of itself (repeat_interleave) is one read.
    outer = Counter(e.name for e in events if e.thread == main and e.name in SYNC_OPS
                    and (e.cpu_parent is None or e.cpu_parent.name != e.name))
    syncs = Counter({op: outer[op] for op in SYNC_OPS if outer[op]})
    syncs.update(reads)
    aten = sum(n for name, n in names.items() if name.startswith("aten::"))
    return syncs, aten, seconds


def count_per_step(preset: str, micro_batches: int, steps: int = 2, warmup: int = 2,
                   dropout: bool = False, timed: int = 0) -> dict:
    """Syncs and aten ops per optimizer step of ``preset`` with ``micro_batches`` micro-batches;
    with ``timed``, the median step time of that many further steps without the profiler."""
    trainer = make_trainer(step_config(preset, micro_batches, dropout=dropout))
    try:
        for _ in range(warmup):
            trainer.train_step()
        syncs, aten, seconds = profile_steps(trainer, steps)
        if timed:
            seconds = statistics.median(trainer.train_step()["step_time_s"] for _ in range(timed))
    finally:
        trainer._drop_prefetch()
        if trainer._executor is not None:
            trainer._executor.shutdown()
    return {"preset": preset, "micro_batches": micro_batches,
            "syncs": sum(syncs.values()) / steps, "by_op": {k: v / steps for k, v in sorted(syncs.items())},
            "aten_ops": aten / steps, "step_s": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--micro-batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--steps", type=int, default=2, help="profiled steps (after --warmup steps)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dropout", action="store_true", help="keep the preset's dropout (see the docstring)")
    p.add_argument("--timed", type=int, default=5,
                   help="steps timed after the profiled ones, without the profiler (0: the profiled steps' time)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    timing = f"median of {args.timed} steps without the profiler" if args.timed else "the profiled steps"
    print(f"# per optimizer step, main thread, 32 x 32 tokens per step, dropout "
          f"{'as the preset' if args.dropout else '0'}, torch {torch.__version__}, {args.threads} threads; "
          f"step s: {timing}")
    header = f"{'preset':<7} {'micro':>5} {'syncs':>6} {'aten ops':>9} {'step s':>7}  syncs by op"
    print(header)
    print("-" * len(header))
    for preset in args.presets:
        for k in args.micro_batches:
            r = count_per_step(preset, k, args.steps, args.warmup, args.dropout, args.timed)
            ops = ", ".join(f"{name} {n:g}" for name, n in r["by_op"].items()) or "-"
            print(f"{preset:<7} {k:>5} {r['syncs']:>6g} {r['aten_ops']:>9,.0f} {r['step_s']:>7.3f}  {ops}",
                  flush=True)


if __name__ == "__main__":
    main()
