"""The hybrid GPT-BERT objective: examples, packing, span masking, the causal/masked mix, the loss.

recipe §2 and §3. Everything that decides *what* is trained on is a pure function of
(document lengths, seed, global step, example index in the global batch):

- the packing plan of a global batch is computed from document lengths only, so every rank
  computes the same plan and materialises only its own slice of the examples;
- example i of the global batch is causal iff it is one of a fixed, evenly spread set of
  ``round(causal_fraction * B)`` indices;
- the masking of example i at step s draws from ``np.random.default_rng([seed, 0, s, i])``.

Hence 1 process and N processes train exactly the same examples, and the loss (each mean taken
over the target tokens of the whole global batch) is the same objective.

Sequence layout (seq_len + 1 items): ``<s> seg1 <s> seg2 ... <pad>...``; inputs are items[:-1],
targets are items[1:]. ``<s>`` is never a target, so the last token of a segment has none; pads
have none. A masked example's target at position k is the original token k+1 only when k+1 was
masked (the prediction is read one position to the left of the masked token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .targets import IGNORE, TargetPlan

UNK_ID, BOS_ID, EOS_ID, PAD_ID, MASK_ID = 0, 1, 2, 3, 4
NUM_SPECIAL = 16

# First word of every masking seed: separates the training and validation random streams.
_TRAIN_STREAM, _VALID_STREAM = 0, 1


# ----------------------------------------------------------------------------- data position

@dataclass
class Cursor:
    """Position in the training stream: epoch, index into that epoch's segment order, token offset
    into that segment."""

    epoch: int = 0
    position: int = 0
    offset: int = 0

    def to_dict(self) -> dict[str, int]:
        """The cursor as a plain dict (the checkpoint's trainer state)."""
        return {"epoch": self.epoch, "position": self.position, "offset": self.offset}

    @classmethod
    def from_dict(cls, d: dict) -> "Cursor":
        """The cursor saved by ``to_dict``."""
        return cls(int(d["epoch"]), int(d["position"]), int(d["offset"]))


# A piece of a document placed in an example: (document index, start offset, number of tokens).
Piece = tuple[int, int, int]


class PackingPlanner:
    """Plans packed examples from document lengths alone (no token reads).

    Documents are cut into segments of ``segment_len`` tokens (recipe §3; the run's longest
    ``seq_len - 2``), and each epoch visits all segments of at least 2 tokens in a seeded random
    order, so one global batch draws from many documents. (Visiting whole documents in order instead
    puts a long document's consecutive windows into one batch: on BabyLM-style dumps, where 97% of
    the tokens sit in documents longer than 16k tokens, a 16k-token batch was then ~94% one document.)
    A segment is consumed in pieces of at most ``seq_len - 2`` tokens (several while the sequence
    length is shorter than in the last stage); a piece that does not fit the rest of an example is
    cut there and its remainder starts the next example (nothing is thrown away except one-token
    tails). ``segment_len=None`` keeps whole documents as the unit.
    """

    def __init__(self, lengths: np.ndarray, seed: int, segment_len: int | None = None):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.seed = int(seed)
        if segment_len is not None and segment_len < 2:
            raise ValueError(f"segment_len must be at least 2 tokens, got {segment_len}")
        if segment_len is None:
            docs = np.arange(len(self.lengths), dtype=np.int64)
            starts, sizes = np.zeros_like(docs), self.lengths.copy()
        else:
            counts = -(-self.lengths // segment_len)  # segments per document (ceil)
            docs = np.repeat(np.arange(len(self.lengths), dtype=np.int64), counts)
            first = np.repeat(np.cumsum(counts) - counts, counts)
            starts = (np.arange(len(docs), dtype=np.int64) - first) * segment_len
            sizes = np.minimum(self.lengths[docs] - starts, segment_len)
        keep = sizes >= 2  # one-token documents and tails are never trained on
        self.unit_doc, self.unit_start, self.unit_len = docs[keep], starts[keep], sizes[keep]
        if len(self.unit_doc) == 0:
            raise ValueError("the training data has no document with at least 2 tokens")
        self._order_epoch = -1
        self._order: list[int] = []

    def order(self, epoch: int) -> list[int]:
        """Segment order of ``epoch`` (indices into ``unit_doc``/``unit_start``/``unit_len``): a
        permutation seeded by (seed, epoch)."""
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, 2, epoch])
            self._order = rng.permutation(len(self.unit_doc)).tolist()
            self._order_epoch = epoch
        return self._order

    def plan(self, cursor: Cursor, batch_size: int, seq_len: int) -> tuple[list[list[Piece]], Cursor]:
        """``batch_size`` examples of ``seq_len + 1`` slots starting at ``cursor``; returns the new cursor."""
        epoch, pos, off = cursor.epoch, cursor.position, cursor.offset
        order = self.order(epoch)
        unit_doc, unit_start, unit_len = self.unit_doc, self.unit_start, self.unit_len
        longest = seq_len - 2
        examples: list[list[Piece]] = []
        for _ in range(batch_size):
            free = seq_len + 1
            pieces: list[Piece] = []
            while free >= 2:  # "<s>" plus at least one token still fits
                unit = order[pos]
                length = int(unit_len[unit])
                n = min(length - off, longest, free - 1)
                pieces.append((int(unit_doc[unit]), int(unit_start[unit]) + off, n))
                free -= n + 1
                off += n
                if length - off < 2:  # consumed, or a one-token tail (dropped)
                    off = 0
                    pos += 1
                    if pos == len(order):
                        epoch, pos = epoch + 1, 0
                        order = self.order(epoch)
            examples.append(pieces)
        return examples, Cursor(epoch, pos, off)


