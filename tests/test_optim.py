"""LAMB, parameter groups, the learning-rate schedule, EMA, precision selection, clipping."""

from __future__ import annotations

import math

import pytest
import torch

from common.config import ModelConfig, TrainConfig
from gptbert.optim import EMA, LAMB, lr_at, param_groups, resolve_precision, schedule_lr


# Tiny tensors: extra threads only contend with other processes (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_lamb_one_step_matches_hand_computation():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, -2.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([0.5, -0.5], dtype=torch.float64))
    opt = LAMB([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
               lr=0.1, betas=(0.9, 0.98), eps=1e-8)
    w.grad = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    b.grad = torch.tensor([2.0, -0.25], dtype=torch.float64)
    opt.step()
    # Step 1: bias-corrected moments are g and g^2, so the Adam direction is g / (|g| + eps).
    adam_w = [0.5 / (0.5 + 1e-8), -1.0 / (1.0 + 1e-8), 0.0]
    upd = [a + 0.1 * x for a, x in zip(adam_w, [1.0, 2.0, -2.0])]  # weight decay added to the update
    w_norm = math.sqrt(1 + 4 + 4)
    u_norm = math.sqrt(sum(u * u for u in upd))
    trust = w_norm / u_norm
    expected_w = [x - 0.1 * trust * u for x, u in zip([1.0, 2.0, -2.0], upd)]
    assert w.detach().tolist() == pytest.approx(expected_w, abs=1e-12)
    # No-decay group: a plain Adam step, no trust ratio.
    expected_b = [0.5 - 0.1 * 2.0 / (2.0 + 1e-8), -0.5 + 0.1 * 0.25 / (0.25 + 1e-8)]
    assert b.detach().tolist() == pytest.approx(expected_b, abs=1e-12)


def test_lamb_second_step_uses_bias_correction():
    p = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = LAMB([{"params": [p], "weight_decay": 0.0}], lr=0.01, betas=(0.9, 0.98), eps=1e-8)
    p.grad = torch.tensor([1.0], dtype=torch.float64)
    opt.step()
    p.grad = torch.tensor([-3.0], dtype=torch.float64)
    before = p.item()
    opt.step()
    m = (0.9 * 0.1 * 1.0 + 0.1 * -3.0) / (1 - 0.9 ** 2)
    v = (0.98 * 0.02 * 1.0 + 0.02 * 9.0) / (1 - 0.98 ** 2)
    assert p.item() == pytest.approx(before - 0.01 * m / (math.sqrt(v) + 1e-8), abs=1e-12)
    state = opt.state_dict()
    assert state["state"][0]["step"] == 2


def test_param_groups_split_decay_and_no_decay():
    """The paper's groups (by name): biases and LayerNorm parameters without decay; matrices,
    embeddings and the layer-weighting scalars with decay and LAMB's trust ratio."""
    from gptbert.model import GPTBERT

    model = GPTBERT(ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2,
                                intermediate_size=24))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert no_decay_names == {n for n in names.values() if n.endswith("bias")} | {"relative_norm.weight"}
    assert "head_bias" in no_decay_names and "relative_norm.bias" in no_decay_names
    assert {f"layer_weights.{k}" for k in range(4)} <= decay_names  # 1-D, decayed as the paper's alphas
    assert "word_embedding.weight" in decay_names and "relative_embedding" in decay_names
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


def test_sharded_lamb_on_flat_groups_equals_lamb_with_the_papers_groups():
    """ZeRO hands LAMB one flat tensor per parameter group; with the paper's groups the decay group
    now holds the 1-D layer-weighting vectors too. ShardedLAMB with the element layout attached must
    step exactly as LAMB on the separate parameters (per-parameter trust ratios)."""
    from lamb_check import assert_sharded_steps_as_lamb

    from gptbert.model import GPTBERT

    torch.manual_seed(0)
    model = GPTBERT(ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24))
    groups = param_groups(model, 0.1)
    assert_sharded_steps_as_lamb([g["params"] for g in groups], [g["weight_decay"] for g in groups], pad=3)


