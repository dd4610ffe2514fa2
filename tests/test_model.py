"""The GPT-BERT model (SPEC section 1): shapes, counts, masks, init, and the two attention paths."""

from __future__ import annotations

import math

import pytest
import torch

from common.config import ModelConfig, preset
from gptbert.flops import parameter_count
from gptbert.export.paper import export_reference_state_dict, load_reference_state_dict
from gptbert.kernels import apply_kernels
from gptbert.model import GPTBERT, build_blocked_mask, num_parameters, position_index_table, relative_position_buckets

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend


TINY = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96)


def tiny_config(**changes) -> ModelConfig:
    return ModelConfig(**{**TINY, **changes})


def make_model(seed: int = 0, **changes) -> GPTBERT:
    # With the kernels, as training and evaluation build it (tests/test_kernels.py: equal to plain).
    torch.manual_seed(seed)
    model = apply_kernels(GPTBERT(tiny_config(**changes)))
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
        masks = model.attention_masks(blocked, x.dtype)
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


def _train_pass(model, ids, blocked, sdpa: bool, seed: int = 0):
    """Values and gradients of one training forward + backward, through SDPA (its math backend,
    what a CPU can run) or the hand-written CPU path."""
    from gptbert.model import Attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for m in model.modules():
        if isinstance(m, Attention):
            m.sdpa_training = sdpa
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with sdpa_kernel(SDPBackend.MATH):
        hidden = model(ids, blocked)
        model.lm_logits(hidden).logsumexp(-1).square().mean().backward()
    return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_training_through_sdpa_equals_the_cpu_path():
    """CUDA trains through SDPA with the position bias as a float mask that takes gradients (the
    CPU keeps its hand-written path); the same maths in values and gradients, pads and causal
    rows included."""
    seg = torch.tensor([[1] * 9 + [2] * 11, [1] * 14 + [0] * 6, [1] * 20])
    blocked = blocked_for(seg, [False, True, True])
    ids = torch.randint(0, 512, (3, 20))
    model = make_model(hidden_dropout=0.0, attention_dropout=0.0).train()
    h_cpu, g_cpu = _train_pass(model, ids, blocked, sdpa=False)
    h_sdpa, g_sdpa = _train_pass(model, ids, blocked, sdpa=True)
    torch.testing.assert_close(h_sdpa, h_cpu, rtol=1e-5, atol=1e-6)
    assert g_sdpa.keys() == g_cpu.keys()
    for name in g_cpu:
        torch.testing.assert_close(g_sdpa[name], g_cpu[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_training_through_sdpa_drops_out_as_the_plain_path():
    """With attention dropout, SDPA's math backend draws its mask as ``F.dropout`` does (one
    ``bernoulli_`` over the (B, h, T, T) probabilities from the same generator), so the plain model
    (``nn.Dropout`` modules) under one seed gives the same values and gradients; a different seed
    does not (the check can fail)."""
    seg = torch.tensor([[1] * 9 + [2] * 11, [1] * 20])
    blocked = blocked_for(seg, [False, True])
    ids = torch.randint(0, 512, (2, 20))
    torch.manual_seed(0)
    model = GPTBERT(tiny_config(hidden_dropout=0.0, attention_dropout=0.2, kernels=False)).train()
    h_cpu, g_cpu = _train_pass(model, ids, blocked, sdpa=False, seed=5)
    h_sdpa, g_sdpa = _train_pass(model, ids, blocked, sdpa=True, seed=5)
    torch.testing.assert_close(h_sdpa, h_cpu, rtol=1e-5, atol=1e-6)
    for name in g_cpu:
        torch.testing.assert_close(g_sdpa[name], g_cpu[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    h_other, _ = _train_pass(model, ids, blocked, sdpa=True, seed=6)
    assert not torch.allclose(h_other, h_cpu, atol=1e-3)


def test_sdpa_trains_off_the_cpu_only():
    from gptbert.model import Attention

    block = make_model().layers[0].attention
    assert isinstance(block, Attention)
    assert not block.sdpa_in_training(torch.device("cpu"))
    assert block.sdpa_in_training(torch.device("cuda"))


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
