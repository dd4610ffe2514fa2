"""gptbert.kernels: each kernel equals the plain model's maths it replaces, forward and backward.

The plain model (``model.kernels: false``) is the one checked against the paper's code
(tests/test_parity.py); these tests carry that check over to the model as training builds it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.config import ModelConfig
from gptbert.kernels import KERNELS, apply_kernels, build_model, geglu
import gptbert.kernels.cross_entropy as cross_entropy
from gptbert.kernels.dropout import CpuDropout, dropout
from gptbert.kernels.geglu import GEGLU
from gptbert.kernels.layer_mix import BufferedLayerWeighting, History
from gptbert.kernels.position_bias import position_bias
from gptbert.model import Attention, FeedForward, GPTBERT, LayerWeighting, build_blocked_mask

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96)


def tiny_model(kernels: bool, seed: int = 0, **changes) -> GPTBERT:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**TINY, "hidden_dropout": 0.0, "attention_dropout": 0.0, **changes})
    model = GPTBERT(cfg)
    with torch.no_grad():  # perturb the zero/one-initialised parameters so every path matters
        for name, p in model.named_parameters():
            if "bias" in name or "layer_weights" in name or "relative_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return apply_kernels(model) if kernels else model


def batch():
    seg = torch.tensor([[1] * 9 + [2] * 11, [1] * 14 + [0] * 6, [1] * 20])
    return torch.randint(0, 512, (3, 20)), build_blocked_mask(seg, torch.tensor([False, True, True]))


def step(model, ids, blocked):
    model.train()
    hidden = model(ids, blocked)
    model.lm_logits(hidden).logsumexp(-1).square().mean().backward()
    return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# -- the whole model -------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("gate, weighting", [(True, True), (False, False)])
def test_model_with_kernels_equals_the_plain_model(impl, gate, weighting):
    ids, blocked = batch()
    h_plain, g_plain = step(tiny_model(False, attention_impl=impl, gate=gate, layer_weighting=weighting), ids, blocked)
    h_fast, g_fast = step(tiny_model(True, attention_impl=impl, gate=gate, layer_weighting=weighting), ids, blocked)
    assert torch.allclose(h_plain, h_fast, atol=1e-5)
    assert g_plain.keys() == g_fast.keys()
    for name in g_plain:
        assert torch.allclose(g_plain[name], g_fast[name], atol=1e-5, rtol=1e-4), name


def test_every_kernel_is_installed_and_the_flag_keeps_the_plain_model():
    fast = build_model(ModelConfig(**TINY, attention_impl="flex", attention_dropout=0.0))
    assert all(type(m) is not torch.nn.Dropout for m in fast.modules())
    assert isinstance(fast.layer_mix, BufferedLayerWeighting)
    assert all(a.position_bias is position_bias for a in fast.modules() if isinstance(a, Attention))
    assert all(f.geglu_norm is geglu.geglu_norm for f in fast.modules() if isinstance(f, FeedForward))
    assert all("attend" in a.__dict__ for a in fast.modules() if isinstance(a, Attention))
    assert fast.lm_loss_terms is cross_entropy.lm_loss_terms
    counts = {name: install(fast) for name, install in KERNELS.items()}  # idempotent: nothing left
    assert counts["dropout"] == 0
    plain = build_model(ModelConfig(**TINY, kernels=False))
    assert isinstance(plain.layer_mix, LayerWeighting) and not isinstance(plain.layer_mix, BufferedLayerWeighting)
    assert all(type(m) is torch.nn.Dropout for m in plain.modules() if isinstance(m, torch.nn.Dropout))
    assert not any("position_bias" in a.__dict__ for a in plain.modules() if isinstance(a, Attention))
    assert "lm_loss_terms" not in plain.__dict__


def test_the_kernels_flag_is_not_part_of_a_model_identity():
    assert ModelConfig(**TINY, kernels=False).identity_dict() == ModelConfig(**TINY).identity_dict()


# -- position bias ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_mask", [False, True])
def test_position_bias_kernel_equals_the_plain_gathers(dtype, with_mask):
    torch.manual_seed(0)
    B, h, T, R = 2, 3, 7, 5
    idx = torch.randint(0, R, (T, T)).expand(B, h, T, T)
    additive = torch.where(torch.rand(B, 1, T, T) < 0.3, float("-inf"), 0.0).to(dtype) if with_mask else None
    results = []
    for fn in (Attention.position_bias, position_bias):
        c2p = torch.randn(B, h, T, R, dtype=dtype, requires_grad=True)
        p2c = torch.randn(B, h, T, R, dtype=dtype, requires_grad=True)
        torch.manual_seed(1)
        c2p.data, p2c.data = torch.randn(B, h, T, R).to(dtype), torch.randn(B, h, T, R).to(dtype)
        out = fn(c2p, p2c, idx, additive)
        out.masked_fill(torch.isinf(out), 0.0).float().mul(torch.arange(T * T).view(T, T)).sum().backward()
        results.append((out, c2p.grad, p2c.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# -- GEGLU + LayerNorm ------------------------------------------------------------------------------


def test_geglu_kernel_in_eager_mode_equals_the_plain_block():
    torch.manual_seed(0)
    x = (torch.randn(2, 5, 48) * 2).requires_grad_()
    grad = torch.randn(2, 5, 24)
    outs = []
    for fn in (FeedForward.geglu_norm, geglu._geglu_norm_eager):
        x.grad = None
        out = fn(x, 1e-5)
        out.backward(grad)
        outs.append((out.detach(), x.grad.clone()))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-6)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-5)


# -- layer weighting, dropout, compiled kernel (moved from test_model.py) ---------------------------


def test_layer_mix_matches_naive_weighted_sums_in_values_and_gradients():
    torch.manual_seed(0)
    n_blocks, shape = 5, (2, 3, 4)
    weights = [torch.nn.Parameter(torch.linspace(-1, 1, 4 * 4).view(4, 4) * (0.3 + 0.1 * k)) for k in range(n_blocks)]
    alphas = [torch.nn.Parameter(torch.randn(k + 2)) for k in range(n_blocks)]
    x0 = torch.randn(shape, requires_grad=True)

    def run(custom: bool):
        # The kernel against the plain model's LayerWeighting, through the same interface.
        mix = BufferedLayerWeighting() if custom else LayerWeighting()
        state, x = mix.begin(x0, alphas), x0
        for k in range(n_blocks):
            x = mix(state, x, torch.tanh(x @ weights[k]), k)
        return x

    params = [x0, *weights, *alphas]
    out_naive = run(False)
    grads_naive = torch.autograd.grad(out_naive.square().sum(), params)
    out_custom = run(True)
    loss = out_custom.square().sum()
    grads_custom = torch.autograd.grad(loss, params, retain_graph=True)
    assert torch.allclose(out_naive, out_custom, atol=1e-6)
    for a, b in zip(grads_naive, grads_custom):
        assert torch.allclose(a, b, atol=1e-5)
    # A second backward through the same graph starts from a clean gradient buffer.
    again = torch.autograd.grad(loss, params)
    for a, b in zip(grads_naive, again):
        assert torch.allclose(a, b, atol=1e-5)



def test_geglu_function_matches_autograd():
    x = torch.randn(3, 5, 8, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(GEGLU.apply, (x,))
    value, gate = x.chunk(2, dim=-1)
    assert torch.allclose(GEGLU.apply(x), value * torch.nn.functional.gelu(gate, approximate="tanh"))


# -- the CPU dropout ------------------------------------------------------------------------------


def test_dropout_is_identity_when_off():
    x = torch.randn(4, 8)
    assert dropout(x, 0.1, False) is x
    assert dropout(x, 0.0, True) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_drops_at_rate_p_and_scales_the_rest(dtype):
    torch.manual_seed(0)
    p = 0.1
    x = (torch.rand(200_000) + 0.5).to(dtype).requires_grad_()
    out = dropout(x, p, True)
    assert out.dtype == dtype and out.shape == x.shape
    kept = out != 0
    # 200k Bernoulli(0.9) draws: the kept fraction is within ~6 standard deviations of 0.9.
    assert abs(kept.float().mean().item() - (1 - p)) < 0.004
    scale = 65536 / (65536 - round(p * 65536))
    ratio = out[kept].float() / x[kept].float()
    assert torch.allclose(ratio, torch.full_like(ratio, scale), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    # The backward multiplies by the same mask and scale.
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad != 0, kept)
    assert torch.allclose(x.grad[kept].float(), torch.full_like(ratio, scale), rtol=1e-2)


def test_dropout_masks_are_seeded_and_use_every_bit():
    x = torch.ones(4, 1001)  # an odd count: the last 64-bit draw is only partly used
    torch.manual_seed(3)
    a = dropout(x, 0.5, True)
    torch.manual_seed(3)
    assert torch.equal(a, dropout(x, 0.5, True))
    assert not torch.equal(a, dropout(x, 0.5, True))
    # p = 0.5 splits on the sign bit of each 16-bit lane: all four lanes of a draw are random.
    lanes = (a.reshape(-1)[:4000] != 0).float().view(-1, 4).mean(0)
    assert ((lanes > 0.4) & (lanes < 0.6)).all(), lanes



# -- the compiled CPU feed-forward kernel ---------------------------------------------------------


@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_geglu_norm_equals_the_eager_ops(autocast):
    import torch.nn.functional as F

    torch.manual_seed(0)
    x = (torch.randn(2, 5, 2 * 24) * 2).requires_grad_()
    grad = torch.randn(2, 5, 24)

    def eager(inp):
        value, gate = inp.chunk(2, dim=-1)
        y = value * F.gelu(gate, approximate="tanh")
        return F.layer_norm(y, (24,), eps=1e-7)

    results = []
    for fn in (eager, lambda inp: geglu.geglu_norm(inp, 1e-7)):
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            inp = x.to(torch.bfloat16) if autocast else x
            out = fn(inp)
        out.float().backward(grad)
        results.append((out.float(), x.grad.clone()))
    assert geglu.geglu_norm.compiled not in (None, False), "the compiler should run on this machine"
    (a, ga), (b, gb) = results
    tol = 3e-2 if autocast else 1e-5  # bf16: the eager ops round between steps, the kernel does not
    assert torch.allclose(a, b, atol=tol, rtol=tol)
    assert torch.allclose(ga, gb, atol=tol * 4, rtol=tol)


def test_geglu_norm_falls_back_to_eager_ops_when_the_compiler_fails(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(geglu.geglu_norm, "compiled", None)
    monkeypatch.setattr(torch, "compile", broken_compile)
    x = torch.randn(3, 8, requires_grad=True)
    with pytest.warns(UserWarning, match="feed-forward kernel failed .RuntimeError: no C\\+\\+ compiler found.; using eager ops"):
        out = geglu.geglu_norm(x, 1e-7)
    assert geglu.geglu_norm.compiled is False
    value, gate = x.detach().chunk(2, dim=-1)
    y = value * torch.nn.functional.gelu(gate, approximate="tanh")
    assert torch.allclose(out, torch.nn.functional.layer_norm(y, (4,), eps=1e-7), atol=1e-6)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_layer_weighting_buffers_are_reused_across_training_steps_only():
    model = tiny_model(True)
    ids = torch.randint(0, 512, (2, 10))
    blocked = build_blocked_mask(torch.ones(2, 10, dtype=torch.long), torch.tensor([False, True]))
    model(ids, blocked).square().mean().backward()
    pooled = {t.data_ptr() for t in model.layer_mix.pool}
    assert len(pooled) == 2  # the history and the upstream gradients, given back after backward
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("layer_weights") for n in grads)
    model.zero_grad()
    model(ids, blocked).square().mean().backward()  # reuses both buffers: the same gradients
    assert {t.data_ptr() for t in model.layer_mix.pool} == pooled
    for n, g in grads.items():
        assert torch.equal(dict(model.named_parameters())[n].grad, g), n
    model.layer_mix.pool.clear()
    with torch.no_grad():
        model(ids, blocked)
    assert model.layer_mix.pool == []


def test_a_history_built_without_its_init_is_freed_quietly(monkeypatch):
    # torch.compile of the whole model (the GPU benchmark) can create one without running __init__.
    import gc
    import sys
    raised = []
    monkeypatch.setattr(sys, "unraisablehook", raised.append)
    history = object.__new__(History)
    del history
    gc.collect()
    assert raised == []


def test_compiled_kernel_rows_do_not_depend_on_the_batch_they_come_in():
    # Micro-batch sizes vary between steps; a row's result must not (resumed == uninterrupted).
    torch.manual_seed(0)
    big = torch.randn(7, 6, 2 * 40)
    outs, grads = [], []
    for batch in (big, big[:3]):
        x = batch.clone().requires_grad_()
        out = geglu.geglu_norm(x, 1e-7)
        out.backward(torch.ones_like(out) * torch.arange(40.0))
        outs.append(out.detach()[:3])
        grads.append(x.grad[:3])
    assert geglu.geglu_norm.compiled not in (None, False)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])


# -- the whole model compiled (train.compile) --------------------------------------------------------


def test_a_failed_compile_warns_once_and_the_model_runs_eagerly(monkeypatch):
    from gptbert.kernels import compiled

    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("inductor: no working C++ compiler\ndetails")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    ids, blocked = batch()
    eager = tiny_model(True)
    model = compiled.compile_model(tiny_model(True))
    assert isinstance(model.layer_mix, LayerWeighting)  # the plain sums, for the compiler to trace
    with pytest.warns(UserWarning, match=r"torch.compile of the model failed after .* s \(RuntimeError: inductor: "
                                         r"no working C\+\+ compiler\); training continues with the eager model"):
        h_fallback, g_fallback = step(model, ids, blocked)
    assert model.forward.failed is not None
    h_eager, g_eager = step(eager, ids, blocked)
    assert torch.allclose(h_fallback, h_eager, atol=1e-5)
    for name in g_eager:
        assert torch.allclose(g_fallback[name], g_eager[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.slow
def test_the_compiled_model_equals_the_eager_one():
    from gptbert.kernels.compiled import compile_model

    ids, blocked = batch()
    model = compile_model(tiny_model(True))
    h_compiled, g_compiled = step(model, ids, blocked)
    # Where inductor's code for this CPU is wrong, the self-check keeps the eager model (and says so).
    failed = model.forward.failed
    assert failed is None and model.forward.first_call_s is not None or "differs from the eager model" in failed
    h_eager, g_eager = step(tiny_model(True), ids, blocked)
    assert torch.allclose(h_compiled, h_eager, atol=1e-4)
    for name in g_eager:
        assert torch.allclose(g_compiled[name], g_eager[name], atol=1e-4, rtol=1e-3), name


# -- the LM losses' terms (log-sum-exp and target logit) -------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_lm_loss_terms_equal_the_plain_ones(dtype):
    # As the objective uses them: CE = lse - target logit and z-loss = lse^2, weighted per row.
    torch.manual_seed(0)
    V = 300
    logits = (torch.randn(37, V) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (37,))
    weights = torch.rand(37)
    results = []
    for fn in (GPTBERT.lm_loss_terms, cross_entropy.lm_loss_terms):
        logits.grad = None
        lse, picked = fn(logits, targets)
        assert lse.dtype == picked.dtype == torch.float32
        (weights * (lse - picked) + 1e-2 * lse * lse).sum().backward()
        results.append((lse.detach(), picked.detach(), logits.grad.float()))
    assert cross_entropy.lm_loss_terms.compiled not in (None, False), "the compiler should run on this machine"
    (lse_a, pick_a, g_a), (lse_b, pick_b, g_b) = results
    assert torch.equal(pick_a, pick_b)
    assert torch.allclose(lse_a, lse_b, atol=1e-5, rtol=1e-6)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6  # bf16 gradients: one rounding of each side
    assert torch.allclose(g_a, g_b, atol=tol, rtol=tol)


def test_compiled_lm_loss_terms_of_a_row_do_not_depend_on_the_batch_it_comes_in():
    torch.manual_seed(0)
    logits, targets = torch.randn(9, 200), torch.randint(0, 200, (9,))
    outs, grads = [], []
    for n in (9, 4):
        x = logits[:n].clone().requires_grad_()
        lse, picked = cross_entropy.lm_loss_terms(x, targets[:n])
        (lse * torch.arange(1.0, n + 1) - picked).sum().backward()
        outs.append(torch.stack([lse, picked]).detach()[:, :4])
        grads.append(x.grad[:4])
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])


def test_the_hybrid_loss_with_kernels_equals_the_plain_one():
    from gptbert.objective import IGNORE, Batch, LossNorm, hybrid_loss

    ids, blocked = batch()
    seg = torch.tensor([[1] * 9 + [2] * 11, [1] * 14 + [0] * 6, [1] * 20])
    targets = torch.full((3, 20), IGNORE)
    targets[0, ::3] = ids[0, ::3]
    targets[1, :13] = ids[1, 1:14]
    targets[2, :19] = ids[2, 1:]
    b = Batch(input_ids=ids, target_ids=targets, segment_ids=seg, causal=torch.tensor([False, True, True]))
    norm = LossNorm(masked=int((targets[0] != IGNORE).sum()), causal=int((targets[1:] != IGNORE).sum()))
    results = []
    for kernels in (False, True):
        model = tiny_model(kernels)
        model.train()
        loss, sums = hybrid_loss(model, b, norm, causal_fraction=0.25, z_loss=1e-2)
        loss.backward()
        results.append((loss.detach(), sums, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (la, sa, ga), (lb, sb, gb) = results
    assert torch.allclose(la, lb, atol=1e-6)
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-4, rtol=1e-6), k
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-6, rtol=1e-4), name
