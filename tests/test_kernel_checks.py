"""A compiled CPU kernel is used only where it has been checked against the plain maths on the
running CPU (gptbert/kernels/compiled.py: ``self_check``, verdicts cached per CPU kind and torch
release), and the project's kernels pass that check on every CPU code path this machine can build:
inductor's AVX2 code (``cpp.simdlen=256``, which every x86-64 CPU of ours runs) and AVX-512's where
the CPU has it."""

from __future__ import annotations

import warnings

import pytest
import torch

import gptbert.kernels.compiled as compiled
import gptbert.kernels.cross_entropy as cross_entropy
import gptbert.kernels.geglu as geglu
from gptbert.model import GPTBERT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def checks(tmp_path, monkeypatch):
    """A verdict cache of the test's own, so that no verdict leaks into the user's cache."""
    store = compiled.KernelChecks(tmp_path / "kernel-checks.json")
    monkeypatch.setattr(compiled, "CHECKS", store)
    return store


def _double(x):
    return x * 2.0


def _double_wrong(x):  # what a miscompiled kernel looks like: right shape, wrong values
    return x * 2.0 + (x > 0.5) * 0.25


def _count_checks(monkeypatch) -> list:
    calls = []
    real = compiled.self_check

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(compiled, "self_check", counted)
    return calls


def test_a_kernel_that_differs_from_the_plain_maths_is_not_used_and_says_why(checks):
    kernel = compiled.CompiledOnCpu(_double_wrong, _double, "test doubling")
    x = torch.rand(50, 16, requires_grad=True)
    with pytest.warns(UserWarning, match=r"compiled CPU test doubling kernel differs from the plain maths on this "
                                         r"CPU \(.*torch .*relative error .* in the output at \d+ rows"):
        out = kernel(x)
    assert torch.equal(out, _double(x))  # the eager maths, not the compiled kernel's
    (verdict,) = checks._read().values()
    assert verdict["ok"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same signature: no second check, no second warning
        y = torch.rand(7, 16, requires_grad=True)
        assert torch.equal(kernel(y), _double(y))
    assert list(kernel.trusted.values()) == [False]


def test_a_wrong_gradient_is_caught_too(checks):
    class WrongBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2.0

        @staticmethod
        def backward(ctx, grad):
            return grad * 2.5

    kernel = compiled.CompiledOnCpu(lambda x: x * 2.0, WrongBackward.apply, "test gradient")
    with pytest.warns(UserWarning, match="in the gradient at"):
        kernel(torch.rand(9, 4, requires_grad=True))
    assert list(kernel.trusted.values()) == [False]


def test_verdicts_are_cached_per_cpu_kind_and_torch_release(checks, monkeypatch):
    calls = _count_checks(monkeypatch)
    x = torch.rand(40, 8, requires_grad=True)
    first = compiled.CompiledOnCpu(_double, _double, "test cache")
    assert torch.equal(first(x), _double(x))
    assert len(calls) == 1 and first.trusted == {"torch.float32x8": True}
    (key,) = checks._read()
    assert compiled.cpu_kind() in key and f"torch {torch.__version__}" in key
    # A later process (a new kernel object) on the same CPU and torch reuses the verdict ...
    second = compiled.CompiledOnCpu(_double, _double, "test cache")
    second(x)
    assert len(calls) == 1 and second.trusted == {"torch.float32x8": True}
    # ... another feature size or another CPU kind is checked anew.
    second(torch.rand(40, 12, requires_grad=True))
    monkeypatch.setattr(compiled, "cpu_kind", lambda: "another-isa/avx2")
    compiled.CompiledOnCpu(_double, _double, "test cache")(x)
    assert len(calls) == 3 and len(checks._read()) == 3


def test_a_cached_failure_keeps_the_plain_maths_without_checking_again(checks, monkeypatch):
    calls = _count_checks(monkeypatch)
    x = torch.rand(30, 8, requires_grad=True)
    key = f"test failed|torch.float32x8|{compiled.cpu_kind()}|torch {torch.__version__}"
    checks.put(key, {"ok": False, "why": "relative error 0.3 in the output at 30 rows, tolerance 0.0001"})
    kernel = compiled.CompiledOnCpu(_double_wrong, _double, "test failed")
    with pytest.warns(UserWarning, match="relative error 0.3 in the output"):
        out = kernel(x)
    assert calls == [] and torch.equal(out, _double(x))


def test_the_check_leaves_the_random_stream_alone(checks):
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    compiled.CompiledOnCpu(_double, _double, "test rng")(torch.ones(20, 8, requires_grad=True))
    assert torch.equal(torch.rand(4), expected)


def test_an_unreadable_cache_costs_only_a_check(tmp_path, monkeypatch):
    bad = tmp_path / "kernel-checks.json"
    bad.write_text("{not json")
    monkeypatch.setattr(compiled, "CHECKS", compiled.KernelChecks(bad))
    kernel = compiled.CompiledOnCpu(_double, _double, "test unreadable")
    kernel(torch.rand(10, 8, requires_grad=True))
    assert kernel.trusted == {"torch.float32x8": True}
    assert len(compiled.KernelChecks(bad)._read()) == 1  # rewritten whole


def _simd_widths() -> list[int]:
    from torch._inductor import cpu_vec_isa

    widths = {isa.bit_width() for isa in cpu_vec_isa.valid_vec_isa_list()}
    return sorted(w for w in widths if w in (256, 512))


@pytest.mark.slow
@pytest.mark.parametrize("simdlen", _simd_widths())
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_the_project_kernels_pass_the_check_on_each_cpu_code_path(simdlen, autocast, checks):
    """Inductor's code for AVX2 (256-bit) and AVX-512 (512-bit) vectors, built on this CPU: the
    feed-forward and LM-loss kernels as training calls them, each compiled afresh for that width."""
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    x = (torch.randn(70, 2 * 40) * 2).requires_grad_()
    logits = (torch.randn(70, 300) * 3).requires_grad_()
    targets = torch.randint(0, 300, (70,))
    torch._dynamo.reset()  # compiled code is cached per function: compile for this width
    try:
        with inductor_config.patch({"cpp.simdlen": simdlen}):
            assert compiled.cpu_kind().startswith("avx2") == (simdlen == 256)
            ffn = compiled.CompiledOnCpu(geglu._geglu_norm_ops, geglu._geglu_norm_eager, "feed-forward")
            loss = compiled.CompiledOnCpu(cross_entropy._loss_terms_ops, GPTBERT.lm_loss_terms, "LM loss")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                inp = x.to(torch.bfloat16) if autocast else x
                ffn(inp, 1e-7)
                loss(logits.to(torch.bfloat16) if autocast else logits, targets)
    finally:
        torch._dynamo.reset()
    assert list(ffn.trusted.values()) == [True] and list(loss.trusted.values()) == [True]
    assert all(v["ok"] for v in checks._read().values()) and len(checks._read()) == 2


def _model_and_batch():
    from common.config import ModelConfig
    from gptbert.kernels import build_model
    from gptbert.model import build_blocked_mask

    cfg = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
                      hidden_dropout=0.1, attention_dropout=0.1)

    def fresh(cfg):  # the same weights every time
        torch.manual_seed(0)
        return build_model(cfg)

    seg = torch.tensor([[1] * 9 + [2] * 11, [1] * 14 + [0] * 6, [1] * 20])
    ids = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(1))
    return cfg, fresh, ids, build_blocked_mask(seg, torch.tensor([False, True, True]))


