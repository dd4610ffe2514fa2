"""Data-stage throughput against the raw libraries, on the same text in one process.

    python benchmarks/data_stages.py [--source DIR] [--mb 5] [--vocab 8192] [--repeats 2]
                                     [--ray-workers 1,2] [--ray-block-kb 512] [--no-ray]

Prints one table: clean MB/s; tokenizer training seconds, ours (train_tokenizer: Parquet in,
atomic folder out) vs the same tokenizers pipeline trained from an in-memory list; shard encoding
tokens/s, ours (write_shards: split, encode, Arrow shards, manifest) vs a bare
``encode_batch_fast`` / ``encode_batch`` over the in-memory list; ShardReader random-window
tokens/s vs slicing an in-memory numpy array. Each pair alternates and keeps the best of
``--repeats`` runs, so the ratio compares like with like on a busy machine.

Then the Ray engine (``clean.engine`` / ``shard.engine`` = ray) on a local Ray of this machine's
CPUs, with 1 and 2 workers (tasks of one CPU, one tokenizers thread each) and parts/blocks of
``--ray-block-kb``: clean MB/s against the local engine, shard tokens/s against the local engine
and against the raw ``encode_batch_fast`` of the same run. Ray is started once (its start-up is
its own row) and each timing keeps the best of ``--repeats`` runs, the first of which also
starts the workers.
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

REPO = Path(__file__).resolve().parents[1]
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
    ap.add_argument("--ray-workers", default="1,2", help="worker counts of the Ray engine rows")
    ap.add_argument("--ray-block-kb", type=int, default=512, help="Ray engine: KiB per part / block")
    ap.add_argument("--no-ray", action="store_true", help="leave out the Ray engine rows")
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
        clean_rate = in_bytes / 1e6 / t_clean

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
        t_fast, t_fresh, t_batch, t_shard = [], [], [], []
        for _ in range(args.repeats):
            t_fast.append(best(lambda: tok.encode_batch_fast(texts, add_special_tokens=False), 1, "fast"))
            t_shard.append(best(lambda: write_shards(docs, tmp / "tok", scfg, tmp / "shards",
                                                     progress_bar=False), 1, "shard"))
            # write_shards loads its tokenizer from the file: a fresh one, its BPE cache empty.
            t_fresh.append(best(lambda: load_tokenizer(tmp / "tok").encode_batch_fast(texts, add_special_tokens=False),
                                1, "fresh"))
            t_batch.append(best(lambda: tok.encode_batch(texts, add_special_tokens=False), 1))
        rows.append(("shard encoding (tokens/s)", n_tokens / min(t_shard), n_tokens / min(t_fast),
                     "encode_batch_fast(list)"))
        rows.append(("shard encoding (tokens/CPU-s)", n_tokens / CPU["shard"], n_tokens / CPU["fast"],
                     "same, process CPU time"))
        rows.append(("", n_tokens / min(t_shard), n_tokens / min(t_fresh),
                     "encode_batch_fast(list), tokenizer loaded fresh"))
        rows.append(("", None, n_tokens / min(t_batch), "encode_batch(list), wall"))
        shard_rate, raw_rate = n_tokens / min(t_shard), n_tokens / min(t_fast)

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
        if not args.no_ray:
            rows += ray_rows(args, tmp, in_bytes, n_tokens, clean_rate, shard_rate, raw_rate)

    print(f"text: {in_bytes / 1e6:.1f} MB from {src} ({len(texts)} documents, {n_tokens} tokens, "
          f"vocab {args.vocab}), best of {args.repeats}")
    print(f"{'stage':<42} {'ours':>12} {'baseline':>12} {'ours/base':>9}  baseline")
    for name, ours, base, what in rows:
        if ours is None:
            print(f"{name:<42} {'':>12} {base:>12.3g} {'':>9}  {what}")
            continue
        if base is None:
            print(f"{name:<42} {ours:>12.3g} {'':>12} {'':>9}  {what}")
            continue
        ratio = ours / base
        print(f"{name:<42} {ours:>12.3g} {base:>12.3g} {ratio:>9.2f}  {what}")
    print("(for training time lower is better; for rates higher is better)")


def ray_rows(args, tmp: Path, in_bytes: int, n_tokens: int, clean_rate: float, shard_rate: float,
             raw_rate: float) -> list[tuple]:
    """The Ray engine's rows: clean and shard with 1 and 2 workers against the local engine (and
    the raw encoding) measured above in this run."""
    import os

    from common.config import load_config
    from gptbert.distributed.data_stages import run_clean, run_shard
    from gptbert.distributed.parallel import ray_session

    # Ray's workers import gptbert from this checkout, as this script does.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    rows = []
    t0 = time.perf_counter()
    with ray_session():
        rows.append(("ray start-up (s, wall)", time.perf_counter() - t0, None, "ray.init of a local Ray"))
        for workers in [int(w) for w in args.ray_workers.split(",")]:
            block = args.ray_block_kb << 10
            cfg = load_config(overrides=[f"clean.inputs=['{tmp / 'in'}']", "clean.engine=ray", "shard.engine=ray",
                                         f"clean.ray_workers={workers}", f"shard.ray_workers={workers}",
                                         f"clean.ray_block_bytes={block}", f"shard.ray_block_bytes={block}",
                                         f"tokenizer.vocab_size={args.vocab}", f"model.vocab_size={args.vocab}"])
            out = tmp / f"ray-{workers}"
            t_clean = best(lambda: run_clean(cfg, out / "clean"), args.repeats)
            t_shard = best(lambda: run_shard(cfg, tmp / "clean", tmp / "tok", out / "shards"), args.repeats)
            rate = n_tokens / t_shard
            rows.append((f"clean, ray {workers} worker(s) (MB/s)", in_bytes / 1e6 / t_clean, clean_rate,
                         "the local engine"))
            rows.append((f"shard, ray {workers} worker(s) (tokens/s)", rate, shard_rate, "the local engine"))
            rows.append(("", rate, raw_rate, "encode_batch_fast(list)"))
    return rows


if __name__ == "__main__":
    main()
