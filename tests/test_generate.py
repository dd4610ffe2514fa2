"""Causal generation: greedy / sampling, top-k / top-p filters, the CTRL repetition penalty."""

from __future__ import annotations

import math

import pytest
import torch

from gptbert.generate import (
    GenerationSettings,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    generate,
    generate_ids,
)
from test_scoring import make_model, make_tokenizer, one_thread  # noqa: F401 (autouse fixture)

VOCAB = 512  # the tiny preset


def bias_only_model(bias: torch.Tensor):
    """A real model whose LM head ignores the context: the head's dense layer is zeroed, so after
    GELU and the affine-free LayerNorm its input is 0 and the logits are exactly the head bias."""
    model = make_model(dtype=torch.float32)
    with torch.no_grad():
        model.head_dense.weight.zero_()
        model.head_dense.bias.zero_()
        model.head_bias.copy_(bias)
    return model


def descending_bias():
    # Token 16 (the first non-special) is the favourite, each later token slightly less liked;
    # `</s>` (and the other specials) unlikely.
    bias = 10.0 - 0.01 * (torch.arange(VOCAB, dtype=torch.float32) - 16)
    bias[:16] = -10.0
    return bias


def test_greedy_loops_without_penalty_and_not_with_it():
    model = bias_only_model(descending_bias())
    greedy = GenerationSettings(max_new_tokens=60, greedy=True)
    looped = generate_ids(model, [1, 20, 30], greedy)
    assert looped == [16] * 60
    fixed = generate_ids(model, [1, 20, 30], GenerationSettings(max_new_tokens=60, greedy=True, repetition_penalty=1.5))
    assert len(fixed) == 60
    assert all(a != b for a, b in zip(fixed, fixed[1:]))  # never the same token back to back
    # Exactly: a penalised favourite (10 / 1.5 = 6.67) loses to every fresh token above 6.67.
    assert fixed == list(range(16, 76))


def test_repetition_penalty_ctrl_rule():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_repetition_penalty(logits, [0, 1, 1], 1.5)
    assert out.tolist() == pytest.approx([2.0 / 1.5, -3.0, 1.0, 0.5])
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5]  # input untouched
    assert apply_repetition_penalty(logits, [0], 1.0) is logits


def test_top_k_and_top_p_filters():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [True, False, False, True]
    assert torch.equal(filter_top_k(logits, 0), logits)
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    lg = probs.log()
    kept = lambda p: (~torch.isinf(filter_top_p(lg, p))).tolist()  # noqa: E731
    assert kept(0.1) == [False, True, False, False]  # the top token always survives
    assert kept(0.79) == [False, True, False, True]  # 0.5 + 0.3 reaches 0.79
    assert kept(0.9) == [False, True, True, True]
    assert kept(1.0) == [True] * 4


def test_greedy_matches_naive_argmax_loop():
    model = make_model(dtype=torch.float32)
    prompt = [1, 40, 41, 42]
    got = generate_ids(model, prompt, GenerationSettings(max_new_tokens=12, greedy=True, stop_at_eos=False))
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(12):
            ids = torch.tensor([seq])
            blocked = torch.ones(len(seq), len(seq), dtype=torch.bool).triu(1)[None]
            logits = model.lm_logits(model(ids, blocked)[0, -1])
            logits[:16] = -math.inf  # special tokens are never produced
            seq.append(int(logits.argmax()))
    assert got == seq[len(prompt):]


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = make_model(dtype=torch.float32)
    prompt = [1, 50, 60]
    s = dict(max_new_tokens=15, stop_at_eos=False)
    a = generate_ids(model, prompt, GenerationSettings(seed=1, **s))
    b = generate_ids(model, prompt, GenerationSettings(seed=1, **s))
    c = generate_ids(model, prompt, GenerationSettings(seed=2, **s))
    assert a == b and a != c and len(a) == 15 and min(a) >= 16
    greedy = generate_ids(model, prompt, GenerationSettings(greedy=True, **s))
    assert generate_ids(model, prompt, GenerationSettings(seed=3, top_k=1, temperature=0.7, **s)) == greedy
    assert generate_ids(model, prompt, GenerationSettings(seed=3, top_p=1e-6, **s)) == greedy


def test_stops_at_eos_and_returns_text():
    tok = make_tokenizer()
    bias = descending_bias()
    bias[2] = 50.0  # `</s>` is by far the most likely token
    model = bias_only_model(bias)
    assert generate_ids(model, [1, 30], GenerationSettings(greedy=True)) == []
    assert generate(model, tok, "The cat", greedy=True) == ""
    # When not stopping at `</s>` it is never produced.
    ids = generate_ids(model, [1, 30], GenerationSettings(greedy=True, max_new_tokens=5, stop_at_eos=False))
    assert ids == [16] * 5
    model = bias_only_model(descending_bias())
    text = generate(model, tok, "The cat", max_new_tokens=6, greedy=True, repetition_penalty=1.5)
    assert text == tok.decode(list(range(16, 22)))
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tok, "The cat", top_p=0.0)
