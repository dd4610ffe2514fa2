"""Sentence scoring: batched causal / MNTP / fused scores against naive one-at-a-time loops."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from common.config import preset
from gptbert.model import GPTBERT
from gptbert.scoring import MASK_ID, count_rows, encode_sentences, score_ids, score_sentence, score_sentences

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<mask>"] + [f"<special_{i}>" for i in range(11)]
TRAIN_TEXT = [
    "The cat sat on the mat.", "The dogs were running in the park.", "A child read a book about ships.",
    "Who should Derek hug after shocking Richard?", "These students have seen themselves in the mirror.",
    "She has eaten the cake that her mother baked.", "There were many pictures of the old town.",
    "Every teacher praised the careful students.", "The ships sailed away before the storm came.",
]


def make_tokenizer():
    """The project's SPEC tokenizer (tokenization/tokenizer.py), trained on a few sentences: ids
    0..15 are the specials, `<s> $A` / `<s> $A </s> $B` post-processing."""
    from common.config.data import TokenizerConfig
    from tokenization.tokenizer import build_tokenizer, build_trainer

    cfg = TokenizerConfig(vocab_size=400)
    tok = build_tokenizer(cfg)
    tok.train_from_iterator(TRAIN_TEXT * 3, build_trainer(cfg))
    assert [tok.token_to_id(t) for t in SPECIALS] == list(range(16))
    return tok


def make_model(seed: int = 0, dtype=torch.float64, **changes) -> GPTBERT:
    """The tiny preset's model, randomly initialised, with biases and layer weights perturbed so
    every path of the network matters (zero-initialised parameters hide bugs)."""
    cfg = dataclasses.replace(preset("tiny").model, **changes)
    torch.manual_seed(seed)
    model = GPTBERT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.startswith("layer_weights"):
                p.add_(0.2 * torch.randn_like(p))
    return model.to(dtype).eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Test-sized models gain nothing from intra-op threads, and on a shared 2-core machine
    spinning threads made them up to 10x slower; the previous setting is restored."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return make_model()


SENTENCES = ["The cat sat on the mat.", "Who should Derek hug?", "A child read a book about the ships in the storm.",
             "Dogs.", "There were many pictures of the old town that every teacher praised."]


def naive_mntp(model, ids, temperature=1.0):
    """One copy at a time: mask token j, full attention, read log p(x_j) at position j-1."""
    total = 0.0
    for j in range(1, len(ids)):
        copy = torch.tensor([ids])
        copy[0, j] = MASK_ID
        blocked = torch.zeros(1, len(ids), len(ids), dtype=torch.bool)
        logits = model.lm_logits(model(copy, blocked)[0, j - 1]).double()
        total += torch.log_softmax(logits / temperature, -1)[ids[j]].item()
    return total


def naive_causal(model, ids, temperature=1.0):
    """One prefix at a time: log p(x_j | x_<j) from the last position of the prefix."""
    total = 0.0
    for j in range(1, len(ids)):
        prefix = torch.tensor([ids[:j]])
        blocked = torch.ones(j, j, dtype=torch.bool).triu(1)[None]
        logits = model.lm_logits(model(prefix, blocked)[0, -1]).double()
        total += torch.log_softmax(logits / temperature, -1)[ids[j]].item()
    return total


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_mntp_and_causal_equal_naive_loops(tokenizer, impl, monkeypatch):
    import gptbert.scoring

    monkeypatch.setattr(gptbert.scoring, "HEAD_CHUNK", 5)  # LM-head chunks cut across rows
    model = make_model(attention_impl=impl)
    seqs = encode_sentences(tokenizer, SENTENCES)
    assert all(s[0] == 1 for s in seqs) and seqs[0][1:] == tokenizer.encode(SENTENCES[0]).ids[1:]
    # A small budget forces many batches with padding (rows of different lengths).
    with torch.inference_mode():
        got = score_ids(model, seqs, modes=["causal", "mntp", "fused"], max_tokens=64)
        for i, ids in enumerate(seqs):
            assert got["mntp"][i, 0] == pytest.approx(naive_mntp(model, ids), abs=1e-9)
            assert got["causal"][i, 0] == pytest.approx(naive_causal(model, ids), abs=1e-9)
    np.testing.assert_array_equal(got["fused"], got["causal"] + got["mntp"])
    assert got["causal"].shape == (len(SENTENCES), 1)
    assert (got["causal"] < 0).all() and (got["mntp"] < 0).all()


def test_temperatures_from_one_pass(model, tokenizer):
    seqs = encode_sentences(tokenizer, SENTENCES[:3])
    temps = [0.5, 1.0, 2.65]
    multi = score_ids(model, seqs, modes=["causal", "mntp", "fused"], temperatures=temps)
    plain = score_ids(model, seqs, modes=["causal", "mntp", "fused"])
    for mode in multi:
        assert multi[mode].shape == (3, 3)
        np.testing.assert_allclose(multi[mode][:, 1:2], plain[mode], rtol=0, atol=1e-9)  # T=1 is plain
        for k, t in enumerate(temps):
            single = score_ids(model, seqs, modes=[mode], temperatures=[t])[mode]
            np.testing.assert_allclose(multi[mode][:, k:k + 1], single, rtol=0, atol=1e-9)
    with torch.inference_mode():
        assert multi["mntp"][0, 2] == pytest.approx(naive_mntp(model, seqs[0], 2.65), abs=1e-9)
        assert multi["causal"][2, 0] == pytest.approx(naive_causal(model, seqs[2], 0.5), abs=1e-9)
    # Different temperatures really give different scores.
    assert len({round(x, 6) for x in multi["mntp"][0]}) == 3


def test_batching_independence_float32(tokenizer):
    model = make_model(dtype=torch.float32)
    target = SENTENCES[1]
    alone = score_sentences(model, tokenizer, [target], temperatures=[1.0, 2.0])
    crowd = [SENTENCES[2], SENTENCES[4], target, SENTENCES[3], SENTENCES[0]]
    for budget in (32, 128, 100000):
        together = score_sentences(model, tokenizer, crowd, temperatures=[1.0, 2.0], max_tokens=budget)
        for mode in ("causal", "mntp", "fused"):
            np.testing.assert_allclose(together[mode][2], alone[mode][0], rtol=0, atol=1e-5)
    # Duplicates get identical scores; the single-sentence helper agrees.
    dup = score_sentences(model, tokenizer, [target, SENTENCES[2], target])
    np.testing.assert_allclose(dup["mntp"][0], dup["mntp"][2], atol=1e-5)
    assert score_sentence(model, tokenizer, target, "mntp") == pytest.approx(alone["mntp"][0, 0], abs=1e-5)


def test_context_scoring_and_edge_cases(model, tokenizer):
    seqs = encode_sentences(tokenizer, ["The cat sat on the mat."])
    full = seqs[0]
    start = 3
    cond = score_ids(model, [full], modes=["causal"], score_from=[start])["causal"][0, 0]
    whole = score_ids(model, [full, full[:start]], modes=["causal"])["causal"][:, 0]
    # log P(x_3.. | x_<3) = log P(x) - log P(x_<3) under the causal factorisation.
    assert cond == pytest.approx(whole[0] - whole[1], abs=1e-9)
    # A sentence with no tokens scores 0 and costs no rows; rows are counted exactly.
    empty = score_ids(model, [[1], full], modes=["causal", "mntp"])
    assert empty["causal"][0, 0] == 0.0 and empty["mntp"][0, 0] == 0.0 and empty["mntp"][1, 0] < 0
    assert count_rows([[1], full], ["fused"]) == 1 + (len(full) - 1)
    seen = []
    score_ids(model, [[1], full], modes=["fused"], max_tokens=3 * len(full), progress=lambda n, t: seen.append((n, t)))
    assert sum(n for n, _ in seen) == count_rows([[1], full], ["fused"]) and seen[0][1] == len(full)
    assert len(seen) == -(-len(full) // 3)  # batches of 3 rows of the same length
    with pytest.raises(ValueError, match="unknown scoring mode"):
        score_ids(model, [full], modes=["bert"])
    with pytest.raises(ValueError, match="positive"):
        score_ids(model, [full], temperatures=[0.0])


def test_scoring_restores_training_mode(tokenizer):
    model = make_model(dtype=torch.float32)
    model.train()
    a = score_sentences(model, tokenizer, [SENTENCES[0]])["mntp"]
    b = score_sentences(model, tokenizer, [SENTENCES[0]])["mntp"]
    np.testing.assert_array_equal(a, b)  # dropout was off while scoring
    assert model.training


def _per_row_arrays(batch, row_sent, row_j, sequences, starts, n, mask_id, pad_id):
    """The batch as score_ids built it row by row in Python before it went to numpy: the reference."""
    width = max(len(sequences[row_sent[r]]) - (row_j[r] == 0) for r in batch)
    ids = np.full((len(batch), width), pad_id)
    seg = np.zeros((len(batch), width), dtype=np.int64)
    rows, positions, targets, owner = [], [], [], []
    for i, r in enumerate(batch):
        s, j = int(row_sent[r]), int(row_j[r])
        toks, start = list(sequences[s]), int(starts[s])
        if j == 0:
            row, pos, tgt = toks[:-1], list(range(start - 1, len(toks) - 1)), toks[start:]
        else:
            row, pos, tgt = list(toks), [j - 1], [toks[j]]
            row[j] = mask_id
        ids[i, : len(row)], seg[i, : len(row)] = row, 1
        rows += [i] * len(pos)
        positions += pos
        targets += tgt
        owner += [(j > 0) * n + s] * len(pos)
    return [ids, seg, (row_j[batch] == 0).astype(np.int64), np.array(rows), np.array(positions),
            np.array(targets), np.array(owner)]


@pytest.mark.parametrize("use", [(True, True), (True, False), (False, True)])
def test_bulk_batches_are_the_per_row_batches(tokenizer, use):
    """The numpy construction of every batch (ids, segments, causal flags, scored positions, targets,
    owners, in the same order, so index_add_ sums in the same order) equals the per-row one."""
    from gptbert.scoring import _batch_arrays, _plan_rows, token_budget_batches

    seqs = encode_sentences(tokenizer, SENTENCES + ["A.", SENTENCES[2]])
    lengths = np.array([len(s) for s in seqs])
    starts = np.maximum(1, np.array([1, 2, 4, 1, 3, 1, 5]))
    row_sent, row_j = _plan_rows(lengths, starts, *use)
    row_lengths = lengths[row_sent] - (row_j == 0)
    flat = np.concatenate([np.asarray(s) for s in seqs])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for budget in (16, 40, 100000):
        for batch in token_budget_batches(row_lengths, budget):
            got = _batch_arrays(batch, row_sent, row_j, row_lengths, lengths, starts, offsets, flat, len(seqs),
                                MASK_ID, 3)
            want = _per_row_arrays(batch, row_sent, row_j, seqs, starts, len(seqs), MASK_ID, 3)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)


def test_auto_budget_is_8192_on_a_cpu_and_a_probe_on_cuda(tokenizer):
    from gptbert.device import DeviceError, fit_eval_max_tokens
    from gptbert.scoring import CPU_MAX_TOKENS, resolve_max_tokens

    model = make_model(dtype=torch.float32)
    assert resolve_max_tokens("auto", model, 30) == CPU_MAX_TOKENS == 8192 and resolve_max_tokens(512, model, 30) == 512
    seqs = encode_sentences(tokenizer, SENTENCES)
    auto, fixed = score_ids(model, seqs, max_tokens="auto"), score_ids(model, seqs, max_tokens=8192)
    for mode in fixed:
        np.testing.assert_array_equal(auto[mode], fixed[mode])
    # The CUDA search with a measured cost of 1 GiB + 1 MiB per row of 64 tokens, 2 GiB free (12% kept):
    # the most rows within the budget, in tokens.
    budget = int(2 * 2**30 * (1 - 0.12))
    rows = (budget - 2**30) // 2**20
    seen = []
    got = fit_eval_max_tokens(model, 64, measure=lambda n: seen.append(n) or 2**30 + n * 2**20, capacity_bytes=2 * 2**30)
    assert got == rows * 64 and len(seen) <= 2 * 13 + 1
    with pytest.raises(DeviceError, match="eval.max_tokens"):
        fit_eval_max_tokens(model, 64, measure=lambda n: 4 * 2**30, capacity_bytes=2 * 2**30)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scores_on_cuda_equal_the_cpu_scores(tokenizer):
    """The pinned, non-blocking batches and the probed budget on CUDA score what the CPU scores. fp32
    on both (TF32 is off for matmuls by default); the kernels sum in other orders, about 1e-6 relative
    per log-prob, over sentences of ~20 tokens of ~6 nats each: 1e-4 absolute is ~10x that."""
    from gptbert.scoring import resolve_max_tokens

    cpu = make_model(dtype=torch.float32)
    gpu = make_model(dtype=torch.float32).cuda()
    seqs = encode_sentences(tokenizer, SENTENCES)
    want = score_ids(cpu, seqs, temperatures=[1.0, 2.0], max_tokens=64)
    got = score_ids(gpu, seqs, temperatures=[1.0, 2.0], max_tokens="auto")
    for mode in want:
        np.testing.assert_allclose(got[mode], want[mode], rtol=0, atol=1e-4)
    budget = resolve_max_tokens("auto", gpu, 30)
    assert budget >= 32 and budget % 32 == 0  # whole rows of the probed width (30 -> 32)