def test_lamb_takes_one_multi_tensor_pass_off_the_cpu(monkeypatch):
    """On a GPU LAMB steps all parameters in one chunk: the ops per step do not grow with the
    parameter count, and the result is the chunked CPU step's to the bit (the maths is elementwise
    or per parameter). The device's rule is forced onto the CPU here."""
    from torch.profiler import ProfilerActivity, profile

    from gptbert.optim import LAMB

    assert LAMB.chunk_size(LAMB([torch.zeros(1)]), torch.device("cuda")) == float("inf")
    assert LAMB.chunk_size(LAMB([torch.zeros(1)]), torch.device("cpu")) == LAMB.chunk_elements

    def step(n_params, one_pass):
        torch.manual_seed(0)
        params = [torch.randn(300, 300, requires_grad=True) for _ in range(n_params)]
        opt = LAMB([{"params": params, "weight_decay": 0.1}], lr=0.01)
        if one_pass:
            monkeypatch.setattr(opt, "chunk_size", lambda device: float("inf"))
        for p in params:
            p.grad = torch.randn_like(p)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step()
        foreach = sum(1 for e in prof.events() if e.name.startswith("aten::_foreach_"))
        return [p.detach().clone() for p in params], foreach

    chunked, chunked_ops = step(12, one_pass=False)
    whole, ops12 = step(12, one_pass=True)
    assert chunked_ops > ops12  # the CPU's chunks: a pass per ~250K elements
    assert all(torch.equal(a, b) for a, b in zip(chunked, whole))
    _, ops3 = step(3, one_pass=True)
    assert ops3 == ops12  # one pass: a fixed number of multi-tensor ops whatever the parameter count


def test_sharded_lamb_keeps_runs_not_elements():
    """The layout of a flat tensor is kept as its runs of one parameter, no per-element index."""
    from gptbert.optim import ShardedLAMB

    flat = torch.zeros(10, requires_grad=True)
    opt = ShardedLAMB([flat])
    opt.attach_partitions(flat, torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3]), 3)
    lengths, run_param, n, _ = opt._segments[id(flat)]
    assert lengths == [3, 2, 3, 2] and run_param.tolist() == [0, 1, 2, 3] and n == 3


def test_ema_update_is_the_per_parameter_lerp():
    from gptbert.optim import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    ema = EMA(model, decay=0.9)
    expect = {n: t.clone() for n, t in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    for n, p in model.named_parameters():
        assert torch.equal(ema.shadow[n], expect[n].lerp_(p.detach(), 1 - 0.9)), n


def test_lr_schedule_key_steps():
    """The paper's LambdaLR (utils.cosine_schedule_with_warmup_cooldown); the step-by-step comparison
    with the paper's own scheduler is in test_training_parity."""
    total, peak = 1000, 1e-2  # warmup int(16.0) = 16 steps, cooldown 16 steps, cosine in between
    assert lr_at(0, total, peak) == 0.0  # the first step runs at lr 0
    assert lr_at(1, total, peak) == pytest.approx(peak / 16)
    assert lr_at(15, total, peak) == pytest.approx(15 * peak / 16)
    assert lr_at(16, total, peak) == pytest.approx(peak)  # cosine starts at the peak
    assert lr_at(16 + 492, total, peak) == pytest.approx(0.55 * peak)  # progress 1/2 of total - warmup
    # The cosine's progress runs over total - warmup, so it stops above the floor at the cooldown...
    end_of_cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (983 - 16) / 984))
    assert lr_at(983, total, peak) == pytest.approx(end_of_cosine * peak)
    assert end_of_cosine > 0.1
    assert lr_at(984, total, peak) == pytest.approx(0.1 * peak)  # ...which starts at 0.1x
    assert lr_at(992, total, peak) == pytest.approx(0.05 * peak)
    assert lr_at(999, total, peak) == pytest.approx(0.1 * peak / 16)
    assert lr_at(1000, total, peak) == pytest.approx(0.0)
    values = [lr_at(s, total, peak) for s in range(16, 1000)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    cfg = TrainConfig(steps=7812, lr=1.41e-2)
    assert int(0.016 * 7812) == 124  # truncated, as the paper's int(): 124.99 -> 124
    assert schedule_lr(123, cfg) == pytest.approx(1.41e-2 * 123 / 124)
    assert schedule_lr(124, cfg) == pytest.approx(1.41e-2)


def test_ema_update_and_copy():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, -2.0]]))
    ema.update(model)
    expected = [0.999 * 1.0 + 0.001 * 3.0, 0.999 * 2.0 + 0.001 * -2.0]
    assert ema.state_dict()["weight"][0].tolist() == pytest.approx(expected)
    ema.copy_to(model)
    assert model.weight[0].tolist() == pytest.approx(expected)


