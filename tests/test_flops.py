"""The analytic FLOP formula against torch's FlopCounterMode on a real training step."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from common.config import ModelConfig
from gptbert.flops import flops_per_token, forward_flops_breakdown, parameter_count
from gptbert.kernels import apply_kernels
from gptbert.model import GPTBERT, build_blocked_mask


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend


@pytest.mark.parametrize("gate, causal", [(True, False), (True, True), (False, False)])
def test_formula_matches_flop_counter(gate, causal, monkeypatch):
    import gptbert.kernels.geglu

    # The counter is a dispatch mode: dynamo skips a frame called under it and never compiles that
    # code again in this process, which would leave later tests without the compiled CPU kernel.
    # Its eager ops hold the same matmuls (none).
    monkeypatch.setattr(gptbert.kernels.geglu.geglu_norm, "compiled", False)
    cfg = ModelConfig(vocab_size=300, hidden_size=48, num_layers=2, num_heads=3, intermediate_size=80,
                      gate=gate, attention_impl="fused")
    torch.manual_seed(0)
    model = apply_kernels(GPTBERT(cfg)).train()  # the step as training builds it
    B, T = 3, 24
    ids = torch.randint(0, 300, (B, T))
    blocked = build_blocked_mask(torch.ones(B, T, dtype=torch.long), torch.full((B,), causal))
    targets = torch.rand(B, T) < (1.0 if causal else 0.25)
    n_targets = int(targets.sum())
    with FlopCounterMode(display=False) as counter:
        hidden = model(ids, blocked)
        logits = model.lm_logits(hidden[targets])
        forward = counter.get_total_flops()
        torch.nn.functional.cross_entropy(logits, ids[targets]).backward()
        total = counter.get_total_flops()
    fraction = n_targets / (B * T)
    assert forward == pytest.approx(B * T * flops_per_token(cfg, T, fraction, False, batch_size=B), rel=1e-9)
    # The model FLOPs leave out layer weighting's weighted sums (matrix-vector products the counter
    # ignores too), but its backward takes every mix's weight gradient in one product the counter
    # sees: (blocks + 1) history rows . blocks gradient rows, each B*T*H long.
    blocks = 2 * cfg.num_layers
    mix_gradients = 2 * (blocks + 1) * blocks * B * T * cfg.hidden_size
    model_flops = B * T * flops_per_token(cfg, T, fraction, True, batch_size=B)
    assert total == pytest.approx(model_flops + mix_gradients, rel=1e-9)


def test_small_preset_flops_are_in_the_expected_range():
    # STACK.md: about 178 MFLOP per training token for `small` at 25% targets, seq 128.
    cfg = ModelConfig()
    per_token = flops_per_token(cfg, 128, 0.25, True, batch_size=8)
    assert 170e6 < per_token < 185e6
    # The bulk is 6 x (non-embedding matmul parameters).
    body = 12 * (384 * 768 * 2 + 384 * 384 + 384 * 2560 + 1280 * 384)
    assert abs(per_token - 6 * body) / per_token < 0.1
    parts = forward_flops_breakdown(cfg, 128, 0.0)
    assert parts["lm_head"] == 0.0 and parts["ffn"] == 12 * 2 * (384 * 2560 + 1280 * 384)
    with pytest.raises(ValueError, match="target_fraction"):
        flops_per_token(cfg, 128, 1.5)


def test_model_info_command(capsys):
    import json

    from cli.main import main

    assert main(["model-info", "small", "--seq-len", "128"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 29_892_164 == parameter_count(ModelConfig())
    assert info["config"]["hidden_size"] == 384
    masked, causal = info["flops"]["masked"], info["flops"]["causal"]
    assert masked["target_fraction"] == 0.15 and causal["target_fraction"] == 1.0
    assert causal["train_flops_per_token"] > masked["train_flops_per_token"]
    assert masked["train_flops_per_token"] == pytest.approx(3 * masked["forward_flops_per_token"])


def test_one_flop_count_for_the_log_the_run_and_the_benchmarks(monkeypatch):
    """The training log's MFU, a run's total and benchmarks/gpu_rows.py's MFU are one count: the
    step's micro-batching decides how often the position table is projected."""
    import importlib.util
    import sys
    from pathlib import Path

    from common.config import TrainConfig, preset
    from gptbert.flops import step_flops_per_token, training_flops
    from gptbert.metrics import MetricsCallback

    cfg, T = preset("small").model, 128
    step = {"seq_len": T, "mask_rate": 0.3, "batch_size": 64, "micro_batches": 4, "tokens_per_s": 1e5}
    per_token = step_flops_per_token(cfg, T, 0.25, 0.3, batch_size=64, micro_batches=4)
    assert per_token == flops_per_token(cfg, T, 0.25 + 0.75 * 0.3, True, batch_size=16)
    assert per_token < step_flops_per_token(cfg, T, 0.25, 0.3, batch_size=64, micro_batches=64)
    log = MetricsCallback(cfg, 0.25, 1, "NVIDIA H100 80GB HBM3", bf16=True)
    logged = dict(step)
    log(logged, 1)
    assert logged["flops_per_s"] == 1e5 * per_token
    spec = importlib.util.spec_from_file_location("gpu_rows", Path(__file__).parents[1] / "benchmarks" / "gpu_rows.py")
    rows = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_rows", rows)  # its dataclasses look their module up
    spec.loader.exec_module(rows)
    assert rows.row_mfu(cfg, 0.25, step, 1e5, log.peak) == logged["mfu"]
    tc = TrainConfig(steps=1, seq_len=T, seq_len_schedule=False, batch_tokens_start=64 * T, batch_tokens_end=64 * T,
                     micro_batch_tokens=16 * T, causal_fraction=0.25, mask_rate_start=0.3, mask_rate_end=0.3)
    assert training_flops(cfg, tc) == pytest.approx(per_token * 64 * T, rel=1e-12)
