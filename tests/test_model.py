"""The GPT-BERT model (SPEC section 1): shapes, counts, masks, init, and the two attention paths."""

from __future__ import annotations

import math

import pytest
import torch

from common.config import ModelConfig, preset
from gptbert.flops import parameter_count
from gptbert.model import (
    GPTBERT,
    _History,
    _LayerMix,
    build_blocked_mask,
    export_reference_state_dict,
    load_reference_state_dict,
    num_parameters,
    position_index_table,
    relative_position_buckets,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend


TINY = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96)


def tiny_config(**changes) -> ModelConfig:
    return ModelConfig(**{**TINY, **changes})


def make_model(seed: int = 0, **changes) -> GPTBERT:
    torch.manual_seed(seed)
    model = GPTBERT(tiny_config(**changes))
    # Perturb the zero/one-initialised parameters so every path matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "layer_weights" in name or "relative_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def blocked_for(segment_ids, causal) -> torch.Tensor:
    return build_blocked_mask(torch.as_tensor(segment_ids), torch.as_tensor(causal))


# -- parameter counts ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [("small", 29_892_164), ("base", 119_454_532)])
def test_preset_parameter_counts(name, expected):
    cfg = preset(name).model
    assert parameter_count(cfg) == expected
    with torch.device("meta"):
        model = GPTBERT(cfg)
    assert num_parameters(model) == expected


@pytest.mark.parametrize("name", ["tiny", "mini", "small", "base"])
def test_ablations_change_parameter_counts(name):
    cfg = preset(name).model
    H, L = cfg.hidden_size, cfg.num_layers
    full = parameter_count(cfg)
    no_gate = ModelConfig(**{**cfg.__dict__, "gate": False})
    no_weights = ModelConfig(**{**cfg.__dict__, "layer_weighting": False})
    assert full - parameter_count(no_gate) == L * (H * H + H)
    assert full - parameter_count(no_weights) == sum(k + 2 for k in range(2 * L))
    for c in (no_gate, no_weights):
        with torch.device("meta"):
            assert num_parameters(GPTBERT(c)) == parameter_count(c)
    if L == 12:
        assert full - parameter_count(no_weights) == 324


def test_tiny_preset_has_the_fixture_shape():
    cfg = preset("tiny").model
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.vocab_size) == (2, 64, 4, 96, 512)


# -- relative positions and masks ---------------------------------------------------------------


def test_bucket_thresholds():
    distances = torch.tensor([0, 1, 15, 16, 17, 20, 21, 31, 32, 63, 64, 127, 128, 255, 256, 405, 406, 511, 600])
    expected = [0, 1, 15, 16, 17, 17, 18, 19, 20, 22, 23, 25, 26, 28, 29, 30, 31, 31, 31]
    assert relative_position_buckets(distances).tolist() == expected
    assert relative_position_buckets(-distances).tolist() == [-e for e in expected]


def test_position_index_table_is_query_minus_key():
    table = position_index_table(40)
    assert table.shape == (40, 40)
    assert table[5, 5] == 31 and table[6, 5] == 32 and table[5, 6] == 30
    assert table[39, 0] == 31 + 20 and table[0, 39] == 31 - 20  # distance 39 -> bucket 20
    assert table.min() >= 0 and table.max() <= 62


def test_build_blocked_mask():
    seg = torch.tensor([[1, 1, 2, 2, 0], [1, 1, 1, 2, 0]])
    blocked = build_blocked_mask(seg, torch.tensor([False, True]))
    allowed0 = ~blocked[0]
    assert allowed0.tolist() == [
        [True, True, False, False, False],
        [True, True, False, False, False],
        [False, False, True, True, False],
        [False, False, True, True, False],
        [False, False, False, False, False],
    ]
    allowed1 = ~blocked[1]
    assert allowed1.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [True, True, True, False, False],
        [False, False, False, True, False],
        [False, False, False, False, False],
    ]
    with pytest.raises(ValueError, match="one flag per example"):
        build_blocked_mask(seg, torch.tensor([True]))


