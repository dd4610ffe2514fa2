"""Learning curve on real text: validation loss and BLiMP accuracy against words seen.

Trains one configuration with the plain single-process loop on a shard folder and, every
``--every-words`` words of training data consumed, evaluates the EMA weights (the weights a model
folder would hold): masked and causal validation loss, and BLiMP-format minimal pairs in causal and
MNTP mode at T = 1. Optionally prints the n-gram baselines of the same shards beside it, so a
curve can be read against "what word-pair counts already get".

    python benchmarks/learning_curve.py --data work/shards --blimp BLIMP_DIR \
        --preset mini --set train.steps=2000 --every-words 1000000 --ngram 2 3 --out curve.jsonl

Prints one table row per evaluation (and appends it as JSON to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import load_config  # noqa: E402
from gptbert.evaluation.minimal_pairs import blimp_accuracy, load_blimp  # noqa: E402
from gptbert.kernels import build_model  # noqa: E402
from gptbert.scoring import score_sentences  # noqa: E402
from gptbert.data import open_data  # noqa: E402
from gptbert.objective import PackingPlanner  # noqa: E402
from gptbert.pretraining import build_local_backend  # noqa: E402
from gptbert.trainer import Trainer, unwrap  # noqa: E402


def blimp_t1(model, tokenizer, pairs, modes=("causal", "mntp")) -> dict[str, float]:
    index: dict[str, int] = {}
    for p in pairs:
        index.setdefault(p.good, len(index))
        index.setdefault(p.bad, len(index))
    scores = score_sentences(model, tokenizer, list(index), modes=list(modes), temperatures=[1.0])
    g = np.array([index[p.good] for p in pairs])
    b = np.array([index[p.bad] for p in pairs])
    return {m: blimp_accuracy(pairs, scores[m][g], scores[m][b], [1.0])["t1"]["accuracy"] for m in modes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="shard folder (with tokenizer.json)")
    ap.add_argument("--blimp", required=True, help="folder of BLiMP-format jsonl files")
    ap.add_argument("--preset", help="a preset (default: the --config file's own, else mini)")
    ap.add_argument("--config", help="a config file, e.g. recipes/cpu-realtext.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--every-words", type=float, default=1e6, help="evaluate every this many words seen")
    ap.add_argument("--max-pairs", type=int, default=200, help="pairs per paradigm at intermediate points")
    ap.add_argument("--ngram", type=int, nargs="*", default=[], help="n-gram baselines to print first")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--out", help="append one JSON line per evaluation here")
    ap.add_argument("--label", default="", help="name of this run in the output")
    ap.add_argument("--order", choices=["segments", "documents"], default="segments",
                    help="data order: the trainer's shuffled segments, or whole documents in turn (the "
                         "order before segments were shuffled, for comparison)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from tokenization.tokenizer import load_tokenizer

    cfg = load_config(args.preset or (None if args.config else "mini"), args.config, args.overrides)
    data = open_data(args.data)
    source, valid = data.train, data.valid
    tokenizer = load_tokenizer(data.tokenizer)
    pairs_all = load_blimp(args.blimp)
    pairs = load_blimp(args.blimp, args.max_pairs)
    out = Path(args.out) if args.out else None

    def emit(row: dict) -> None:
        row = {"label": args.label, **row}
        cells = [f"{row.get(k, ''):>10}" if not isinstance(row.get(k), float) else f"{row[k]:>10.4f}"
                 for k in ("words", "tokens", "minutes", "valid_masked", "valid_causal", "blimp_causal",
                           "blimp_mntp")]
        print(f"{row['label']:<14}" + " ".join(cells), flush=True)
        if out is not None:
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")

    print(f"{'run':<14}" + " ".join(f"{h:>10}" for h in ("words", "tokens", "minutes", "val_mask", "val_caus",
                                                         "blimp_c", "blimp_m")))
    if args.ngram:
        from gptbert.ngram import NGramLM

        for order in args.ngram:
            lm = NGramLM.fit(source, order)
            good = lm.score_sentences(tokenizer, [p.good for p in pairs_all])
            bad = lm.score_sentences(tokenizer, [p.bad for p in pairs_all])
            acc = blimp_accuracy(pairs_all, good[:, None], bad[:, None], [1.0])["t1"]["accuracy"]
            emit({"label": f"{order}-gram", "words": source.num_words, "tokens": source.num_tokens,
                  "valid_causal": float(np.log(lm.perplexity(valid))) if valid is not None else None,
                  "blimp_causal": acc})

    backend = build_local_backend(cfg.model, cfg.train)
    trainer = Trainer(cfg.model, cfg.train, source, backend, valid)
    if args.order == "documents":
        trainer.stream.planner = PackingPlanner(source.lengths, cfg.train.seed)
    eval_model = build_model(cfg.model).eval()
    words_per_token = trainer.words_per_token or 1.0
    next_eval = args.every_words
    started = time.time()
    train_seconds = 0.0

    def evaluate(final: bool) -> None:
        trainer.ema.copy_to(eval_model)
        losses = trainer.validate_ema()
        acc = blimp_t1(eval_model, tokenizer, pairs_all if final else pairs)
        emit({"step": trainer.step, "words": int(trainer.tokens_seen * words_per_token),
              "tokens": trainer.tokens_seen, "minutes": round(train_seconds / 60, 2),
              "valid_masked": losses.get("valid_loss_masked_ema"),
              "valid_causal": losses.get("valid_loss_causal_ema"),
              "blimp_causal": acc["causal"], "blimp_mntp": acc["mntp"], "final": final,
              "train_loss": trainer.last_metrics.get("loss")})

    while trainer.step < cfg.train.steps:
        t0 = time.perf_counter()
        trainer.train_step()
        train_seconds += time.perf_counter() - t0
        if trainer.tokens_seen * words_per_token >= next_eval and trainer.step < cfg.train.steps:
            evaluate(final=False)
            while next_eval <= trainer.tokens_seen * words_per_token:
                next_eval += args.every_words
    evaluate(final=True)
    print(f"# {args.label}: {trainer.step} steps, {trainer.tokens_seen} tokens, "
          f"{train_seconds / 60:.1f} min training, {(time.time() - started) / 60:.1f} min in all, "
          f"{trainer.tokens_seen / max(train_seconds, 1e-9):.0f} tokens/s, precision "
          f"{'bf16' if trainer.autocast_dtype is not None else 'fp32'}, "
          f"{sum(p.numel() for p in unwrap(backend.module).parameters())} parameters", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
