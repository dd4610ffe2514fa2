"""Micro-batches: a global batch gives the same loss and gradients however it is split, and
``train.micro_batch_tokens: auto`` finds the largest micro-batch that fits a memory budget.

(tests/test_objective.py checks the loss of micro-batches summed over ranks; here the whole
``Trainer.train_step`` is run, and the gradients and the optimizer step are compared too.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.config import ConfigError, ModelConfig, TrainConfig
from gptbert.data import ListDocumentSource
from gptbert.objective import CPU_MICRO_BATCH_TOKENS
from gptbert.device import (DeviceError, fit_micro_batch, fit_micro_batch_tokens,
                            max_micro_sequences, probe_batch, probe_step, resolve_micro_batch_tokens)
from gptbert.model import GPTBERT
from gptbert.objective import IGNORE
from gptbert.optim import build_optimizer
from gptbert.trainer import LocalBackend, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = ModelConfig(vocab_size=512, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                    hidden_dropout=0.0, attention_dropout=0.0)
SEQ, GLOBAL_SEQUENCES = 32, 16


class GradientTap(LocalBackend):
    """The plain backend, keeping a copy of the accumulated gradients before it clips and steps."""

    def step(self, lr: float) -> float:
        self.grads = {n: p.grad.detach().clone() for n, p in self.module.named_parameters() if p.grad is not None}
        return super().step(lr)


def corpus(seed=0):
    rng = np.random.default_rng(seed)
    return ListDocumentSource([rng.integers(16, 512, size=int(rng.integers(5, 90))) for _ in range(60)])


def one_step(fraction: float, micro_sequences: int):
    tc = TrainConfig(steps=4, seq_len=SEQ, seq_len_schedule=False, batch_tokens_start=GLOBAL_SEQUENCES * SEQ,
                     batch_tokens_end=GLOBAL_SEQUENCES * SEQ, micro_batch_tokens=micro_sequences * SEQ,
                     causal_fraction=fraction, precision="fp32", prefetch=False, valid_examples=0, device="cpu")
    torch.manual_seed(0)
    model = GPTBERT(MODEL)
    backend = GradientTap(model, build_optimizer(model, tc), tc.grad_clip)
    metrics = Trainer(MODEL, tc, corpus(), backend).train_step()
    return metrics, backend.grads, dict(model.named_parameters())


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.25], ids=["masked-only", "causal-only", "mixed"])
def test_one_global_batch_is_the_same_objective_for_1_2_and_8_micro_batches(fraction):
    runs = {n: one_step(fraction, GLOBAL_SEQUENCES // n) for n in (1, 2, 8)}
    ref_metrics, ref_grads, ref_weights = runs[1]
    kinds = {0.0: ["loss_masked"], 1.0: ["loss_causal"], 0.25: ["loss_masked", "loss_causal"]}[fraction]
    for key in kinds:
        assert math.isfinite(ref_metrics[key])
    assert len(ref_grads) == len(ref_weights)  # every parameter received a gradient
    for n, (metrics, grads, weights) in runs.items():
        assert metrics["micro_batches"] == n and metrics["batch_size"] == GLOBAL_SEQUENCES
        for key in ["loss", "grad_norm"] + kinds:
            assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5), (n, key)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7 + 1e-5 * float(g.abs().max()),
                                       msg=lambda m: f"{n} micro-batches, {name}: {m}")
        # (The weights after the step are not compared: Adam's first step is lr * g / |g|, so a
        # gradient element within rounding of 0 may step either way.)


# ----------------------------------------------------------------------------- the search


@pytest.mark.parametrize("base, per, budget, cap", [
    (1000, 100, 1000 + 100 * 37, 1024),   # 37 fit
    (1000, 100, 1000 + 100 * 64, 1024),   # exactly a power of two
    (1000, 100, 1000 + 100 * 64 - 1, 1024),
    (0, 7, 7 * 300, 200),                 # the cap binds
    (50, 3, 53, 16),                      # only one fits
    (0, 1, 10**9, 1),                     # cap of one
])
def test_search_finds_the_largest_size_within_the_budget(base, per, budget, cap):
    calls = []

    def peak(n):
        calls.append(n)
        return base + per * n

    fit = fit_micro_batch(cap, budget, peak, seq_len=512)
    expected = min(cap, (budget - base) // per)
    assert fit.sequences == expected and fit.tokens == expected * 512
    assert fit.peak_bytes == base + per * expected <= budget
    assert all(1 <= n <= cap for n in calls) and len(calls) == len(set(calls))  # nothing measured twice
    assert len(calls) <= 2 * math.ceil(math.log2(cap)) + 1 if cap > 1 else len(calls) == 1


def test_an_allocation_failure_is_a_size_that_does_not_fit():
    def peak(n):
        if n > 45:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return n

    fit = fit_micro_batch(512, 10**6, peak)
    assert fit.sequences == 45
    assert (46, None) in fit.probes  # the failure is recorded, the search went on


def test_other_errors_are_not_taken_for_lack_of_memory():
    def peak(n):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        fit_micro_batch(64, 10**6, peak)


def test_nothing_fits_is_an_error_naming_the_field():
    tc = TrainConfig(seq_len=64, seq_len_schedule=False, batch_tokens_start=4096, batch_tokens_end=4096)
    with pytest.raises(DeviceError) as err:
        fit_micro_batch_tokens(tc, MODEL, "cpu", measure=lambda n: 10**9, capacity_bytes=10**8)
    assert err.value.field == "train.micro_batch_tokens" and "not even one sequence" in str(err.value)


def test_the_probe_measures_the_real_model_and_the_search_stays_under_budget():
    """The memory measure here is real: the bytes autograd keeps for backward during the probe's
    training step of the real model (on CPU, where no allocator peak is kept), plus weights and
    gradients. It grows with the micro-batch; the chosen size fits and one more does not."""
    tc = TrainConfig(seq_len=SEQ, seq_len_schedule=False, batch_tokens_start=64 * SEQ, batch_tokens_end=64 * SEQ,
                     causal_fraction=0.25, precision="fp32")
    torch.manual_seed(0)
    model = GPTBERT(MODEL).train()
    weights = 2 * 4 * sum(p.numel() for p in model.parameters())
    measured = {}

    def saved_bytes(n):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            probe_step(model, probe_batch(MODEL, tc, n), tc, None)
        assert all(p.grad is not None for p in model.parameters())
        model.zero_grad(set_to_none=True)
        measured[n] = weights + sum(storages.values())
        return measured[n]

    sizes = list(range(1, 65))
    table = [saved_bytes(n) for n in sizes]
    assert all(a < b for a, b in zip(table, table[1:]))  # more sequences, more memory
    growth = [b - a for a, b in zip(table[8:], table[9:])]
    assert max(growth) < 1.5 * min(growth)  # about linear (a causal row costs more than a masked one)
    budget = table[19] + (table[20] - table[19]) // 2  # 20 sequences fit, 21 do not
    measured.clear()
    tokens = resolve_micro_batch_tokens(tc, MODEL, "cpu", measure=saved_bytes, capacity_bytes=budget, headroom=0.0)
    assert tokens == 20 * SEQ
    assert len(measured) <= 13  # a search, not a scan of the 64 sizes
    # Headroom leaves a share of the capacity unused.
    assert resolve_micro_batch_tokens(tc, MODEL, "cpu", measure=saved_bytes, capacity_bytes=budget,
                                      headroom=0.12) < tokens


def test_probe_batch_is_a_full_training_micro_batch_of_the_run():
    tc = TrainConfig(seq_len=64, seq_len_stages=[16, 32, 64], batch_tokens_start=4096, batch_tokens_end=8192,
                     causal_fraction=0.25, mask_rate_start=0.3, mask_rate_end=0.15)
    batch = probe_batch(MODEL, tc, 12)
    assert batch.input_ids.shape == (12, 64)  # the run's longest sequence
    assert int(batch.causal.sum()) == 3  # the run's causal mix
    assert bool((batch.segment_ids != 0).all())  # no padding: every slot costs memory
    masked = ~batch.causal
    has = batch.target_ids[masked] != IGNORE
    assert 0.2 < float(has.float().mean()) < 0.4  # masked rows at the highest mask rate (0.3)


def test_resolution_of_the_setting():
    tc = TrainConfig(seq_len=512)
    assert tc.micro_batch_tokens == "auto"
    assert resolve_micro_batch_tokens(tc, MODEL, "cpu") == CPU_MICRO_BATCH_TOKENS == 8192
    long = TrainConfig(seq_len=3000, seq_len_schedule=False, batch_tokens_start=30000, batch_tokens_end=30000)
    assert resolve_micro_batch_tokens(long, MODEL, "cpu") == 6000  # whole sequences
    fixed = TrainConfig(micro_batch_tokens=4096)
    assert resolve_micro_batch_tokens(fixed, MODEL, "cpu") == 4096
    # The cap: a rank's share of the largest global batch, in sequences of the longest length.
    assert max_micro_sequences(tc) == 4_194_304 // 512
    assert max_micro_sequences(tc, world_size=8) == 4_194_304 // 512 // 8
    assert resolve_micro_batch_tokens(tc, MODEL, "cpu", world_size=8, measure=lambda n: n,
                                      capacity_bytes=10**12) == 4_194_304 // 8


def test_config_accepts_auto_or_at_least_one_sequence_and_keeps_it_out_of_the_identity():
    from common.config import load_config

    assert load_config("tiny", overrides=["train.micro_batch_tokens=auto"]).train.micro_batch_tokens == "auto"
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        load_config("tiny", overrides=["train.micro_batch_tokens=most"])
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        TrainConfig(seq_len=512, micro_batch_tokens=256)
    a, b = TrainConfig(micro_batch_tokens=8192), TrainConfig(micro_batch_tokens="auto")
    assert a.identity_dict() == b.identity_dict()
    assert a.identity_dict() != TrainConfig(micro_batch_tokens=8192, lr=1e-3).identity_dict()