# -- behaviour of the masks through the model ----------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_causal_mode_ignores_later_tokens_and_masked_mode_does_not(impl):
    model = make_model(attention_impl=impl).eval()
    ids = torch.randint(16, 512, (1, 12))
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % 512
    seg = torch.ones(1, 12, dtype=torch.long)
    with torch.no_grad():
        causal = blocked_for(seg, [True])
        a, b = model(ids, causal), model(changed, causal)
        assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
        assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-3)
        full = blocked_for(seg, [False])
        a, b = model(ids, full), model(changed, full)
        assert (a[:, :8] - b[:, :8]).abs().max() > 1e-4


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("causal", [False, True])
def test_no_information_crosses_packed_documents(impl, causal):
    model = make_model(attention_impl=impl).eval()
    seg = torch.tensor([[1] * 7 + [2] * 6 + [0] * 3])
    ids = torch.randint(16, 512, (1, 16))
    changed = ids.clone()
    changed[0, 7:13] = torch.randint(16, 512, (6,))
    blocked = blocked_for(seg, [causal])
    with torch.no_grad():
        a, b = model(ids, blocked), model(changed, blocked)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:13], b[:, 7:13], atol=1e-3)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_pads_give_finite_outputs_and_gradients(impl):
    model = make_model(attention_impl=impl).train()
    seg = torch.tensor([[1] * 10 + [0] * 6, [1] * 16])
    blocked = blocked_for(seg, [True, False])
    hidden = model(torch.randint(0, 512, (2, 16)), blocked)
    assert torch.isfinite(hidden).all()
    model.lm_logits(hidden).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_fully_blocked_rows_attend_to_nothing():
    # A pad query's attention output is zero, so its attention sublayer adds only out_proj's bias.
    for impl in ("reference", "fused"):
        model = make_model(attention_impl=impl).eval()
        attn = model.layers[0].attention
        seg = torch.tensor([[1, 1, 1, 0]])
        blocked = blocked_for(seg, [False])
        x = torch.randn(1, 4, 64)
        masks = model._attention_masks(blocked, x.dtype)
        rel = model.relative_norm(model.relative_embedding)
        with torch.no_grad():
            out = attn(x, rel, model.position_index(4, x.device), masks)
        assert torch.allclose(out[0, 3], attn.out_proj.bias, atol=1e-6), impl


# -- the two attention paths agree ---------------------------------------------------------------