def test_a_compiled_model_that_differs_from_the_eager_one_is_not_used(checks, monkeypatch):
    cfg, build_model, ids, blocked = _model_and_batch()

    def miscompiled(fn, **kwargs):  # right shapes, wrong values, as a wrong code generator gives
        return lambda *a, **kw: fn(*a, **kw) * 1.1

    # The model's own kernels are process-wide objects: compiled here they would keep the
    # miscompiled function after this test; keep their state to this test.
    for kernel in (geglu.geglu_norm, cross_entropy.lm_loss_terms):
        monkeypatch.setattr(kernel, "compiled", None)
        monkeypatch.setattr(kernel, "trusted", {})
    monkeypatch.setattr(torch, "compile", miscompiled)
    model = compiled.compile_model(build_model(cfg)).train()
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match=r"the compiled model differs from the eager model on this CPU \(.*relative "
                                         r"error .* in the output.*training continues with the eager model"):
        out = model(ids, blocked)
    eager = build_model(cfg).train()
    torch.manual_seed(5)  # the check left the RNG alone: the same dropout masks as an eager step
    assert torch.equal(out, eager(ids, blocked))
    assert model.training and all(m.training for m in model.modules())  # the check's eval mode undone
    (verdict,) = [v for k, v in checks._read().items() if k.startswith("model|")]
    assert verdict["ok"] is False


@pytest.mark.slow
@pytest.mark.parametrize("simdlen", _simd_widths())
def test_what_a_compiled_model_runs_equals_the_eager_model_on_each_cpu_code_path(simdlen, checks):
    """Whichever way the check goes for inductor's code of this width, the model that runs
    computes what the eager model does. (Before the position table was built eagerly, inductor's
    256-bit code built it wrong on torch 2.13 and this failed by 1.7.)"""
    import torch._inductor.config as inductor_config

    cfg, build_model, ids, blocked = _model_and_batch()
    torch._dynamo.reset()
    try:
        with inductor_config.patch({"cpp.simdlen": simdlen}), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = compiled.compile_model(build_model(cfg)).eval()
            with torch.no_grad():
                out = model(ids, blocked)
    finally:
        torch._dynamo.reset()
    with torch.no_grad():
        expected = build_model(cfg).eval()(ids, blocked)
    (verdict,) = [v for k, v in checks._read().items() if k.startswith("model|")]
    assert torch.allclose(out, expected, atol=1e-3, rtol=1e-3), verdict
    assert (model.forward.failed is None) == verdict["ok"]
