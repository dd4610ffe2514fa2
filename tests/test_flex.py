"""The flex-attention path (attention_impl="flex") computes the fused path's maths.

Three levels: the real compiled flex_attention kernel against the fused path on CPU (forward: flex
has no CPU backward); the score_mod and block mask the model hands to flex, evaluated densely the way
flex's own math reference does, against the fused path in values and gradients on CPU; and, where a
GPU is present, the compiled kernel's gradients.
"""

from __future__ import annotations

import pytest
import torch

import gptbert.kernels.flex as flex_module
from common.config import ConfigError, ModelConfig
from gptbert.kernels import apply_kernels
from gptbert.model import GPTBERT, build_blocked_mask

TINY = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
            hidden_dropout=0.0, attention_dropout=0.0)

# One batch with every kind of row: bidirectional, causal, two packed documents (masked and
# causal), and a padded row (its pad queries attend to nothing).
SEGMENTS = [[1] * 24, [1] * 24, [1] * 10 + [2] * 14, [1] * 15 + [2] * 9, [1] * 17 + [0] * 7]
CAUSAL = [False, True, False, True, False]


def make_model(impl: str, seed: int = 0) -> GPTBERT:
    torch.manual_seed(seed)
    model = apply_kernels(GPTBERT(ModelConfig(**TINY, attention_impl=impl)))
    with torch.no_grad():  # perturb zero/one-initialised parameters so every path matters
        for name, p in model.named_parameters():
            if "bias" in name or "layer_weights" in name or "relative_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch():
    torch.manual_seed(1)
    seg = torch.tensor(SEGMENTS)
    return torch.randint(0, 512, seg.shape), build_blocked_mask(seg, torch.tensor(CAUSAL))


def dense_flex(q, k, v, score_mod, block_mask, scale):
    """flex_attention's semantics evaluated densely: score_mod and mask_mod on the full index grid,
    softmax over allowed keys, zero output for a query with none."""
    B, h, T, _ = q.shape
    b, hh = torch.arange(B).view(B, 1, 1, 1), torch.arange(h).view(1, h, 1, 1)
    i, j = torch.arange(T).view(1, 1, T, 1), torch.arange(T).view(1, 1, 1, T)
    scores = score_mod(q @ k.transpose(-1, -2) * scale, b, hh, i, j)
    allowed = block_mask.mask_mod(b, hh, i, j).expand_as(scores)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = probs.masked_fill(~allowed, 0.0)  # fully blocked rows: NaN -> 0
    return probs @ v


def test_flex_needs_attention_dropout_zero():
    with pytest.raises(ConfigError, match="attention_dropout"):
        ModelConfig(**{**TINY, "attention_dropout": 0.1}, attention_impl="flex").validate()


def test_flex_mask_and_score_mod_equal_fused_in_values_and_gradients(monkeypatch):
    # Let the CPU take the flex route with gradients, through the dense evaluator above.
    monkeypatch.setattr(flex_module, "FLEX_BACKWARD_DEVICES", {"cpu"})
    calls = []

    def fake_flex(q, k, v, score_mod, block_mask, scale):
        calls.append(block_mask)
        return dense_flex(q, k, v, score_mod, block_mask, scale)

    monkeypatch.setattr(flex_module, "flex_attention", fake_flex)
    ids, blocked = batch()
    grads, outs = {}, {}
    for impl in ("fused", "flex"):
        model = make_model(impl).train()
        hidden = model(ids, blocked)
        model.lm_logits(hidden).logsumexp(-1).square().mean().backward()
        outs[impl] = hidden.detach()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert len(calls) == 2  # one per layer: the flex route really ran
    assert torch.allclose(outs["flex"], outs["fused"], atol=1e-5, rtol=1e-4)
    for name, g in grads["fused"].items():
        assert torch.allclose(grads["flex"][name], g, atol=1e-5, rtol=1e-4), name


def test_block_mask_skips_blocked_tiles():
    # Two 128-token documents packed in 256 positions: with 128-wide tiles, the cross-document
    # tiles are empty, so a bidirectional row keeps 2 of 4 tiles and a causal one keeps 2 of 3.
    seg = torch.tensor([[1] * 128 + [2] * 128] * 2)
    blocked = build_blocked_mask(seg, torch.tensor([False, True]))
    mask = flex_module.block_mask(blocked)
    dense = mask.to_dense()  # (B, 1, 2, 2): 1 where a tile has any allowed pair
    assert dense[0, 0].tolist() == [[1, 0], [0, 1]]
    assert dense[1, 0].tolist() == [[1, 0], [0, 1]]
    assert mask.sparsity() == pytest.approx(50.0)


@pytest.mark.slow
def test_compiled_flex_kernel_equals_fused_on_cpu():
    ids, blocked = batch()
    flex, fused = make_model("flex").eval(), make_model("fused").eval()
    with torch.no_grad():
        out_flex, out_fused = flex(ids, blocked), fused(ids, blocked)
    assert torch.allclose(out_flex, out_fused, atol=2e-5, rtol=1e-4), (out_flex - out_fused).abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention has a backward only on GPU")
def test_compiled_flex_kernel_gradients_on_gpu():
    ids, blocked = batch()
    ids, blocked = ids.cuda(), blocked.cuda()
    grads = {}
    for impl in ("fused", "flex"):
        model = make_model(impl).cuda().train()
        model(ids, blocked).square().mean().backward()
        grads[impl] = {n: p.grad for n, p in model.named_parameters()}
    for name, g in grads["fused"].items():
        assert torch.allclose(grads["flex"][name], g, atol=1e-4, rtol=1e-3), name
