"""Shard reading from local disk and from an S3 API, against what the trainer consumes.

Builds a shard folder (clean -> tokenizer -> shard of ``--corpus``, default the demo's generated
corpus), uploads it to a bucket of moto's S3 server started on loopback, then measures in one run:

* ``local mmap``: ``ShardReader`` on the local folder (memory-mapped, verified on open);
* ``remote, memory``: the bucket's shards read with parallel 8 MiB range requests into memory;
* ``remote, cache fill``: the first open with the local cache (download, sha256 check, mmap);
* ``remote, cached``: a second open served from the cache.

Each row: the time to open the split (manifest, every shard, checks) and the rate of a pass that
reads every document in a random order (the packer's access pattern), in tokens/s. The trainer's
consumption is measured in the same run: steps of the ``small`` model at batch 8 x 128 (forward,
backward, AdamW, the default precision), in tokens/s. Loopback S3 has no network latency or
bandwidth limit: the remote rows measure the protocol and the checks, a real store adds transfer
time to the open (once per shard per node with the cache).

With ``--pipeline``, it also runs ``gptbert demo`` twice, with the run root on local disk and in
the bucket (each in a fresh run root and cache, the embedded MLflow store), and prints both wall
times and their ratio.

    python benchmarks/storage.py                                  # the demo corpus
    python benchmarks/storage.py --corpus ../shared/data/babylm-sample
    python benchmarks/storage.py --no-trainer --pipeline
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import storage  # noqa: E402
from common.config import load_config  # noqa: E402


def _read_pass(reader, seed: int = 0) -> tuple[float, int]:
    order = np.random.default_rng(seed).permutation(len(reader))
    t0 = time.perf_counter()
    total = checksum = 0
    for i in order.tolist():
        doc = reader.document(i)
        checksum += int(doc.sum(dtype=np.int64))  # touches every token, as the packer's copy does
        total += len(doc)
    return time.perf_counter() - t0, total


def _trainer_tokens_per_s(steps: int = 3) -> tuple[float, str]:
    """Tokens/s of the ``small`` model's training step at batch 8 x 128 (model_throughput's step:
    forward, LM head at 25% targets, backward, AdamW), in bf16 where the CPU runs it natively."""
    import model_throughput as mt

    from gptbert.optim import cpu_supports_bf16

    precision = "bf16" if cpu_supports_bf16() else "fp32"
    cfg = load_config("small").model
    runner = mt.Runner("fused", cfg, mt.make_batch(cfg, 8, 128, 0.25), precision)
    runner.step()  # warm-up
    seconds = sum(runner.step()[1] for _ in range(steps))
    return 8 * 128 * steps / seconds, precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", help="text file or folder to shard (default: the demo's generated corpus)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 20, help="tokens per shard (default 1M)")
    parser.add_argument("--no-trainer", action="store_true", help="skip the trainer measurement")
    parser.add_argument("--pipeline", action="store_true", help="also time `gptbert demo`, local vs bucket")
    args = parser.parse_args()

    from servers import create_bucket, start_s3_server, stop

    from flows import stages
    from flows.demo import write_demo_data
    from tokenization.shards import ShardReader

    work = Path(tempfile.mkdtemp(prefix="gbstore-"))
    proc, endpoint, env = start_s3_server(work)
    os.environ.update(env, GPTBERT_CACHE_DIR=str(work / "cache"))
    try:
        corpus = args.corpus or str(write_demo_data(work / "data")[0])
        cfg = load_config("small", overrides=[f"workdir={work / 'run'}", f'clean.inputs=["{Path(corpus).resolve()}"]',
                                              f"shard.shard_tokens={args.shard_tokens}"])
        t0 = time.perf_counter()
        art = stages.clean(cfg)
        tok = stages.train_tokenizer(cfg, art)
        shards = stages.shard(cfg, art, tok)
        print(f"shards built in {time.perf_counter() - t0:.0f} s: {shards.path}")
        create_bucket(endpoint, env, "bench")
        remote = "s3://bench/shards"
        t0 = time.perf_counter()
        storage.publish(shards.path, remote, "shard", "stage.json")
        size = sum(storage.list_files(remote).values())
        print(f"uploaded {size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")

        rows = []
        cache = storage.LocalCache(work / "reader-cache")
        for name, make in (("local mmap", lambda: ShardReader(shards.path)),
                           ("remote, memory", lambda: ShardReader(remote, remote="memory")),
                           ("remote, cache fill", lambda: ShardReader(remote, cache=cache)),
                           ("remote, cached", lambda: ShardReader(remote, cache=cache))):
            t0 = time.perf_counter()
            reader = make()
            opened = time.perf_counter() - t0
            seconds, tokens = _read_pass(reader)
            rows.append((name, len(reader.manifest["splits"]["train"]["shards"]), reader.num_tokens, opened,
                         tokens / seconds))
            reader.close()
        trainer, precision = (None, None) if args.no_trainer else _trainer_tokens_per_s()

        print()
        print("| reader | shards | tokens | open (s) | open rate (tokens/s) | read pass (tokens/s) |"
              + (" read pass / trainer |" if trainer else ""))
        print("|---|---|---|---|---|---|" + ("---|" if trainer else ""))
        for name, count, tokens, opened, rate in rows:
            print(f"| {name} | {count} | {tokens:,} | {opened:.2f} | {tokens / opened:,.0f} | {rate:,.0f} |"
                  + (f" {rate / trainer:,.0f}x |" if trainer else ""))
        if trainer:
            print(f"\ntrainer (`small`, batch 8 x 128, {precision}, {os.cpu_count()} cores): {trainer:,.0f} tokens/s")
        if args.pipeline:
            create_bucket(endpoint, env, "demo")
            times = {}
            for name, workdir in (("local disk", str(work / "demo-local")), ("bucket", "s3://demo/run")):
                run_env = dict(os.environ, GPTBERT_CACHE_DIR=str(work / f"cache-{len(times)}"))
                t0 = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "cli.main", "demo", "--workdir", workdir, "--json"],
                                      cwd=work, env={**run_env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                                      capture_output=True, text=True)
                times[name] = time.perf_counter() - t0
                if done.returncode != 0:
                    raise SystemExit(f"gptbert demo --workdir {workdir} failed:\n{done.stderr[-2000:]}")
            print("\n| gptbert demo run root | wall time (s) | vs local |\n|---|---|---|")
            for name, seconds in times.items():
                print(f"| {name} | {seconds:.1f} | {seconds / times['local disk']:.2f}x |")
    finally:
        stop(proc)
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