def segment_pieces(lengths: np.ndarray, seq_len: int, count: int) -> list[Piece]:
    """The first ``count`` segments in document order (validation: no shuffling, no packing)."""
    out: list[Piece] = []
    for doc, length in enumerate(np.asarray(lengths)):
        for start in range(0, int(length), seq_len - 2):
            n = min(int(length) - start, seq_len - 2)
            if n >= 2:  # one-token tails (and one-token documents) are dropped
                out.append((doc, start, n))
            if len(out) == count:
                return out
    return out


# ----------------------------------------------------------------------------- the global batch

def causal_flags(batch_size: int, causal_fraction: float) -> np.ndarray:
    """Which examples of a global batch are causal: a fixed count round(r * B), evenly spread."""
    count = int(np.floor(causal_fraction * batch_size + 0.5))
    i = np.arange(batch_size)
    return ((i + 1) * count // batch_size) > (i * count // batch_size)


def rank_slice(batch_size: int, rank: int, world_size: int) -> range:
    """Contiguous share of the global batch for ``rank`` (sizes differ by at most one)."""
    base, extra = divmod(batch_size, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def num_micro_batches(batch_size: int, world_size: int, micro_batch_size: int) -> int:
    """Micro-batches per rank and step: the same on every rank (collectives stay in lock-step)."""
    largest_share = -(-batch_size // world_size)
    return max(1, -(-largest_share // micro_batch_size))


@dataclass
class Batch:
    """Examples as tensors (recipe §3): inputs, targets, segment ids and causal flags; ``plan``: the
    host-side ``TargetPlan`` (``build_batch`` makes it; ``planned()`` makes it for a batch without)."""

    input_ids: torch.Tensor  # (B, T) long
    target_ids: torch.Tensor  # (B, T) long, IGNORE where there is no target
    segment_ids: torch.Tensor  # (B, T) long, 0 = padding, 1.. = packed segment
    causal: torch.Tensor  # (B,) bool
    plan: TargetPlan | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def planned(self) -> "Batch":
        """This batch with its ``plan`` (computed here, from host copies, when it has none)."""
        if self.plan is not None:
            return self
        plan = TargetPlan.of(self.target_ids.cpu().numpy(), self.segment_ids.cpu().numpy(),
                             self.causal.cpu().numpy())
        return Batch(self.input_ids, self.target_ids, self.segment_ids, self.causal,
                     plan.to(self.input_ids.device))

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) input tokens, ``<s>`` included."""
        return self.planned().plan.num_tokens

    def target_counts(self) -> tuple[int, int]:
        """(masked-example targets, causal-example targets)."""
        plan = self.planned().plan
        return plan.masked_count, plan.causal_count

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """The batch with every tensor moved to ``device`` (``non_blocking``: asynchronously, from
        pinned memory)."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        plan = None if self.plan is None else self.plan.to(device, non_blocking)
        return Batch(move(self.input_ids), move(self.target_ids), move(self.segment_ids), move(self.causal), plan)

    def pin_memory(self) -> "Batch":
        """The batch in pinned host memory, so ``to(cuda, non_blocking=True)`` copies asynchronously."""
        b = self.planned()
        return Batch(b.input_ids.pin_memory(), b.target_ids.pin_memory(), b.segment_ids.pin_memory(),
                     b.causal.pin_memory(), b.plan.pin_memory())


@dataclass
class StepPlan:
    """What global step ``step`` trains on (identical on every rank)."""

    step: int
    seq_len: int
    mask_rate: float
    examples: list[list[Piece]]
    causal: np.ndarray
    stream: int = _TRAIN_STREAM
    extra: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """Number of examples in the global batch."""
        return len(self.examples)


# ----------------------------------------------------------------------------- examples

def layout(source, pieces: list[Piece], seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items (seq_len+1,), segment ids (0 = pad), and a mask of the ``<s>`` positions."""
    items = np.full(seq_len + 1, PAD_ID, dtype=np.int64)
    segs = np.zeros(seq_len + 1, dtype=np.int64)
    starts = np.zeros(seq_len + 1, dtype=bool)
    _layout_into(source, pieces, items, segs, starts)
    return items, segs, starts


def _layout_into(source, pieces: list[Piece], items, segs, starts) -> None:
    # Writes into pre-filled rows (items = PAD, segs = 0, starts = False).
    pos, slots = 0, len(items)
    for j, (doc, start, n) in enumerate(pieces, 1):
        if pos + n + 1 > slots:
            raise ValueError(f"pieces overflow an example of {slots} slots")
        items[pos] = BOS_ID
        starts[pos] = True
        items[pos + 1:pos + 1 + n] = source.document(doc)[start:start + n]
        segs[pos:pos + 1 + n] = j
        pos += n + 1


def causal_targets(items: np.ndarray, segs: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Target at k is item k+1 when k+1 is a real token (not ``<s>``, not a pad)."""
    tgt = items[1:].copy()
    tgt[(segs[1:] == 0) | starts[1:]] = IGNORE
    return tgt


def span_mask(
    items: np.ndarray,
    segs: np.ndarray,
    starts: np.ndarray,
    rate: float,
    rng: np.random.Generator,
    vocab_size: int,
    max_span: int = 3,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Span masking of one example (recipe §3). Returns (corrupted items, masked-position mask).

    Each segment is cut into consecutive spans of length uniform in {1..max_span}; per segment, as
    the paper's ``apply_mask``, spans are taken in random order until at least
    round_stochastic(rate * L) of its L tokens are masked (at least one); each chosen span becomes
    all ``<mask>`` (80%), random non-special tokens (10%) or stays unchanged (10%). Specials are
    never masked.
    """
    corrupted, masked = span_mask_rows(items[None], segs[None], starts[None], rate, [rng], vocab_size,
                                       max_span, mask_prob, random_prob)
    return corrupted[0], masked[0]


def span_mask_rows(items, segs, starts, rate, rngs, vocab_size, max_span=3, mask_prob=0.8,
                   random_prob=0.1):
    """``span_mask`` of many rows (R, L) at once, row r drawing only from ``rngs[r]``.

    Each row draws fixed-size blocks (span lengths, span order keys, span modes and replacement
    tokens indexed by position), so the result of a row does not depend on the other rows.
    """
    R, L = items.shape
    corrupted = items.copy()
    masked = np.zeros((R, L), dtype=bool)
    # One block of uniforms per row (a single RNG call): span lengths, span order keys, span modes,
    # replacement tokens and stochastic-rounding coins (a segment's at its first position), all
    # indexed by position.
    u = np.stack([rng.random(5 * L) for rng in rngs]) if R else np.zeros((0, 5 * L))
    draws = 1 + np.minimum((u[:, :L] * max_span).astype(np.int64), max_span - 1)
    keys = u[:, L:2 * L]
    modes = u[:, 2 * L:3 * L]
    replace = NUM_SPECIAL + np.minimum((u[:, 3 * L:4 * L] * (vocab_size - NUM_SPECIAL)).astype(np.int64),
                                       vocab_size - NUM_SPECIAL - 1)
    coins = u[:, 4 * L:]
    real = (segs != 0) & ~starts
    # Segments as flat runs of real tokens (a False column keeps runs from crossing rows).
    padded = np.concatenate([real, np.zeros((R, 1), dtype=bool)], axis=1).reshape(-1)
    edges = np.diff(np.concatenate(([False], padded)).astype(np.int8))
    first_padded = np.flatnonzero(edges == 1)
    run_len = np.flatnonzero(edges == -1) - first_padded
    run_first = (first_padded // (L + 1)) * L + first_padded % (L + 1)  # flat index in (R, L)
    if len(run_first) == 0:
        return corrupted, masked
    # Spans of every segment: a segment uses the draws at its own positions; spans beginning
    # past the segment's end are discarded, the last one is clipped.
    seg_of = np.repeat(np.arange(len(run_len)), run_len)
    tok = np.repeat(run_first, run_len) + (np.arange(int(run_len.sum()))
                                           - np.repeat(np.cumsum(run_len) - run_len, run_len))
    d = draws.reshape(-1)[tok]
    cum = np.cumsum(d)
    seg_start_cum = (cum - d)[np.cumsum(run_len) - run_len]  # cum before each segment's first draw
    ends = cum - seg_start_cum[seg_of]
    begins = ends - d
    keep = begins < run_len[seg_of]
    span_seg = seg_of[keep]
    span_len = np.minimum(ends[keep], run_len[span_seg]) - begins[keep]
    span_pos = run_first[span_seg] + begins[keep]  # flat position of the span's first token
    # Per segment (the paper masks each packed segment on its own): order its spans by their key and
    # take them until its goal is reached.
    want = rate * run_len
    goal = np.maximum(1, np.floor(want) + (coins.reshape(-1)[run_first] < want - np.floor(want)))
    order = np.lexsort((keys.reshape(-1)[span_pos], span_seg))
    lens_sorted = span_len[order]
    seg_sorted = span_seg[order]
    cum_len = np.cumsum(lens_sorted)
    seg_begin = np.concatenate(([0], np.cumsum(np.bincount(seg_sorted, minlength=len(run_len)))))[:-1]
    before = (cum_len - lens_sorted) - (cum_len - lens_sorted)[seg_begin][seg_sorted]
    chosen = order[before < goal[seg_sorted]]
    lens = span_len[chosen]
    pos = np.repeat(span_pos[chosen], lens) + (np.arange(int(lens.sum()))
                                               - np.repeat(np.cumsum(lens) - lens, lens))
    mode = np.repeat(modes.reshape(-1)[span_pos[chosen]], lens)
    flat_masked = masked.reshape(-1)
    flat_corrupted = corrupted.reshape(-1)
    flat_masked[pos] = True
    flat_corrupted[pos[mode < mask_prob]] = MASK_ID
    rand = pos[(mode >= mask_prob) & (mode < mask_prob + random_prob)]
    flat_corrupted[rand] = replace.reshape(-1)[rand]
    return corrupted, masked


def build_batch(
    source,
    plan: StepPlan,
    indices,
    seed: int,
    vocab_size: int,
    max_span: int = 3,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
) -> Batch:
    """Materialise examples ``indices`` of the global batch ``plan``."""
    indices = list(indices)
    T, R = plan.seq_len, len(indices)
    items = np.full((R, T + 1), PAD_ID, dtype=np.int64)
    segs = np.zeros((R, T + 1), dtype=np.int64)
    starts = np.zeros((R, T + 1), dtype=bool)
    for row, i in enumerate(indices):
        _layout_into(source, plan.examples[i], items[row], segs[row], starts[row])
    causal = plan.causal[indices] if R else np.zeros(0, dtype=bool)
    targets = items[:, 1:].copy()
    targets[(segs[:, 1:] == 0) | starts[:, 1:]] = IGNORE  # causal targets
    inputs = items[:, :-1].copy()
    rows = np.flatnonzero(~causal)
    if len(rows):
        rngs = [np.random.default_rng([seed, plan.stream, plan.step, indices[r]]) for r in rows]
        corrupted, masked = span_mask_rows(items[rows], segs[rows], starts[rows], plan.mask_rate, rngs,
                                           vocab_size, max_span, mask_prob, random_prob)
        inputs[rows] = corrupted[:, :-1]
        tgt = items[rows, 1:].copy()
        tgt[~masked[:, 1:]] = IGNORE  # masked examples: only where the next token was masked
        targets[rows] = tgt
    segs = segs[:, :-1].copy()
    causal = causal.astype(bool)
    return Batch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(segs),
                 torch.from_numpy(causal), TargetPlan.of(targets, segs, causal))


# What ``micro_batch_tokens: auto`` means on a CPU (the value CPU runs were tuned with).
CPU_MICRO_BATCH_TOKENS = 8192


def cpu_micro_batch_tokens(seq_len: int) -> int:
    """``auto`` on a CPU: ``CPU_MICRO_BATCH_TOKENS`` rounded down to whole sequences (at least one)."""
    return max(seq_len, CPU_MICRO_BATCH_TOKENS // seq_len * seq_len)


class TrainingStream:
    """The global batches of a training run; the cursor is the checkpointed data position."""

    def __init__(self, source, train_cfg, vocab_size: int):
        self.source = source
        if train_cfg.micro_batch_tokens == "auto":
            # No device here: split as on a CPU (the trainer resolves auto for its device first).
            from common.config.base import replace

            train_cfg = replace(train_cfg, micro_batch_tokens=cpu_micro_batch_tokens(train_cfg.max_seq_len))
        self.cfg = train_cfg
        self.vocab_size = vocab_size
        # Segments of the run's longest sequence (recipe §3), shuffled across documents.
        self.planner = PackingPlanner(source.lengths, train_cfg.seed, segment_len=train_cfg.max_seq_len - 2)
        self.cursor = Cursor()

    def plan(self, step: int) -> StepPlan:
        """Plan global step ``step`` and advance the cursor past it."""
        plan, self.cursor = self.plan_from(step, self.cursor)
        return plan

    def plan_from(self, step: int, cursor: Cursor) -> tuple[StepPlan, Cursor]:
        """Plan global step ``step`` starting at ``cursor``; returns the plan and the next cursor."""
        seq_len = self.cfg.seq_len_at(step)
        batch_size = self.cfg.batch_size_at(step)
        examples, nxt = self.planner.plan(cursor, batch_size, seq_len)
        return StepPlan(step, seq_len, self.cfg.mask_rate_at(step), examples,
                        causal_flags(batch_size, self.cfg.causal_fraction)), nxt

    def batch(self, plan: StepPlan, indices) -> Batch:
        """Materialise examples ``indices`` of ``plan`` with this run's masking settings; a token id
        outside the model vocabulary is a ValueError."""
        c = self.cfg
        b = build_batch(self.source, plan, indices, c.seed, self.vocab_size, c.max_span_length,
                        c.mask_token_prob, c.random_token_prob)
        top = int(b.input_ids.numpy().max()) if b.input_ids.numel() else 0  # a host array: no device read
        if top >= self.vocab_size:
            raise ValueError(f"token id {top} in the training data is outside the model vocabulary "
                             f"(model.vocab_size = {self.vocab_size}); wrong tokenizer or shards?")
        return b

    def micro_batches(self, plan: StepPlan, rank: int, world_size: int) -> list[list[int]]:
        """This rank's example indices, split into the (rank-independent) number of micro-batches."""
        micro = max(1, self.cfg.micro_batch_tokens // plan.seq_len)
        n = num_micro_batches(plan.batch_size, world_size, micro)
        mine = np.asarray(rank_slice(plan.batch_size, rank, world_size))
        return [chunk.tolist() for chunk in np.array_split(mine, n)]


def validation_batches(source, train_cfg, vocab_size: int, seq_len: int, micro_batch_size: int,
                       causal: bool, indices=None) -> list[Batch]:
    """Fixed validation examples: one segment each (no packing), fixed mask rate (recipe §3).

    ``causal=True`` gives the same examples scored causally. ``indices`` restricts to a subset of
    the examples (a rank's share); batches have at most ``micro_batch_size`` examples.
    """
    pieces = segment_pieces(source.lengths, seq_len, train_cfg.valid_examples)
    flags = np.full(len(pieces), causal, dtype=bool)
    plan = StepPlan(0, seq_len, train_cfg.valid_mask_rate, [[p] for p in pieces], flags,
                    stream=_VALID_STREAM)
    idx = list(range(len(pieces))) if indices is None else list(indices)
    c = train_cfg
    return [build_batch(source, plan, idx[a:a + micro_batch_size], c.seed, vocab_size,
                        c.max_span_length, c.mask_token_prob, c.random_token_prob)
            for a in range(0, len(idx), micro_batch_size)]


def describe_example(batch: Batch, row: int, id_to_token, pieces: list[Piece] | None = None,
                     width: int = 0) -> str:
    """A readable table of one example: per position the input token, its segment, and the target
    (the token the output at this position is scored against), for checking the data path by eye.
    Masked inputs are shown as ``<mask>`` (or the random/kept token) with the original as target
    one position to the left."""
    kind = "causal" if bool(batch.causal[row]) else "masked"
    ids, tgt, seg = (batch.input_ids[row].tolist(), batch.target_ids[row].tolist(),
                     batch.segment_ids[row].tolist())
    n_targets = sum(t != IGNORE for t in tgt)
    head = f"example {row} ({kind}): {sum(s != 0 for s in seg)} real positions, {n_targets} targets"
    if pieces:
        head += ", pieces (document, offset, tokens): " + ", ".join(map(str, pieces))
    lines = [head, f"{'pos':>4} {'seg':>3}  {'input':<18} target"]
    end = len(ids) if width <= 0 else min(width, len(ids))
    for k in range(end):
        if seg[k] == 0 and (k == 0 or seg[k - 1] == 0) and k > 0:
            lines.append(f"{'':>4} ... padding to position {len(ids) - 1}")
            break
        token = id_to_token(ids[k]) or str(ids[k])
        target = "" if tgt[k] == IGNORE else (id_to_token(tgt[k]) or str(tgt[k]))
        lines.append(f"{k:>4} {seg[k]:>3}  {token:<18} {target}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the loss

@dataclass
class LossNorm:
    """Target-token counts of the WHOLE global batch (all ranks, all micro-batches).

    ``divisors``: the same two counts (masked, causal) as a float tensor on the device, where they
    are known only there (all-reduced over ranks; the host reads them with the step's other numbers
    at its end); ``hybrid_loss`` then divides by them instead of the host integers."""

    masked: int
    causal: int
    world_size: int = 1
    divisors: torch.Tensor | None = None

    @property
    def total(self) -> int:
        """Target tokens of both kinds."""
        return self.masked + self.causal


def _unwrap(module):
    # DeepSpeed engines and DDP keep the model in `.module`; lm_logits lives there.
    return getattr(module, "module", module)


# The detached per-micro-batch sums ``hybrid_loss`` returns, in the order a loop all-reduces them.
SUM_KEYS = ("ce_masked", "ce_causal", "z_masked", "z_causal")


def hybrid_loss(
    model,
    batch: Batch,
    norm: LossNorm,
    causal_fraction: float,
    z_loss: float = 1e-4,
    build_mask=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch, scaled so that the sum over micro-batches, averaged over ranks, is

        (1 - r) * [mean CE(masked) + z * mean lse^2(masked)] + r * [mean CE(causal) + z * mean lse^2(causal)]

    with every mean over that kind's targets in the global batch: the paper's objective, where each
    GPU trains one kind with ``loss + z * z_loss`` (both means over its targets) and the gradients
    are averaged over GPUs, a fraction r of them causal. A kind without targets in the global batch
    contributes nothing. Returns (loss, sums) where ``sums`` holds the detached sums ``SUM_KEYS``:
    summed CE and summed lse^2 of each kind (for logging).
    """
    if build_mask is None:
        from .model import build_blocked_mask as build_mask
    plan = batch.planned().plan
    blocked = build_mask(batch.segment_ids, batch.causal)
    hidden = model(batch.input_ids, blocked, mask_flags=plan.mask_flags)
    # Gather the positions with a target BEFORE the LM head: most positions of a masked example
    # have none, and the vocabulary projection is the largest matmul. The positions come from the
    # host (fixed shape: no data-dependent indexing, which would wait for a GPU).
    h = hidden.reshape(-1, hidden.size(-1)).index_select(0, plan.index)
    head = _unwrap(model)
    lse, target_logit = head.lm_loss_terms(head.lm_logits(h), plan.tokens)
    ce = lse - target_logit
    z = lse * lse
    is_causal = plan.causal
    sums = {"ce_masked": torch.where(is_causal, 0.0, ce).sum(), "ce_causal": torch.where(is_causal, ce, 0.0).sum(),
            "z_masked": torch.where(is_causal, 0.0, z).sum(), "z_causal": torch.where(is_causal, z, 0.0).sum()}
    loss = hidden.new_zeros((), dtype=torch.float32)
    for i, (kind, weight, count) in enumerate((("masked", 1.0 - causal_fraction, norm.masked),
                                               ("causal", causal_fraction, norm.causal))):
        term = sums[f"ce_{kind}"] + z_loss * sums[f"z_{kind}"]
        if norm.divisors is not None:
            # A kind without targets has zero sums here: dividing by 1 keeps it out, as skipping does.
            loss = loss + weight * term / norm.divisors[i].clamp(min=1.0)
        elif count > 0:
            loss = loss + weight * term / count
    # Gradient averaging over ranks divides by world_size; undo it so the global sum is kept.
    loss = loss * norm.world_size
    return loss, {k: v.detach() for k, v in sums.items()}


def objective_value(sums: dict[str, float], norm: LossNorm, causal_fraction: float, z_loss: float) -> dict[str, float]:
    """Global loss numbers from globally summed ``sums`` (``SUM_KEYS``; for logging): the objective
    ``loss``, each kind's mean CE, and ``z_loss``, the mix's mean lse^2 (the paper's train/z_loss)."""
    out: dict[str, float] = {}
    total = z_mix = 0.0
    for kind, weight, count in (("masked", 1.0 - causal_fraction, norm.masked),
                                ("causal", causal_fraction, norm.causal)):
        out[f"loss_{kind}"] = sums[f"ce_{kind}"] / count if count else float("nan")
        if count:
            total += weight * (sums[f"ce_{kind}"] + z_loss * sums[f"z_{kind}"]) / count
            z_mix += weight * sums[f"z_{kind}"] / count
    return {"loss": total, **out, "z_loss": z_mix}


__all__ = [
    "CPU_MICRO_BATCH_TOKENS", "cpu_micro_batch_tokens", "BOS_ID", "IGNORE", "MASK_ID", "NUM_SPECIAL", "PAD_ID",
    "Batch", "Cursor", "LossNorm", "PackingPlanner", "StepPlan", "TargetPlan", "TrainingStream",
    "build_batch", "causal_flags", "causal_targets", "describe_example", "hybrid_loss", "layout",
    "num_micro_batches",
    "SUM_KEYS", "objective_value", "rank_slice", "segment_pieces", "span_mask", "validation_batches",
]
