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

from typing import Callable, Iterable, Sequence

import numpy as np
import torch

MODES = ("causal", "mntp", "fused")

# Special token ids fixed by the tokenizer contract (recipe §4).
UNK_ID, BOS_ID, EOS_ID, PAD_ID, MASK_ID = 0, 1, 2, 3, 4
NUM_SPECIAL = 16
HEAD_CHUNK = 2048  # scored positions per LM-head call

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
    causal or all bidirectional."""
    from gptbert.model import build_blocked_mask

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    seg = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        seg[i, : len(r)] = 1
    blocked = build_blocked_mask(seg, torch.full((len(rows),), causal, dtype=torch.bool))
    return ids.to(device), blocked.to(device)


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
    max_tokens: int = 8192,
    score_from: Sequence[int] | None = None,
    mask_id: int = MASK_ID,
    pad_id: int = PAD_ID,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """Sum of token log-probs per sequence, per mode, per temperature.

    sequences: token ids that already start with `<s>`. score_from: optional per-sequence index of
    the first token to score (earlier tokens are context only, e.g. log P(target | context)).
    Returns {mode: float64 array (len(sequences), len(temperatures))} for each requested mode.
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
    n = len(sequences)
    totals = torch.zeros(2 * n, len(temperatures), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for batch in token_budget_batches(np.asarray(row_lengths), max_tokens):
            width = int(row_lengths[batch].max())
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            segment_ids = torch.zeros((len(batch), width), dtype=torch.long)
            causal = torch.from_numpy(row_j[batch] == 0)
            row_idx, pos_idx, targets, owner = [], [], [], []
            for i, r in enumerate(batch.tolist()):
                s, j = int(row_sent[r]), int(row_j[r])
                ids = [int(t) for t in sequences[s]]
                start = int(starts[s])
                if j == 0:  # causal: outputs start-1 .. L-2 predict tokens start .. L-1
                    row, positions, tgt = ids[:-1], list(range(start - 1, len(ids) - 1)), ids[start:]
                else:  # MNTP copy: token j masked, predicted at j - 1
                    row, positions, tgt = list(ids), [j - 1], [ids[j]]
                    row[j] = mask_id
                input_ids[i, : len(row)] = torch.tensor(row)
                segment_ids[i, : len(row)] = 1
                row_idx += [i] * len(positions)
                pos_idx += positions
                targets += tgt
                owner += [(j > 0) * n + s] * len(positions)
            input_ids, segment_ids, causal = input_ids.to(device), segment_ids.to(device), causal.to(device)
            hidden = model(input_ids, build_blocked_mask(segment_ids, causal))
            # The LM head runs only at the scored positions, in chunks so that the (targets x vocab)
            # logits stay small whatever the budget.
            picked = hidden[torch.tensor(row_idx, device=device), torch.tensor(pos_idx, device=device)]
            targets_t = torch.tensor(targets, device=device)
            owner_t = torch.tensor(owner, device=device)
            for c in range(0, len(targets), HEAD_CHUNK):
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
    max_tokens: int = 8192,
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
