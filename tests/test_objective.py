"""The hybrid objective: targets, packing, span masking, the rank-independent mix, the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import ModelConfig, TrainConfig
from gptbert.data import ListDocumentSource
from gptbert.objective import (BOS_ID, IGNORE, MASK_ID, NUM_SPECIAL, PAD_ID, Cursor, LossNorm,
                               PackingPlanner, StepPlan, TrainingStream, build_batch, causal_flags,
                               causal_targets, hybrid_loss, layout, num_micro_batches, objective_value, rank_slice,
                               segment_pieces, span_mask, validation_batches)


# Tiny tensors: extra threads only contend with other processes (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def docs_source(lengths, start=100):
    """Documents whose tokens are distinct, recognisable ids."""
    docs, nxt = [], start
    for n in lengths:
        docs.append(np.arange(nxt, nxt + n))
        nxt += n
    return ListDocumentSource(docs)


def small_cfg(**kw):
    base = dict(steps=100, seq_len=16, seq_len_schedule=False, batch_tokens_start=16 * 8,
                batch_tokens_end=16 * 8, micro_batch_tokens=16 * 3, valid_examples=8)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- targets

def test_layout_and_causal_targets():
    src = docs_source([3, 2])
    items, segs, starts = layout(src, [(0, 0, 3), (1, 0, 2)], seq_len=9)
    #          <s> a   b   c  <s>  d   e  pad pad pad
    assert items.tolist() == [BOS_ID, 100, 101, 102, BOS_ID, 103, 104, PAD_ID, PAD_ID, PAD_ID]
    assert segs.tolist() == [1, 1, 1, 1, 2, 2, 2, 0, 0, 0]
    tgt = causal_targets(items, segs, starts)
    # position k is scored against token k+1; the last token of a segment (c), <s> as target and
    # pads have none
    assert tgt.tolist() == [100, 101, 102, IGNORE, 103, 104, IGNORE, IGNORE, IGNORE]


def test_causal_example_in_batch_and_blocked_mask():
    from gptbert.model import build_blocked_mask

    src = docs_source([3, 2])
    plan = StepPlan(0, 9, 0.3, [[(0, 0, 3), (1, 0, 2)]], np.array([True]))
    b = build_batch(src, plan, [0], seed=0, vocab_size=512)
    assert b.input_ids[0].tolist() == [1, 100, 101, 102, 1, 103, 104, 3, 3]
    assert b.target_ids[0].tolist() == [100, 101, 102, IGNORE, 103, 104, IGNORE, IGNORE, IGNORE]
    assert b.segment_ids[0].tolist() == [1, 1, 1, 1, 2, 2, 2, 0, 0]
    blocked = build_blocked_mask(b.segment_ids, b.causal)[0]
    assert not blocked[2, 1] and blocked[1, 2]  # causal: only the lower triangle
    assert blocked[5, 2] and blocked[2, 5]  # no attention across packed segments
    assert blocked[7].all() and blocked[:, 7].all()  # pads fully blocked
    assert b.target_counts() == (0, 5)


# ----------------------------------------------------------------------------- packing

@pytest.mark.parametrize("segment_len", [None, 6, 14])
def test_packing_plan_fills_examples_and_covers_the_corpus(segment_len):
    lengths = [5, 40, 1, 7, 2, 0, 13]
    src = docs_source(lengths)
    planner = PackingPlanner(src.lengths, seed=3, segment_len=segment_len)
    seq_len = 16
    examples, cursor = planner.plan(Cursor(), batch_size=12, seq_len=seq_len)
    for pieces in examples:
        slots = sum(n + 1 for _, _, n in pieces)
        assert slots <= seq_len + 1
        assert seq_len + 1 - slots < 2  # packed while two or more slots remained
        for doc, start, n in pieces:
            assert 1 <= n <= seq_len - 2
            assert lengths[doc] >= 2  # one-token (and empty) documents never appear
            assert start + n <= lengths[doc]
        items, segs, _ = layout(src, pieces, seq_len)
        assert (segs[:slots] > 0).all() and (segs[slots:] == 0).all()
    # The units (whole documents, or segments of segment_len) tile every document except
    # one-token tails.
    for doc, length in enumerate(lengths):
        mine = sorted((int(s), int(n)) for d, s, n in zip(planner.unit_doc, planner.unit_start, planner.unit_len)
                      if d == doc)
        covered = sum(n for _, n in mine)
        assert covered in (length, length - 1) if length >= 2 else covered == 0
        assert all(n <= (segment_len or length) for _, n in mine)
    # The pieces walk the units in the epochs' orders: each unit from its start, contiguously, to
    # its end or a one-token tail, then the next unit.
    visits = [u for e in range(cursor.epoch + 1) for u in planner.order(e)]
    v, used = 0, 0
    for doc, start, n in (p for ex in examples for p in ex):
        u = visits[v]
        assert (doc, start) == (planner.unit_doc[u], planner.unit_start[u] + used)
        used += n
        if planner.unit_len[u] - used < 2:
            v, used = v + 1, 0
    assert cursor.epoch >= 1  # 12 examples of 17 slots exceed the corpus (66 tokens)


def test_segments_mix_documents_within_a_batch():
    # Two long documents: visiting whole documents fills an 8-example batch from one of them;
    # shuffled segments draw both into it.
    lengths = np.array([400, 400])
    whole, _ = PackingPlanner(lengths, seed=0).plan(Cursor(), 8, 16)
    assert len({doc for ex in whole for doc, _, _ in ex}) == 1
    mixed, _ = PackingPlanner(lengths, seed=0, segment_len=14).plan(Cursor(), 8, 16)
    assert {doc for ex in mixed for doc, _, _ in ex} == {0, 1}


def test_packing_plan_is_a_pure_function_of_lengths_and_cursor():
    lengths = np.array([9, 30, 4, 17, 2, 25])
    a = PackingPlanner(lengths, seed=7)
    ex1, c1 = a.plan(Cursor(), 5, 16)
    ex2, c2 = a.plan(c1, 5, 16)
    b = PackingPlanner(lengths, seed=7)
    ex_all, c_all = b.plan(Cursor(), 10, 16)
    assert ex1 + ex2 == ex_all and c2 == c_all
    # Resuming from a saved cursor gives the same continuation.
    ex2b, _ = PackingPlanner(lengths, seed=7).plan(Cursor.from_dict(c1.to_dict()), 5, 16)
    assert ex2b == ex2


def test_segment_pieces_for_validation_drop_one_token_tails():
    pieces = segment_pieces(np.array([15, 1, 29]), seq_len=16, count=100)
    assert pieces == [(0, 0, 14), (2, 0, 14), (2, 14, 14)]  # (0,14,1) and (2,28,1) dropped


# ----------------------------------------------------------------------------- masking

def _mask_many(rate, n_examples=400, vocab=1000):
    src = docs_source([60] * 8, start=16)
    out = []
    for i in range(n_examples):
        items, segs, starts = layout(src, [(i % 8, 0, 30), ((i + 3) % 8, 10, 33)], 64)
        rng = np.random.default_rng([0, 0, 5, i])
        corrupted, masked = span_mask(items, segs, starts, rate, rng, vocab)
        out.append((items, segs, starts, corrupted, masked))
    return out


@pytest.mark.parametrize("rate", [0.15, 0.30])
def test_mask_rate_and_specials(rate):
    results = _mask_many(rate)
    fractions = []
    for items, segs, starts, corrupted, masked in results:
        real = (segs != 0) & ~starts
        assert not masked[~real].any()  # <s> and pads are never masked
        assert (corrupted[~real] == items[~real]).all()
        fractions.append(masked.sum() / real.sum())
        # Per segment (the paper's apply_mask masks each packed segment on its own): spans are added
        # until its goal, round_stochastic(rate * L) and at least 1, is reached, so it overshoots by
        # less than one span (<= 2 tokens).
        for seg in (1, 2):
            n_real = int((real & (segs == seg)).sum())
            n = int((masked & (segs == seg)).sum())
            assert max(1, int(np.floor(rate * n_real))) <= n <= max(1, int(np.ceil(rate * n_real))) + 2
    assert rate < np.mean(fractions) < rate + 4 / 63  # whole spans: above the goal on average


def test_80_10_10_and_span_lengths():
    results = _mask_many(0.3, n_examples=600)
    n_mask = n_random = n_same = 0
    run_lengths = []
    for items, segs, starts, corrupted, masked in results:
        m = masked
        n_mask += int((corrupted[m] == MASK_ID).sum())
        changed = m & (corrupted != items) & (corrupted != MASK_ID)
        n_random += int(changed.sum())
        assert (corrupted[changed] >= NUM_SPECIAL).all()  # random replacements are non-special
        n_same += int((m & (corrupted == items)).sum())
        # Masked runs are unions of spans of 1..3 tokens; isolated runs of 1-3 must be common.
        edges = np.diff(np.concatenate(([0], m.astype(int), [0])))
        run_lengths += (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).tolist()
    total = n_mask + n_random + n_same
    assert abs(n_mask / total - 0.8) < 0.03
    assert abs(n_random / total - 0.1) < 0.02
    assert abs(n_same / total - 0.1) < 0.02
    assert {1, 2, 3} <= set(run_lengths)


def test_masked_example_targets_read_one_to_the_left():
    src = docs_source([40, 40], start=16)
    plan = StepPlan(3, 32, 0.3, [[(0, 0, 20), (1, 5, 9)]], np.array([False]))
    b = build_batch(src, plan, [0], seed=11, vocab_size=512)
    items, segs, starts = layout(src, plan.examples[0], 32)
    corrupted, masked = span_mask(items, segs, starts, 0.3, np.random.default_rng([11, 0, 3, 0]), 512)
    assert b.input_ids[0].tolist() == corrupted[:-1].tolist()
    tgt = b.target_ids[0].numpy()
    for k in range(32):
        if masked[k + 1]:
            assert tgt[k] == items[k + 1]  # the original token, not the corruption
        else:
            assert tgt[k] == IGNORE
    assert b.target_counts() == (int(masked.sum()), 0)


def test_schedules():
    cfg = TrainConfig(steps=1001)
    assert cfg.mask_rate_at(0) == pytest.approx(0.30)
    assert cfg.mask_rate_at(500) == pytest.approx(0.225)
    assert cfg.mask_rate_at(1000) == pytest.approx(0.15)
    # seq 128 until 70%, 256 until 90%, 512 after; the batch in sequences shrinks to keep tokens.
    assert [cfg.seq_len_at(s) for s in (0, 700, 701, 900, 901, 1000)] == [128, 128, 256, 256, 512, 512]
    assert cfg.batch_size_at(0) == 1_048_576 // 128
    assert cfg.batch_size_at(1000) == 4_194_304 // 512
    for s in (699, 701, 899, 901):
        assert abs(cfg.batch_size_at(s) * cfg.seq_len_at(s) - cfg.batch_tokens_at(s)) <= cfg.seq_len_at(s) / 2
    assert cfg.batch_tokens_at(500) == pytest.approx((1_048_576 + 4_194_304) / 2, abs=1)


# ----------------------------------------------------------------------------- the mix across ranks

@pytest.mark.parametrize("fraction,batch", [(0.0, 32), (1.0, 32), (0.0625, 32), (0.0625, 37), (0.25, 5)])
def test_causal_count_is_fixed_per_global_batch(fraction, batch):
    flags = causal_flags(batch, fraction)
    assert flags.sum() == int(np.floor(fraction * batch + 0.5))
    if fraction == 0.0625 and batch == 32:
        assert flags.nonzero()[0].tolist() == [15, 31]  # 1:15, evenly spread


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.0625])
@pytest.mark.parametrize("world", [1, 2, 3, 16])
def test_rank_slices_reassemble_the_one_rank_batch(fraction, world):
    src = docs_source([23, 50, 7, 31, 12, 64, 9, 40] * 3, start=16)
    cfg = small_cfg(causal_fraction=fraction, batch_tokens_start=16 * 37, batch_tokens_end=16 * 37)
    single = TrainingStream(src, cfg, vocab_size=1024)
    plan = single.plan(step=4)
    reference = single.batch(plan, range(plan.batch_size))
    assert plan.batch_size == 37
    causal_total = 0
    rows = []
    n_micro = set()
    for rank in range(world):
        stream = TrainingStream(src, cfg, vocab_size=1024)
        p = stream.plan(step=4)
        chunks = stream.micro_batches(p, rank, world)
        n_micro.add(len(chunks))
        for chunk in chunks:
            if chunk:
                b = stream.batch(p, chunk)
                rows.append(b)
                causal_total += int(b.causal.sum())
    assert len(n_micro) == 1  # every rank runs the same number of micro-batches
    assert causal_total == int(np.floor(fraction * 37 + 0.5))
    for name in ("input_ids", "target_ids", "segment_ids", "causal"):
        joined = torch.cat([getattr(b, name) for b in rows])
        assert torch.equal(joined, getattr(reference, name)), name


def test_rank_slice_and_micro_batch_counts():
    for B in (1, 5, 37, 64):
        for W in (1, 2, 3, 16):
            slices = [rank_slice(B, r, W) for r in range(W)]
            assert [i for s in slices for i in s] == list(range(B))
    assert num_micro_batches(37, 3, 4) == 4  # largest share 13 -> 4 micro-batches of <= 4
    assert num_micro_batches(37, 16, 4) == 1


def test_validation_batches_fixed_rate_and_no_packing():
    src = docs_source([40, 3, 90, 12], start=16)
    cfg = small_cfg(valid_examples=6, valid_mask_rate=0.15)
    masked = validation_batches(src, cfg, 512, seq_len=16, micro_batch_size=4, causal=False)
    causal = validation_batches(src, cfg, 512, seq_len=16, micro_batch_size=4, causal=True)
    assert [len(b) for b in masked] == [4, 2] and [len(b) for b in causal] == [4, 2]
    for b in masked + causal:
        assert (b.segment_ids.max(dim=1).values == 1).all()  # one segment per example
    again = validation_batches(src, cfg, 512, seq_len=16, micro_batch_size=4, causal=False)
    assert torch.equal(masked[0].input_ids, again[0].input_ids)  # fixed examples
    assert not causal[0].target_ids.eq(IGNORE).all() and causal[0].causal.all()


# ----------------------------------------------------------------------------- the loss

def _tiny_model():
    from gptbert.model import GPTBERT

    torch.manual_seed(0)
    model = GPTBERT(ModelConfig(vocab_size=512, hidden_size=32, num_layers=2, num_heads=2,
                                intermediate_size=48, hidden_dropout=0.0, attention_dropout=0.0))
    return model.eval()


def _manual_ce(model, batch):
    from gptbert.model import build_blocked_mask

    hidden = model(batch.input_ids, build_blocked_mask(batch.segment_ids, batch.causal))
    logits = model.lm_logits(hidden).float()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.target_ids, reduction="none",
                                           ignore_index=IGNORE)
    lse = torch.logsumexp(logits, -1)
    has = batch.target_ids != IGNORE
    return ce, lse, has


@pytest.mark.parametrize("z", [1e-4, 0.5])  # 0.5: the z-term's weighting shows in the value
@pytest.mark.parametrize("fraction", [0.0, 0.25, 1.0])
def test_hybrid_loss_matches_definition_and_is_rank_invariant(fraction, z):
    model = _tiny_model()
    src = docs_source([23, 50, 7, 31, 12, 64, 9, 40], start=16)
    cfg = small_cfg(causal_fraction=fraction, batch_tokens_start=16 * 8, batch_tokens_end=16 * 8)
    stream = TrainingStream(src, cfg, vocab_size=512)
    plan = stream.plan(0)
    full = stream.batch(plan, range(plan.batch_size))
    ce, lse, has = _manual_ce(model, full)
    causal_rows = full.causal[:, None].expand_as(has)
    expected = torch.tensor(0.0)
    # Each kind: its mean CE plus z times its own mean lse^2 (the paper's per-GPU loss), weighted by
    # the kind's share of the mix; a kind without targets contributes nothing.
    for rows, weight in ((has & ~causal_rows, 1 - fraction), (has & causal_rows, fraction)):
        if rows.any():
            expected = expected + weight * (ce[rows].mean() + z * (lse[rows] ** 2).mean())
    m, c = full.target_counts()
    with torch.no_grad():
        loss, sums = hybrid_loss(model, full, LossNorm(m, c, 1), fraction, z)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    logged = objective_value({k: float(v) for k, v in sums.items()}, LossNorm(m, c, 1), fraction, z)
    assert logged["loss"] == pytest.approx(expected.item(), rel=1e-6)
    # Three ranks with micro-batches: sum over micro-batches, mean over ranks == the global loss.
    world = 3
    per_rank = []
    for rank in range(world):
        total = 0.0
        for chunk in stream.micro_batches(plan, rank, world):
            if chunk:
                with torch.no_grad():
                    part, _ = hybrid_loss(model, stream.batch(plan, chunk), LossNorm(m, c, world), fraction, z)
                total += part.item()
        per_rank.append(total)
    assert np.mean(per_rank) == pytest.approx(expected.item(), rel=1e-6)


def test_batched_masking_rows_are_independent():
    """A row's masking depends only on its own RNG, not on which rows are masked with it."""
    from gptbert.objective import span_mask_rows

    src = docs_source([60] * 8, start=16)
    rows = [layout(src, [(i, 0, 20 + i)], 31) for i in range(6)]
    items, segs, starts = (np.stack([r[k] for r in rows]) for k in range(3))
    rngs = lambda idx: [np.random.default_rng([1, 0, 0, i]) for i in idx]  # noqa: E731
    all_c, all_m = span_mask_rows(items, segs, starts, 0.3, rngs(range(6)), 512)
    for i in range(6):
        c, m = span_mask_rows(items[i:i + 1], segs[i:i + 1], starts[i:i + 1], 0.3, rngs([i]), 512)
        assert np.array_equal(c[0], all_c[i]) and np.array_equal(m[0], all_m[i])
    # Full rows back to back: row i's last real token and row i+1's tokens never share a span.
    full = [layout(src, [(i, 0, 31)], 31) for i in range(4)]
    items, segs, starts = (np.stack([r[k] for r in full]) for k in range(3))
    assert (segs[:, -1] != 0).all()
    c, m = span_mask_rows(items, segs, starts, 0.5, rngs(range(4)), 512)
    assert not m[:, 0].any()  # <s> at every row start stays unmasked
    for i in range(4):
        ci, mi = span_mask_rows(items[i:i + 1], segs[i:i + 1], starts[i:i + 1], 0.5, rngs([i]), 512)
        assert np.array_equal(mi[0], m[i])


