"""The flex-attention path (attention_impl="flex") computes the fused path's maths.

Three levels: on CPU, where torch's compiled flex kernel is not trusted (gptbert/kernels/flex.py),
a flex model runs the fused attention and says so once; the score_mod and block mask the model hands
to flex, evaluated densely the way flex's own math reference does, against the fused path in values
and gradients on CPU; and, where a GPU is present, the compiled kernel against the fused path in the
loss and every parameter's gradient (through the LM head), in fp32 and under bf16 autocast.
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


def loss_and_grads(model: GPTBERT, ids, blocked, bf16: bool = False):
    """A training step's loss (next-token CE through the LM head) and every parameter's gradient;
    fails if a parameter gets none (each one is on the path from the input to the loss)."""
    targets = torch.roll(ids, -1, dims=1)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = model(ids, blocked)
        logits = model.lm_logits(hidden).float()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    missing = [n for n, g in grads.items() if g is None or not bool(torch.isfinite(g).all())]
    assert not missing, f"no finite gradient for {missing}"
    return loss.detach(), hidden.detach().float(), {n: g.float() for n, g in grads.items()}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are zero)."""
    scale = float(torch.linalg.vector_norm(b))
    diff = float(torch.linalg.vector_norm(a - b))
    return diff / scale if scale > 0 else diff


def test_flex_needs_attention_dropout_zero():
    with pytest.raises(ConfigError, match="attention_dropout"):
        ModelConfig(**{**TINY, "attention_dropout": 0.1}, attention_impl="flex").validate()


def test_flex_mask_and_score_mod_equal_fused_in_values_and_gradients(monkeypatch):
    # Let the CPU take the flex route with gradients, through the dense evaluator above.
    monkeypatch.setattr(flex_module, "FLEX_BACKWARD_DEVICES", {"cpu"})
    monkeypatch.setattr(flex_module, "PLAIN_DEVICES", set())
    calls = []

    def fake_flex(q, k, v, score_mod, block_mask, scale):
        calls.append(block_mask)
        return dense_flex(q, k, v, score_mod, block_mask, scale)

    monkeypatch.setattr(flex_module, "flex_attention", fake_flex)
    ids, blocked = batch()
    results = {impl: loss_and_grads(make_model(impl).train(), ids, blocked) for impl in ("fused", "flex")}
    assert len(calls) == 2  # one per layer: the flex route really ran
    (loss_u, out_u, grads_u), (loss_f, out_f, grads_f) = results["fused"], results["flex"]
    assert torch.allclose(loss_f, loss_u, atol=1e-6, rtol=1e-5)
    assert torch.allclose(out_f, out_u, atol=1e-5, rtol=1e-4)
    for name, g in grads_u.items():
        assert torch.allclose(grads_f[name], g, atol=1e-5, rtol=1e-4), name


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


def test_a_flex_model_on_cpu_runs_the_fused_attention_and_says_so_once(monkeypatch):
    def untrusted(*args, **kwargs):
        raise AssertionError("the compiled CPU flex kernel must not run")

    monkeypatch.setattr(flex_module, "flex_attention", untrusted)
    monkeypatch.setattr(flex_module, "_told_plain", False)
    ids, blocked = batch()
    flex, fused = make_model("flex").eval(), make_model("fused").eval()
    with pytest.warns(UserWarning, match="attention_impl 'flex' runs the fused attention on CPU") as seen:
        with torch.no_grad():
            out_flex, out_fused = flex(ids, blocked), fused(ids, blocked)
            again = flex(ids, blocked)
    assert sum("attention_impl 'flex'" in str(w.message) for w in seen) == 1
    assert torch.equal(out_flex, out_fused) and torch.equal(again, out_fused)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention has a backward only on GPU")
@pytest.mark.parametrize("bf16, tolerance", [(False, 2e-3), (True, 5e-2)], ids=["fp32", "bf16-autocast"])
def test_compiled_flex_kernel_equals_fused_on_gpu_with_gradients(bf16, tolerance):
    """The compiled flex kernels (forward and backward) against the fused path on the same weights:
    the loss, the final states and every parameter's gradient agree to ``tolerance`` in relative norm
    (a wrong mask or score_mod is an O(1) error; bf16 rounding is ~1e-2)."""
    ids, blocked = (t.cuda() for t in batch())
    results = {impl: loss_and_grads(make_model(impl).cuda().train(), ids, blocked, bf16) for impl in ("fused", "flex")}
    (loss_u, out_u, grads_u), (loss_f, out_f, grads_f) = results["fused"], results["flex"]
    assert relative_error(loss_f, loss_u) < tolerance, (float(loss_f), float(loss_u))
    assert relative_error(out_f, out_u) < tolerance
    errors = {name: relative_error(grads_f[name], g) for name, g in grads_u.items()}
    assert all(float(torch.linalg.vector_norm(g)) > 0 for g in grads_u.values())
    worst = max(errors, key=errors.get)
    assert errors[worst] < tolerance, (worst, errors[worst])
