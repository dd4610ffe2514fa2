"""Sentence log-likelihoods under a GPT-BERT model (recipe §6).

Every sentence is scored with `<s>` prepended. Three modes:

- causal: sum over tokens of log p(x_j | x_<j) under the causal mask (one forward pass per sentence).
- mntp:   pseudo-log-likelihood. For each position j a copy of the sentence has only x_j replaced by
          `<mask>`; full attention; log p(x_j) is read from the output at j-1 (the model predicts the
          *next* token in both modes, so a masked token is read one to the left, unlike BERT).
- fused:  causal + mntp.

Logits are divided by a temperature T before the log-softmax. The paper sweeps T and keeps the best,
so every requested T is computed from the same logits: one forward pass serves the whole sweep.

All (sentence, copy) rows of all sentences are sorted by length and cut into batches of at most
`max_tokens` tokens (rows x padded length); padding is segment id 0, which the model's blocked mask
keeps out of attention, so a sentence's score does not depend on its batch neighbours.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

MODES = ("causal", "mntp", "fused")

# Special token ids fixed by the tokenizer contract (recipe §4).
UNK_ID, BOS_ID, EOS_ID, PAD_ID, MASK_ID = 0, 1, 2, 3, 4
NUM_SPECIAL = 16
HEAD_CHUNK = 2048  # scored positions per LM-head call
CPU_MAX_TOKENS = 8192  # eval.max_tokens "auto" off CUDA: a batch that stays in a CPU's caches
_AUTO_BUDGETS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[int, int]]" = weakref.WeakKeyDictionary()

Progress = Callable[[int, int], None]  # (rows just finished, total rows)


def special_ids(tokenizer) -> dict[str, int]:
    """`<s>`, `</s>`, `<pad>`, `<mask>` ids from a `tokenizers.Tokenizer` (checked, with the recipe's defaults)."""
    ids = {}
    for name, token, default in (("bos", "<s>", BOS_ID), ("eos", "</s>", EOS_ID),
                                 ("pad", "<pad>", PAD_ID), ("mask", "<mask>", MASK_ID)):
        tid = tokenizer.token_to_id(token) if tokenizer is not None else None
        ids[name] = default if tid is None else tid
    return ids


def encode_sentences(tokenizer, sentences: Iterable[str]) -> list[list[int]]:
    """Token ids with `<s>` prepended (the post-processor's `<s> $A`, done here explicitly)."""
    bos = special_ids(tokenizer)["bos"]
    texts = list(sentences)
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
    return [[bos] + list(e.ids) for e in encodings]


def _plan_rows(lengths: np.ndarray, starts: np.ndarray, use_causal: bool, use_mntp: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every model row as (sentence, j), in sentence order: j = 0 is the sentence's causal row,
    j >= 1 its MNTP copy with token j masked. Kept as two integer arrays (not token copies) so
    that a full BLiMP run (~10^6 rows) plans in little memory; rows are materialised per batch."""
    sent: list[int] = []
    js: list[int] = []
    for s, (n, start) in enumerate(zip(lengths.tolist(), starts.tolist())):
        if start >= n:
            continue  # nothing to score: the sentence's score is 0
        if use_causal:
            sent.append(s)
            js.append(0)
        if use_mntp:
            sent.extend([s] * (n - start))
            js.extend(range(start, n))
    return np.asarray(sent, dtype=np.int64), np.asarray(js, dtype=np.int64)


def token_budget_batches(row_lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Row indices per batch: longest rows first (a memory problem shows up at once), then each
    batch takes rows while rows x padded length stays within max_tokens (at least one row)."""
    order = np.argsort(-row_lengths, kind="stable")
    batches, begin = [], 0
    while begin < len(order):
        width = int(row_lengths[order[begin]])  # the longest row of this batch comes first
        end = min(len(order), begin + max(1, max_tokens // max(width, 1)))
        batches.append(order[begin:end])
        begin = end
    return batches


def padded_batch(rows: Sequence[Sequence[int]], pad_id: int, causal: bool,
                 device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids (B, T) of ``rows`` and their blocked mask: one segment per row, all
    causal or all bidirectional. The ids and segments are built with numpy and copied in one go
    (pinned, non-blocking on CUDA); the (B, T, T) mask is built on ``device``."""
    from gptbert.model import build_blocked_mask

    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    width = int(lengths.max())
    inside = np.arange(width)[None, :] < lengths[:, None]
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    ids[inside] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
    ids_t, seg = _to_device([ids, inside.astype(np.int64)], torch.device(device or "cpu"))
    causal_t = torch.full((len(rows),), causal, dtype=torch.bool, device=ids_t.device)
    return ids_t, build_blocked_mask(seg, causal_t)


def _batch_arrays(batch: np.ndarray, row_sent: np.ndarray, row_j: np.ndarray, row_lengths: np.ndarray,
                  lengths: np.ndarray, starts: np.ndarray, offsets: np.ndarray, flat: np.ndarray, n: int,
                  mask_id: int, pad_id: int) -> list[np.ndarray]:
    """The int64 arrays of one batch of rows: input ids and segment ids (B, width), causal flags (B,),
    and per scored position (row-major, positions ascending) its row, position, target and owner
    (``s`` for a causal row's sum, ``n + s`` for an MNTP copy's).

    A causal row (j = 0) is the sentence without its last token; outputs start-1 .. L-2 predict
    tokens start .. L-1. An MNTP copy has token j masked and is read at j - 1."""
    sent, j = row_sent[batch], row_j[batch]
    width = int(row_lengths[batch].max())
    cols = np.arange(width)
    inside = cols[None, :] < row_lengths[batch][:, None]
    take = np.minimum(offsets[sent][:, None] + cols[None, :], len(flat) - 1)
    ids = np.where(inside, flat[take], pad_id)
    mntp = np.flatnonzero(j > 0)
    ids[mntp, j[mntp]] = mask_id
    is_causal = j == 0
    counts = np.where(is_causal, lengths[sent] - starts[sent], 1)
    rows = np.repeat(np.arange(len(batch)), counts)
    k = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)  # index within its row
    positions = np.where(is_causal[rows], starts[sent][rows] - 1 + k, j[rows] - 1)
    targets = flat[offsets[sent][rows] + positions + 1]
    owner = np.where(is_causal, 0, n)[rows] + sent[rows]
    return [ids, inside.astype(np.int64), is_causal.astype(np.int64), rows, positions, targets, owner]


def _to_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """The int64 ``arrays`` on ``device`` in one copy: packed into one buffer, pinned and copied without
    blocking on CUDA (the host goes on to the next batch), then split there into views of the shapes."""
    packed = torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays]))
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    else:
        packed = packed.to(device)
    out, begin = [], 0
    for a in arrays:
        out.append(packed[begin: begin + a.size].view(a.shape))
        begin += a.size
    return out


def resolve_max_tokens(max_tokens: int | str, model: torch.nn.Module, width: int) -> int:
    """The scoring batch budget in tokens: an integer as it is; ``"auto"`` is ``CPU_MAX_TOKENS`` off
    CUDA and, on CUDA, the largest budget whose forward at rows of ``width`` tokens fits the device
    (``gptbert.device.fit_eval_max_tokens`` over ``forward_probe``, measured once per model and
    power-of-two width)."""
    if max_tokens != "auto":
        return int(max_tokens)
    device = _model_device(model)
    if device.type != "cuda":
        return CPU_MAX_TOKENS
    from .device import fit_eval_max_tokens, free_cuda

    bucket = 1 << max(4, (max(width, 1) - 1).bit_length())  # rows of at most this width: a safe budget
    known = _AUTO_BUDGETS.setdefault(model, {})
    if bucket not in known:
        try:
            known[bucket] = fit_eval_max_tokens(model, bucket, forward_probe(model, bucket))
        finally:
            free_cuda(device)
    return known[bucket]


def forward_probe(model: torch.nn.Module, width: int) -> Callable[[int], int]:
    """``measure(n)``: the peak CUDA memory of one scoring forward of ``n`` rows of ``width`` random
    tokens through ``model`` (inference mode, the caller's autocast) and its LM head on one chunk of
    scored positions, as ``score_ids`` runs it (``device.fit_eval_max_tokens`` searches with it)."""
    from .device import free_cuda
    from .model import build_blocked_mask

    device = next(model.parameters()).device
    vocab = model.config.vocab_size

    @torch.inference_mode()
    def measure(n: int) -> int:
        free_cuda(device)
        ids = torch.randint(NUM_SPECIAL, vocab, (n, width), device=device)
        blocked = build_blocked_mask(torch.ones_like(ids), torch.zeros(n, dtype=torch.bool, device=device))
        hidden = model(ids, blocked)
        model.lm_logits(hidden.reshape(-1, hidden.size(-1))[:HEAD_CHUNK])
        torch.cuda.synchronize(device)
        del ids, blocked, hidden
        return torch.cuda.max_memory_allocated(device)

    return measure


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def target_log_probs(logits: torch.Tensor, targets: torch.Tensor,
                     temperatures: Sequence[float]) -> torch.Tensor:
    """log_softmax(logits / T)[target] for every T: (N, V), (N,) -> (N, len(temperatures)) float64.

    Computed in the logits' precision (at least float32); the per-sentence sums are float64.
    """
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    chosen = logits.gather(1, targets[:, None])[:, 0]
    out = torch.empty(logits.shape[0], len(temperatures), dtype=torch.float64, device=logits.device)
    for k, t in enumerate(temperatures):
        out[:, k] = chosen / t - torch.logsumexp(logits / t, dim=-1)
    return out


@torch.inference_mode()
def score_ids(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    modes: Sequence[str] = ("causal", "mntp", "fused"),
    temperatures: Sequence[float] = (1.0,),
    max_tokens: int | str = "auto",
    score_from: Sequence[int] | None = None,
    mask_id: int = MASK_ID,
    pad_id: int = PAD_ID,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """Sum of token log-probs per sequence, per mode, per temperature.

    sequences: token ids that already start with `<s>`. score_from: optional per-sequence index of
    the first token to score (earlier tokens are context only, e.g. log P(target | context)).
    max_tokens: the batch budget (rows x padded length), or ``"auto"`` (``resolve_max_tokens``).
    Returns {mode: float64 array (len(sequences), len(temperatures))} for each requested mode.

    The host builds each batch with numpy and hands it over in one copy (pinned and asynchronous on
    CUDA); the scores stay on the device until the end.
    """
    from gptbert.model import build_blocked_mask

    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown scoring mode {m!r} (known: {', '.join(MODES)})")
    temperatures = [float(t) for t in temperatures]
    if not temperatures or any(not (t > 0) for t in temperatures):
        raise ValueError(f"temperatures must be positive, got {temperatures}")
    if score_from is not None and len(score_from) != len(sequences):
        raise ValueError("score_from must have one entry per sequence")
    use_causal = any(m in ("causal", "fused") for m in modes)
    use_mntp = any(m in ("mntp", "fused") for m in modes)

    lengths = np.asarray([len(ids) for ids in sequences], dtype=np.int64)
    starts = np.ones(len(sequences), dtype=np.int64) if score_from is None else \
        np.maximum(1, np.asarray(score_from, dtype=np.int64))
    row_sent, row_j = _plan_rows(lengths, starts, use_causal, use_mntp)
    # Under the causal mask the last token influences nothing that is scored: the causal row drops it.
    row_lengths = lengths[row_sent] - (row_j == 0)
    device = _model_device(model)
    budget = resolve_max_tokens(max_tokens, model, int(row_lengths.max()) if len(row_lengths) else 1)
    n = len(sequences)
    # One flat copy of every token (the rows of a batch are gathered from it with numpy, not per row
    # in Python); a sentence's tokens are flat[offsets[s]: offsets[s] + lengths[s]].
    flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    totals = torch.zeros(2 * n, len(temperatures), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for batch in token_budget_batches(np.asarray(row_lengths), budget):
            arrays = _batch_arrays(batch, row_sent, row_j, row_lengths, lengths, starts, offsets, flat, n,
                                   mask_id, pad_id)
            input_ids, segment_ids, causal, row_idx, pos_idx, targets_t, owner_t = _to_device(arrays, device)
            hidden = model(input_ids, build_blocked_mask(segment_ids, causal.bool()))
            # The LM head runs only at the scored positions, in chunks so that the (targets x vocab)
            # logits stay small whatever the budget.
            picked = hidden[row_idx, pos_idx]
            for c in range(0, len(arrays[-1]), HEAD_CHUNK):
                logits = model.lm_logits(picked[c: c + HEAD_CHUNK])
                lp = target_log_probs(logits, targets_t[c: c + HEAD_CHUNK], temperatures)
                totals.index_add_(0, owner_t[c: c + HEAD_CHUNK], lp)
            if progress is not None:
                progress(len(batch), len(row_sent))
    finally:
        model.train(was_training)

    totals = totals.cpu().numpy()
    causal_scores, mntp_scores = totals[:n], totals[n:]
    out: dict[str, np.ndarray] = {}
    for m in modes:
        if m == "causal":
            out[m] = causal_scores.copy()
        elif m == "mntp":
            out[m] = mntp_scores.copy()
        else:
            out[m] = causal_scores + mntp_scores
    return out


def count_rows(sequences: Sequence[Sequence[int]], modes: Sequence[str]) -> int:
    """How many model rows `score_ids` will run (for progress bars)."""
    use_causal = any(m in ("causal", "fused") for m in modes)
    use_mntp = any(m in ("mntp", "fused") for m in modes)
    return sum((len(s) > 1) * (int(use_causal) + int(use_mntp) * (len(s) - 1)) for s in sequences)


def score_sentences(
    model: torch.nn.Module,
    tokenizer,
    sentences: Sequence[str],
    modes: Sequence[str] = ("causal", "mntp", "fused"),
    temperatures: Sequence[float] = (1.0,),
    max_tokens: int | str = "auto",
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """`score_ids` on raw text: {mode: (len(sentences), len(temperatures))} sums of log-probs."""
    ids = special_ids(tokenizer)
    return score_ids(model, encode_sentences(tokenizer, sentences), modes, temperatures, max_tokens,
                     mask_id=ids["mask"], pad_id=ids["pad"], progress=progress)


def score_sentence(model: torch.nn.Module, tokenizer, sentence: str, mode: str = "fused",
                   temperature: float = 1.0) -> float:
    """One sentence, one mode, one temperature."""
    return float(score_sentences(model, tokenizer, [sentence], [mode], [temperature])[mode][0, 0])