@pytest.mark.parametrize("gate, weighting", [(True, True), (False, True), (True, False)])
def test_fused_and_reference_agree_in_values_and_gradients(gate, weighting):
    seg = torch.tensor([[1] * 9 + [2] * 11, [1] * 14 + [0] * 6, [1] * 20])
    blocked = blocked_for(seg, [False, True, True])
    ids = torch.randint(0, 512, (3, 20))
    results = {}
    for impl in ("reference", "fused"):
        # Dropout off, train mode: the training code paths (SDPA math backward) without randomness.
        model = make_model(attention_impl=impl, gate=gate, layer_weighting=weighting,
                           hidden_dropout=0.0, attention_dropout=0.0).train()
        hidden = model(ids, blocked)
        loss = model.lm_logits(hidden).logsumexp(-1).square().mean()
        loss.backward()
        results[impl] = (hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (h_ref, g_ref), (h_fused, g_fused) = results["reference"], results["fused"]
    assert torch.allclose(h_ref, h_fused, atol=1e-5)
    assert g_ref.keys() == g_fused.keys()
    for name in g_ref:
        assert torch.allclose(g_ref[name], g_fused[name], atol=1e-5, rtol=1e-4), name


def test_eval_paths_agree_without_grad():
    # Under no_grad SDPA may take a different kernel than in training; check it too.
    seg = torch.tensor([[1] * 30 + [0] * 2, [1] * 16 + [2] * 16])
    blocked = blocked_for(seg, [True, False])
    ids = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        a = make_model(attention_impl="reference").eval()(ids, blocked)
        b = make_model(attention_impl="fused").eval()(ids, blocked)
    assert torch.allclose(a, b, atol=1e-5)


# -- layer weighting ------------------------------------------------------------------------------


def test_layer_mix_matches_naive_weighted_sums_in_values_and_gradients():
    torch.manual_seed(0)
    n_blocks, shape = 5, (2, 3, 4)
    weights = [torch.nn.Parameter(torch.linspace(-1, 1, 4 * 4).view(4, 4) * (0.3 + 0.1 * k)) for k in range(n_blocks)]
    alphas = [torch.nn.Parameter(torch.randn(k + 2)) for k in range(n_blocks)]
    x0 = torch.randn(shape, requires_grad=True)

    def run(custom: bool):
        history = _History(x0, alphas) if custom else None
        outs, x = [x0], x0
        for k in range(n_blocks):
            delta = torch.tanh(x @ weights[k])
            if custom:
                x = _LayerMix.apply(x, delta, x0, history, k, *(alphas if k == 0 else ()))
            else:
                x = x + delta
                outs.append(x)
                x = sum(a * h for a, h in zip(alphas[k], outs))
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


def test_two_forwards_then_one_backward():
    # E.g. a causal and a masked micro-batch summed into one loss: histories must not collide.
    model = make_model(hidden_dropout=0.0, attention_dropout=0.0)
    ids = torch.randint(0, 512, (2, 10))
    seg = torch.ones(2, 10, dtype=torch.long)
    b1, b2 = blocked_for(seg, [True, True]), blocked_for(seg, [False, False])
    def loss(blocked):
        return model.lm_logits(model(ids, blocked)).logsumexp(-1).mean()

    (loss(b1) + loss(b2)).backward()
    together = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss(b1).backward()
    loss(b2).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, together[n], atol=1e-6), n


# -- init -----------------------------------------------------------------------------------------


def test_init_statistics():
    torch.manual_seed(0)
    cfg = preset("mini").model
    model = GPTBERT(cfg)
    std = math.sqrt(2 / (5 * cfg.hidden_size))
    trunc_factor = 0.8796  # std of a standard normal truncated at +-2
    def check(t, target):
        assert t.abs().max() <= 2 * target + 1e-6
        assert abs(t.std().item() / (target * trunc_factor) - 1) < 0.05
    check(model.word_embedding.weight, std)
    check(model.relative_embedding, std)
    check(model.head_dense.weight, std)
    for i, layer in enumerate(model.layers):
        a = layer.attention
        for lin in (a.in_proj_qk, a.in_proj_vg, a.out_proj):
            check(lin.weight, std)
            assert (lin.bias == 0).all()
        factor = math.sqrt(1 / (2 * (i + 1)))
        check(layer.mlp.up.weight, std * factor)
        check(layer.mlp.down.weight, std * factor)
        assert layer.mlp.up.bias is None and layer.mlp.down.bias is None
    assert (model.head_bias == 0).all() and (model.head_dense.bias == 0).all()
    assert (model.relative_norm.weight == 1).all() and (model.relative_norm.bias == 0).all()
    for k, alpha in enumerate(model.layer_weights):
        assert alpha.tolist() == [0.0] * (k + 1) + [1.0]


# -- heads and reference names ---------------------------------------------------------------------


