"""The BabyLM 2025 ``reading`` task: does the model's surprisal predict human reading measures?

The official pipeline (``evaluation_pipeline/reading``) reads ``reading/reading_data.csv`` (one row
per word in context: ``item`` the text before the word, ``word``, ``prev_item``/``prev_word`` for
the word before it, human measures, and lexical predictors), computes each word's surprisal, and
fits ordinary least squares regressions with and without it. Its two scores:

- eye tracking: for each of RTfirstfix, RTfirstpass, RTgopast, RTrightbound, the gain in R^2 from
  adding surprisal to a baseline of log frequency, length, context length and their pairwise
  products, as a percentage of the possible gain, (R2 - R2_base) / (1 - R2_base) * 100; averaged;
- self-paced reading: the same for self_paced_reading_time with a one-word spillover baseline
  (adds the previous word's length and surprisal, and all pairwise products).

Surprisal follows the pipeline's ``get_p2`` rules exactly, on strings: the first token of the
word (tokenised alone) given the tokenised ``item``; a word of several tokens continues with the
context extended by the decoded token, each later token decoded and tokenised again. ``causal``
reads the next-token distribution after the context; ``mntp`` appends three ``<mask>`` tokens and
reads the distribution at the last context token (masked next-token prediction). Only T = 1.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

READING_FILE = Path("reading") / "reading_data.csv"
EYE_TRACKING = ("RTfirstfix", "RTfirstpass", "RTgopast", "RTrightbound")
SELF_PACED = "self_paced_reading_time"
VARIABLES = EYE_TRACKING + (SELF_PACED, "ELAN", "LAN", "N400", "P600", "EPNP", "PNP")
PREDICTORS = ("Subtlex_log10", "length", "context_length")
SPILLOVER = PREDICTORS + ("prev_length", "prev_pred")
TEXT_COLUMNS = ("item", "word", "prev_item", "prev_word")
NUM_MASKS = 3  # the pipeline's --number_of_mask_tokens_to_append default
MODES = ("causal", "mntp")


class ReadingFormatError(ValueError):
    """A reading_data.csv that cannot be read; names the file, line and column."""


def load_reading(path: str | Path) -> dict[str, list]:
    """Columns of reading_data.csv, read as the pipeline's pandas call does: text columns as
    strings (an empty ``item`` is the string "None", an empty ``prev_item`` means no previous word),
    numeric columns as floats (empty = NaN)."""
    path = Path(path)
    needed = TEXT_COLUMNS + VARIABLES + ("Subtlex_log10", "length", "context_length", "prev_length")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        absent = [c for c in needed if c not in (reader.fieldnames or [])]
        if absent:
            raise ReadingFormatError(f"{path}: missing column(s) {', '.join(absent)}")
        cols: dict[str, list] = {c: [] for c in needed}
        for row in reader:
            line = reader.line_num
            for c in needed:
                value = row[c]
                if c in TEXT_COLUMNS:
                    value = value if value != "" else (None if c != "item" else "None")
                    if c == "word" and value is None:
                        raise ReadingFormatError(f"{path}:{line}: column 'word' is empty")
                else:
                    try:
                        value = float(value) if value.strip() != "" else math.nan
                    except ValueError:
                        raise ReadingFormatError(f"{path}:{line}: column {c!r} must be a number, got {value!r}") from None
                cols[c].append(value)
    if not cols["word"]:
        raise ReadingFormatError(f"{path}: no rows")
    return cols


# ----------------------------------------------------------------------------- surprisal

def _queries(tokenizer, context: str, word: str, mode: str, mask: str) -> list[tuple[str, int]]:
    """(context text, target id) of each token of ``word``, as ``get_p2``/``get_p2_mntp`` form them."""
    target = tokenizer.encode(word, add_special_tokens=False).ids
    if not target:
        raise ReadingFormatError(f"word {word!r} encodes to no token")
    suffix = mask * NUM_MASKS if mode == "mntp" else ""
    out = [(context + suffix, target[0])]
    context = context + tokenizer.decode([target[0]])
    for token in target[1:]:
        piece = tokenizer.decode([token])
        ids = tokenizer.encode(piece, add_special_tokens=False).ids
        if not ids:  # the decoded piece re-encodes to nothing (the pipeline would fail here)
            raise ReadingFormatError(f"a token of word {word!r} decodes to {piece!r}, which encodes to no token")
        out.append((context + suffix, ids[0]))
        context = context + piece
    return out


def _position(ids: list[int], mode: str, mask_id: int) -> int:
    """The output position the pipeline reads: the last one (causal); the last context token before
    the masks (mntp), one further left when the tokenizer appended an end token."""
    if mode == "causal":
        return len(ids) - 1
    return len(ids) - (NUM_MASKS + 1 if ids[-1] == mask_id else NUM_MASKS + 2)


@torch.inference_mode()
def _log_probs(model, rows: list[list[int]], positions: list[int], targets: list[int], causal: bool,
               pad_id: int, max_tokens: int | str) -> np.ndarray:
    """log P(target) at each row's position (one forward per length-sorted batch; the values stay on
    the device until the end)."""
    from gptbert.scoring import padded_batch, resolve_max_tokens, token_budget_batches

    device = next(model.parameters()).device
    out = torch.zeros(len(rows), dtype=torch.float64, device=device)
    if not rows:
        return out.cpu().numpy()
    lengths = np.array([len(r) for r in rows])
    budget = resolve_max_tokens(max_tokens, model, int(lengths.max()))
    was_training = model.training
    model.eval()
    try:
        for batch in token_budget_batches(lengths, budget):
            batch = batch.tolist()
            ids, blocked = padded_batch([rows[i] for i in batch], pad_id, causal, device)
            hidden = model(ids, blocked)
            picked = hidden[torch.arange(len(batch), device=device), torch.tensor([positions[i] for i in batch], device=device)]
            logp = torch.log_softmax(model.lm_logits(picked).float(), dim=-1)
            tgt = torch.tensor([targets[i] for i in batch], device=device)
            out[torch.tensor(batch, device=device)] = logp.gather(1, tgt[:, None])[:, 0].double()
    finally:
        model.train(was_training)
    return out.cpu().numpy()


def surprisals(model, tokenizer, contexts: Sequence[str], words: Sequence[str], mode: str,
               max_tokens: int | str = "auto") -> np.ndarray:
    """-log P(word | context) in nats for each pair (the product over the word's tokens)."""
    from gptbert.scoring import special_ids

    special = special_ids(tokenizer)
    mask = tokenizer.id_to_token(special["mask"])
    per_word = [_queries(tokenizer, c, w, mode, mask) for c, w in zip(contexts, words)]
    index: dict[tuple[str, int], int] = {}
    for queries in per_word:
        for q in queries:
            index.setdefault(q, len(index))
    keys = list(index)
    encoded = tokenizer.encode_batch([k[0] for k in keys]) if keys else []  # <s> first, as tokenizer(text)
    rows = [list(e.ids) for e in encoded]
    positions = [_position(r, mode, special["mask"]) for r in rows]
    lp = _log_probs(model, rows, positions, [k[1] for k in keys], mode == "causal", special["pad"], max_tokens)
    return np.array([-sum(lp[index[q]] for q in queries) for queries in per_word])


# ----------------------------------------------------------------------------- regression

def _design(cols: dict[str, np.ndarray], terms: Sequence[str]) -> np.ndarray:
    """Intercept plus each term; ``a:b`` is the product of two columns (the formula's interaction)."""
    parts = [np.ones(len(next(iter(cols.values()))))]
    for term in terms:
        names = term.split(":")
        value = np.ones_like(parts[0])
        for name in names:
            value = value * cols[name]
        parts.append(value)
    return np.stack(parts, axis=1)


def _pairwise(names: Sequence[str]) -> list[str]:
    return list(names) + [f"{a}:{b}" for i, a in enumerate(names) for b in names[i + 1:]]


def ols(y: np.ndarray, x: np.ndarray) -> dict[str, float]:
    """Least squares with the intercept in ``x``: R^2 (centred) and the last column's coefficient
    and t value (what the pipeline reads from statsmodels' OLS)."""
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ beta
    ssr = float(resid @ resid)
    centred = y - y.mean()
    r2 = 1.0 - ssr / float(centred @ centred)
    dof = len(y) - np.linalg.matrix_rank(x)
    sigma2 = ssr / dof if dof > 0 else math.nan
    cov = sigma2 * np.linalg.pinv(x.T @ x)
    se = math.sqrt(cov[-1, -1]) if cov[-1, -1] > 0 else math.nan
    return {"r2": r2, "coefficient": float(beta[-1]), "t": float(beta[-1] / se) if se else math.nan}


def predictive_power(cols: dict[str, np.ndarray], variable: str, spillover: bool) -> dict[str, float]:
    """R^2 of ``variable`` without and with surprisal (``pred``), each fitted on its own complete
    rows (the pipeline's two ``dropna`` calls), and the gain as % of the possible gain."""
    base_names = SPILLOVER if spillover else PREDICTORS
    terms = _pairwise(base_names)

    def fit(names: Sequence[str], with_pred: bool) -> dict[str, float]:
        used = [variable, *names] + (["pred"] if with_pred else [])
        keep = np.all([~np.isnan(cols[c]) for c in used], axis=0)
        sub = {c: cols[c][keep] for c in used}
        return ols(sub[variable], _design(sub, terms + (["pred"] if with_pred else [])))

    base, model = fit(base_names, False), fit(base_names, True)
    gain = (model["r2"] - base["r2"]) / (1.0 - base["r2"]) * 100
    return {"r2_baseline": base["r2"], "r2": model["r2"], "delta_r2": model["r2"] - base["r2"],
            "score": gain, "coefficient": model["coefficient"], "t": model["t"]}


def evaluate_reading(model, tokenizer, data: dict[str, list], modes: Sequence[str] = MODES,
                     max_tokens: int | str = "auto") -> dict[str, Any]:
    """The reading task's results per mode for ``data`` (``load_reading``'s columns): the
    eye-tracking and self-paced scores, each variable's fit, and the Pearson correlation of surprisal
    with every measure."""
    numeric = {c: np.asarray(v, dtype=np.float64) for c, v in data.items() if c not in TEXT_COLUMNS}
    has_prev = [p is not None for p in data["prev_item"]]
    out: dict[str, Any] = {}
    for mode in [m for m in modes if m in MODES]:
        pred = surprisals(model, tokenizer, data["item"], data["word"], mode, max_tokens)
        prev = np.full(len(pred), np.nan)
        idx = [i for i, h in enumerate(has_prev) if h]
        if idx:
            prev[idx] = surprisals(model, tokenizer, [data["prev_item"][i] for i in idx],
                                   [data["prev_word"][i] or "None" for i in idx], mode, max_tokens)
        cols = {**numeric, "pred": pred, "prev_pred": prev}
        fits = {v: predictive_power(cols, v, spillover=False) for v in VARIABLES}
        spill = {v: predictive_power(cols, v, spillover=True) for v in VARIABLES}
        corr = {}
        for v in VARIABLES:
            keep = ~np.isnan(cols[v]) & ~np.isnan(pred)
            corr[v] = float(np.corrcoef(pred[keep], cols[v][keep])[0, 1]) if keep.sum() > 1 else math.nan
        out[mode] = {"eye_tracking": float(np.mean([fits[v]["score"] for v in EYE_TRACKING])),
                     "self_paced": spill[SELF_PACED]["score"], "fits": fits, "spillover_fits": spill,
                     "correlations": corr, "mean_surprisal": float(np.mean(pred))}
    return out
