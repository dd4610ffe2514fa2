"""A two-rank gloo run of the DeepSpeed backend that counts the gradient collectives of each
optimizer step (the launch tests spawn ``worker``; no Ray, the process group is made here)."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import torch
import torch.distributed as dist

# The collectives DeepSpeed's engine and ZeRO optimizers call (through the ``deepspeed.comm``
# package), and torch.distributed's, which other code may call directly.
DS_COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "inference_all_reduce", "reduce", "reduce_scatter",
                  "reduce_scatter_fn", "reduce_scatter_tensor", "all_to_all_single")
TORCH_COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor",
                     "_reduce_scatter_base", "all_to_all_single")
# Larger than any scalar the loop or LAMB reduces (counts, sums, per-parameter norms), smaller than
# the tiny model's gradient bucket: a collective over more elements carries gradients.
GRADIENT_ELEMENTS = 10_000


def overrides(stage: int, micro_batches: int, world: int) -> list[str]:
    """A tiny fp32 run without dropout whose 512-token global batch is ``micro_batches`` micro-batches
    on each of ``world`` ranks (the plain loop runs it with ``world`` = 1)."""
    return ["train.precision=fp32", "train.device=cpu", "train.seq_len_schedule=false", "train.seq_len=32",
            "train.batch_tokens_start=512", "train.batch_tokens_end=512",
            f"train.micro_batch_tokens={512 // world // micro_batches}", "train.steps=3", "train.validate_every=0",
            "train.valid_examples=0", "train.prefetch=false", "train.word_milestones=[]",
            "model.hidden_dropout=0.0", "model.attention_dropout=0.0", f"launch.zero_stage={stage}"]


def documents() -> list[list[int]]:
    """Arithmetic token sequences (as the launch tests' corpus)."""
    rng = np.random.default_rng(0)
    return [((rng.integers(16, 400) + 3 * np.arange(rng.integers(8, 60))) % 496 + 16).tolist() for _ in range(200)]


class Counter:
    """While active, wraps the collectives of ``deepspeed.comm`` and ``torch.distributed`` and counts,
    by name, those that carry gradients; a torch call made inside a ``deepspeed.comm`` one is the
    same collective and is not counted again."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self._saved = []
        self._depth = 0

    def __enter__(self):
        import deepspeed.comm

        for module, names, outer in ((deepspeed.comm, DS_COLLECTIVES, True), (dist, TORCH_COLLECTIVES, False)):
            for name in names:
                if hasattr(module, name):
                    fn = getattr(module, name)
                    self._saved.append((module, name, fn))
                    setattr(module, name, self._wrap(name, fn, outer))
        return self

    def __exit__(self, *exc):
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)

    def _wrap(self, name, fn, outer):
        def counted(*args, **kwargs):
            tensors = [t for v in (*args, *kwargs.values())
                       for t in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(t, torch.Tensor)]
            if self._depth == 0 and sum(t.numel() for t in tensors) > GRADIENT_ELEMENTS:
                self.counts[name] += 1
            self._depth += outer
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= outer

        return counted


def worker(rank: int, world: int, port: int, cases: list[tuple[int, int]], out: str) -> None:
    """Rank ``rank``: for each (ZeRO stage, micro-batches per rank) train 3 steps through the DeepSpeed
    backend, counting gradient collectives per step; rank 0 writes losses, gradient norms, counts
    and the final weights to ``out`` (JSON + a .pt beside it)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from common.config import load_config
    from gptbert.data import ListDocumentSource
    from gptbert.distributed.deepspeed_backend import build_deepspeed_backend
    from gptbert.trainer import Trainer

    results, weights = {}, {}
    try:
        for stage, micro in cases:
            cfg = load_config("tiny", overrides=overrides(stage, micro, world))
            backend = build_deepspeed_backend(cfg.model, cfg.train, cfg.launch, torch.device("cpu"), rank, world)
            trainer = Trainer(cfg.model, cfg.train, ListDocumentSource(documents()), backend)
            steps = []
            for _ in range(cfg.train.steps):
                with Counter() as counter:
                    m = trainer.train_step()
                steps.append({"loss": m["loss"], "grad_norm": m["grad_norm"], "micro_batches": m["micro_batches"],
                              "collectives": dict(counter.counts)})
            results[f"{stage}/{micro}"] = steps
            if stage < 3:  # ZeRO-3 ranks hold partitions only
                weights[f"{stage}/{micro}"] = {n: p.detach().clone() for n, p in backend.engine.module.named_parameters()}
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
            torch.save(weights, out + ".pt")
    finally:
        dist.destroy_process_group()