def test_heads_shapes_and_tied_projection():
    model = make_model().eval()
    hidden = model(torch.randint(0, 512, (2, 7)), blocked_for(torch.ones(2, 7, dtype=torch.long), [False, True]))
    assert hidden.shape == (2, 7, 64)
    assert model.lm_logits(hidden).shape == (2, 7, 512)
    assert model.lm_logits(hidden[0, :3]).shape == (3, 512)
    with pytest.raises(RuntimeError, match="add_classifier"):
        model.classifier_logits(hidden)
    head = model.add_classifier(3)
    assert model.classifier_logits(hidden).shape == (2, 3)
    assert num_parameters(head) == 64 * 64 + 64 + 64 * 3 + 3
    # Tied: a gradient through the LM head reaches the word embedding.
    model.zero_grad()
    model.lm_logits(torch.randn(4, 64))[:, 5].sum().backward()
    assert model.word_embedding.weight.grad[5].abs().sum() > 0


def test_reference_export_and_load_round_trip():
    source = make_model(seed=1)
    state = export_reference_state_dict(source)
    assert state["transformer.attention_layers.0.in_proj_qk.weight"].shape == (128, 64)
    assert state["transformer.dwa_modules.alphas.3"].shape == (5,)
    target = make_model(seed=2)
    load_reference_state_dict(target, state)
    for (n, a), (_, b) in zip(source.named_parameters(), target.named_parameters()):
        assert torch.equal(a, b), n
    bad = dict(state)
    del bad["transformer.mlp_layers.1.mlp.4.weight"]
    with pytest.raises(ValueError, match="mlp_layers.1.mlp.4.weight"):
        load_reference_state_dict(target, bad)
    bad = dict(state, **{"transformer.attention_layers.0.out_proj.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match="shape"):
        load_reference_state_dict(target, bad)


def test_forward_rejects_bad_mask():
    model = make_model()
    with pytest.raises(ValueError, match="blocked"):
        model(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5, 4, dtype=torch.bool))


def test_geglu_function_matches_autograd():
    from gptbert.model import _GEGLU

    x = torch.randn(3, 5, 8, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(_GEGLU.apply, (x,))
    value, gate = x.chunk(2, dim=-1)
    assert torch.allclose(_GEGLU.apply(x), value * torch.nn.functional.gelu(gate, approximate="tanh"))


# -- the CPU dropout ------------------------------------------------------------------------------


def test_dropout_is_identity_when_off():
    from gptbert.model import dropout

    x = torch.randn(4, 8)
    assert dropout(x, 0.1, False) is x
    assert dropout(x, 0.0, True) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_drops_at_rate_p_and_scales_the_rest(dtype):
    from gptbert.model import dropout

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
    from gptbert.model import dropout

    x = torch.ones(4, 1001)  # an odd count: the last 64-bit draw is only partly used
    torch.manual_seed(3)
    a = dropout(x, 0.5, True)
    torch.manual_seed(3)
    assert torch.equal(a, dropout(x, 0.5, True))
    assert not torch.equal(a, dropout(x, 0.5, True))
    # p = 0.5 splits on the sign bit of each 16-bit lane: all four lanes of a draw are random.
    lanes = (a.reshape(-1)[:4000] != 0).float().view(-1, 4).mean(0)
    assert ((lanes > 0.4) & (lanes < 0.6)).all(), lanes


def test_bf16_autocast_step_follows_fp32():
    # The hand-placed casts (one cast of the attention input, masks in the matmul dtype) keep the
    # autocast step on the fp32 one: same loss to bf16 precision, gradients pointing the same way.
    seg = torch.tensor([[1] * 9 + [2] * 11, [1] * 14 + [0] * 6])
    blocked = blocked_for(seg, [False, True])
    ids = torch.randint(0, 512, (2, 20))
    results = {}
    for bf16 in (False, True):
        model = make_model(hidden_dropout=0.0, attention_dropout=0.0).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.lm_logits(model(ids, blocked)).logsumexp(-1).square().mean()
        loss.backward()
        results[bf16] = loss.item(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert abs(results[True][0] - results[False][0]) < 2e-2 * abs(results[False][0])
    cos = torch.nn.functional.cosine_similarity(results[True][1], results[False][1], dim=0)
    assert cos > 0.99, cos


# -- the compiled CPU feed-forward kernel ---------------------------------------------------------


@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_geglu_norm_equals_the_eager_ops(autocast):
    import torch.nn.functional as F

    import gptbert.model as m

    torch.manual_seed(0)
    x = (torch.randn(2, 5, 2 * 24) * 2).requires_grad_()
    grad = torch.randn(2, 5, 24)

    def eager(inp):
        value, gate = inp.chunk(2, dim=-1)
        y = value * F.gelu(gate, approximate="tanh")
        return F.layer_norm(y, (24,), eps=1e-7)

    results = []
    for fn in (eager, lambda inp: m.geglu_norm(inp, 1e-7)):
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            inp = x.to(torch.bfloat16) if autocast else x
            out = fn(inp)
        out.float().backward(grad)
        results.append((out.float(), x.grad.clone()))
    assert m.geglu_norm.compiled not in (None, False), "the compiler should run on this machine"
    (a, ga), (b, gb) = results
    tol = 3e-2 if autocast else 1e-5  # bf16: the eager ops round between steps, the kernel does not
    assert torch.allclose(a, b, atol=tol, rtol=tol)
    assert torch.allclose(ga, gb, atol=tol * 4, rtol=tol)


def test_geglu_norm_falls_back_to_eager_ops_when_the_compiler_fails(monkeypatch):
    import gptbert.model as m

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(m.geglu_norm, "compiled", None)
    monkeypatch.setattr(torch, "compile", broken_compile)
    x = torch.randn(3, 8, requires_grad=True)
    with pytest.warns(UserWarning, match="feed-forward kernel failed .RuntimeError: no C\\+\\+ compiler found.; using eager ops"):
        out = m.geglu_norm(x, 1e-7)
    assert m.geglu_norm.compiled is False
    value, gate = x.detach().chunk(2, dim=-1)
    y = value * torch.nn.functional.gelu(gate, approximate="tanh")
    assert torch.allclose(out, torch.nn.functional.layer_norm(y, (4,), eps=1e-7), atol=1e-6)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_layer_weighting_buffers_are_reused_across_training_steps_only():
    model = make_model(hidden_dropout=0.0, attention_dropout=0.0)
    ids = torch.randint(0, 512, (2, 10))
    blocked = blocked_for(torch.ones(2, 10, dtype=torch.long), [False, True])
    model(ids, blocked).square().mean().backward()
    pooled = {t.data_ptr() for t in model._history_pool}
    assert len(pooled) == 2  # the history and the upstream gradients, given back after backward
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("layer_weights") for n in grads)
    model.zero_grad()
    model(ids, blocked).square().mean().backward()  # reuses both buffers: the same gradients
    assert {t.data_ptr() for t in model._history_pool} == pooled
    for n, g in grads.items():
        assert torch.equal(dict(model.named_parameters())[n].grad, g), n
    model._history_pool.clear()
    with torch.no_grad():
        model(ids, blocked)
    assert model._history_pool == []


def test_a_history_built_without_its_init_is_freed_quietly(monkeypatch):
    # torch.compile of the whole model (the GPU benchmark) can create one without running __init__.
    import gc
    import sys

    import gptbert.model as m

    raised = []
    monkeypatch.setattr(sys, "unraisablehook", raised.append)
    history = object.__new__(m._History)
    del history
    gc.collect()
    assert raised == []


def test_compiled_kernel_rows_do_not_depend_on_the_batch_they_come_in():
    # Micro-batch sizes vary between steps; a row's result must not (resumed == uninterrupted).
    import gptbert.model as m

    torch.manual_seed(0)
    big = torch.randn(7, 6, 2 * 40)
    outs, grads = [], []
    for batch in (big, big[:3]):
        x = batch.clone().requires_grad_()
        out = m.geglu_norm(x, 1e-7)
        out.backward(torch.ones_like(out) * torch.arange(40.0))
        outs.append(out.detach()[:3])
        grads.append(x.grad[:3])
    assert m.geglu_norm.compiled not in (None, False)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
