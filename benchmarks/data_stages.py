"""Data-stage throughput against the raw libraries, on the same text in one process.

    python benchmarks/data_stages.py [--source DIR] [--mb 5] [--vocab 8192] [--repeats 2]

Prints one table: clean MB/s; tokenizer training seconds, ours (train_tokenizer: Parquet in,
atomic folder out) vs the same tokenizers pipeline trained from an in-memory list; shard encoding
tokens/s, ours (write_shards: split, encode, Arrow shards, manifest) vs a bare
``encode_batch_fast`` / ``encode_batch`` over the in-memory list; ShardReader random-window
tokens/s vs slicing an in-memory numpy array. Each pair alternates and keeps the best of
``--repeats`` runs, so the ratio compares like with like on a busy machine.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config.data import CleanConfig, ShardConfig, TokenizerConfig  # noqa: E402
from tokenization.clean import clean_corpus, iter_documents  # noqa: E402
from tokenization.shards import ShardReader, write_shards  # noqa: E402
from tokenization.tokenizer import build_tokenizer, build_trainer, load_tokenizer, train_tokenizer  # noqa: E402

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "babylm-sample"


CPU = {}  # id(fn) -> best process CPU seconds (all threads), less sensitive to a busy machine


def best(fn, repeats, key=None):
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if key is not None:
        CPU[key] = min(cpu + [CPU.get(key, float("inf"))])
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(DEFAULT_SOURCE), help="folder of *.gz / *.txt text files")
    ap.add_argument("--mb", type=float, default=5.0, help="MB of text taken (evenly over the files)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--windows", type=int, default=20000)
    args = ap.parse_args()

    src = Path(args.source)
    files = sorted(p for p in src.iterdir() if p.name.endswith((".gz", ".txt")))
    if not files:
        sys.exit(f"no .gz/.txt files in {src}")
    per_file = int(args.mb * 1e6 / len(files))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        for p in files:
            opener = gzip.open if p.name.endswith(".gz") else open
            with opener(p, "rt", encoding="utf-8", errors="replace") as f:
                text = f.read(per_file)
            (tmp / "in" / (p.name.split(".")[0] + ".txt")).write_text(text, encoding="utf-8")
        in_bytes = sum(p.stat().st_size for p in (tmp / "in").iterdir())

        # Clean, with a bare read + decode + NFKC of the same files as the reference.
        import unicodedata

        def bare_read():
            for p in (tmp / "in").iterdir():
                for line in p.read_bytes().split(b"\n"):
                    unicodedata.normalize("NFKC", line.decode("utf-8", "replace"))

        cfg = CleanConfig(inputs=[str(tmp / "in")])
        t_bare = best(bare_read, args.repeats)
        t_clean = best(lambda: clean_corpus(cfg, tmp / "clean", progress_bar=False), args.repeats)
        rows.append(("clean (MB/s)", in_bytes / 1e6 / t_clean, in_bytes / 1e6 / t_bare,
                     "read+decode+NFKC only"))

        docs = tmp / "clean" / "documents.parquet"
        texts = list(itertools.chain.from_iterable(iter_documents(docs)))
        tcfg = TokenizerConfig(vocab_size=args.vocab)

        def raw_train():
            tok = build_tokenizer(tcfg)
            tok.train_from_iterator(texts, trainer=build_trainer(tcfg), length=len(texts))

        t_raw, t_ours = [], []
        for _ in range(args.repeats):
            t_raw.append(best(raw_train, 1, "train_raw"))
            t_ours.append(best(lambda: train_tokenizer(docs, tcfg, tmp / "tok", progress_bar=False), 1,
                               "train_ours"))
        rows.append(("tokenizer training (s, wall)", min(t_ours), min(t_raw), "train_from_iterator(list)"))
        rows.append(("tokenizer training (s, CPU)", CPU["train_ours"], CPU["train_raw"], "same, process CPU time"))

        tok = load_tokenizer(tmp / "tok")
        n_tokens = sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False))
        scfg = ShardConfig()
        t_fast, t_batch, t_shard = [], [], []
        for _ in range(args.repeats):
            t_fast.append(best(lambda: tok.encode_batch_fast(texts, add_special_tokens=False), 1, "fast"))
            t_shard.append(best(lambda: write_shards(docs, tmp / "tok", scfg, tmp / "shards",
                                                     progress_bar=False), 1, "shard"))
            t_batch.append(best(lambda: tok.encode_batch(texts, add_special_tokens=False), 1))
        rows.append(("shard encoding (tokens/s)", n_tokens / min(t_shard), n_tokens / min(t_fast),
                     "encode_batch_fast(list)"))
        rows.append(("shard encoding (tokens/CPU-s)", n_tokens / CPU["shard"], n_tokens / CPU["fast"],
                     "same, process CPU time"))
        rows.append(("", None, n_tokens / min(t_batch), "encode_batch(list), wall"))

        reader = ShardReader(tmp / "shards", tmp / "tok")
        flat = np.concatenate([np.array(v) for v in reader._values])
        length = 512

        def read_windows():
            s = 0
            for w in reader.random_windows(length, args.windows, seed=0):
                s += int(w[0]) + int(w[-1])  # touch the window
            return s

        def numpy_windows():
            rng = np.random.default_rng(0)
            s = 0
            for g in rng.integers(0, len(flat) - length + 1, size=args.windows):
                w = flat[g: g + length]
                s += int(w[0]) + int(w[-1])
            return s

        t_read = best(read_windows, args.repeats)
        t_np = best(numpy_windows, args.repeats)
        rows.append((f"reader random windows of {length} (tokens/s)", args.windows * length / t_read,
                     args.windows * length / t_np, "slices of an in-memory array"))
        reader.close()

    print(f"text: {in_bytes / 1e6:.1f} MB from {src} ({len(texts)} documents, {n_tokens} tokens, "
          f"vocab {args.vocab}), best of {args.repeats}")
    print(f"{'stage':<42} {'ours':>12} {'baseline':>12} {'ours/base':>9}  baseline")
    for name, ours, base, what in rows:
        if ours is None:
            print(f"{name:<42} {'':>12} {base:>12.3g} {'':>9}  {what}")
            continue
        ratio = ours / base
        print(f"{name:<42} {ours:>12.3g} {base:>12.3g} {ratio:>9.2f}  {what}")
    print("(for training time lower is better; for rates higher is better)")


if __name__ == "__main__":
    main()