def test_precision_selection_on_cpu(monkeypatch):
    from gptbert.optim import AUTO_PRECISION_ENV, cpu_supports_bf16

    monkeypatch.delenv(AUTO_PRECISION_ENV, raising=False)
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    # auto: bf16 only where the CPU computes it natively (AVX-512 BF16 / AMX).
    assert resolve_precision("auto", cpu) is (torch.bfloat16 if cpu_supports_bf16() else None)
    if torch.backends.cpu.get_cpu_capability() == "AVX2":
        assert resolve_precision("auto", cpu) is None
    # The environment switch decides what auto means (e.g. the suite run as on the other CPU kind);
    # explicit values are never overridden.
    for forced, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("BF16", torch.bfloat16)):
        monkeypatch.setenv(AUTO_PRECISION_ENV, forced)
        assert resolve_precision("auto", cpu) is dtype
        assert resolve_precision("fp32", cpu) is None and resolve_precision("bf16", cpu) is torch.bfloat16
    monkeypatch.setenv(AUTO_PRECISION_ENV, "fp16")
    with pytest.raises(ValueError, match=AUTO_PRECISION_ENV):
        resolve_precision("auto", cpu)


def test_plain_backend_clips_at_global_norm():
    from gptbert.trainer import LocalBackend

    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    backend = LocalBackend(model, torch.optim.SGD(model.parameters(), lr=1.0), grad_clip=2.0)
    model.weight.grad = torch.tensor([[3.0, 4.0, 0.0]])  # norm 5
    norm = float(backend.step(lr=0.5))  # a 0-d tensor on the device, read here
    assert norm == pytest.approx(5.0)
    # clipped to norm 2, then an SGD step with the scheduled lr 0.5
    assert model.weight[0].tolist() == pytest.approx([-0.5 * 1.2, -0.5 * 1.6, 0.0], rel=1e-5)
    assert model.weight.grad is None


@pytest.mark.parametrize("backend, device, expected", [
    ("nccl", "cpu", "cuda"),          # ZeRO offload: CPU partitions, NCCL group
    ("nccl", "cuda:1", "cuda:1"),
    ("gloo", "cpu", "cpu"),
    ("gloo", "cuda:0", "cpu"),
    ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
    ("cpu:gloo,cuda:nccl", "cuda:0", "cuda:0"),
    ("cuda:nccl", "cpu", "cuda"),
])
def test_trust_ratio_norms_are_reduced_on_the_communication_device(backend, device, expected):
    from gptbert.optim import collective_device

    assert collective_device(backend, torch.device(device)) == torch.device(expected)


def test_sharded_lamb_reduces_through_a_real_process_group(tmp_path):
    """ShardedLAMB under an initialised (gloo, one-rank) process group: its norms go through
    all_reduce on the group's device and back, and the step is plain LAMB's."""
    import torch.distributed as dist

    from gptbert.optim import ShardedLAMB

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        mats = [torch.randn(5, 6, requires_grad=True), torch.randn(3, 5, requires_grad=True)]
        flat = torch.cat([p.detach().reshape(-1) for p in mats]).requires_grad_()
        seg = torch.cat([torch.full((p.numel(),), i) for i, p in enumerate(mats)])
        lamb = LAMB([{"params": mats, "weight_decay": 0.1}], lr=0.05)
        sharded = ShardedLAMB([{"params": [flat], "weight_decay": 0.1}], lr=0.05)
        sharded.attach_partitions(flat, seg, len(mats), dist.group.WORLD)
        for _ in range(2):
            grads = [torch.randn_like(p) for p in mats]
            for p, g in zip(mats, grads):
                p.grad = g
            flat.grad = torch.cat([g.reshape(-1) for g in grads])
            lamb.step()
            sharded.step()
        assert torch.allclose(flat.detach(), torch.cat([p.detach().reshape(-1) for p in mats]), atol=1e-6, rtol=1e-5)
    finally:
        dist.destroy_process_group()