def test_describe_example_shows_each_position_with_its_target():
    from gptbert.objective import describe_example

    src = docs_source([40, 40], start=16)
    plan = StepPlan(3, 32, 0.3, [[(0, 0, 20), (1, 5, 9)]], np.array([False]))
    b = build_batch(src, plan, [0], seed=11, vocab_size=512)
    names = {BOS_ID: "<s>", MASK_ID: "<mask>", PAD_ID: "<pad>"}
    text = describe_example(b, 0, lambda i: names.get(i, f"t{i}"), plan.examples[0])
    lines = text.splitlines()
    assert lines[0].startswith("example 0 (masked): 31 real positions")
    rows = [line.split() for line in lines[2:] if not line.strip().startswith("...")]
    # Positions up to the first pad; each row: position, segment, input, [target].
    assert [int(r[0]) for r in rows] == list(range(32))[:len(rows)] and len(rows) == 32
    for k, r in enumerate(rows):
        want = int(b.target_ids[0, k])
        assert (len(r) == 4) == (want != IGNORE)
        if want != IGNORE:
            assert r[3] == f"t{want}"
        assert int(r[1]) == int(b.segment_ids[0, k])
    assert rows[0][2] == "<s>" and rows[21][2] == "<s>"  # one <s> before each packed segment
