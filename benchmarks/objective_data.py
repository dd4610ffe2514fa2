"""Data side of a training step: planning, materialising and masking examples (CPU, one thread).

Prints a table; ratios are against the per-example masking loop run in the same process. Sizes are
those of the faithful `small` run's first stage: global batch 2^20 tokens = 8192 x 128.

    python benchmarks/objective_data.py [--examples 1024]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    from common.config import TrainConfig
    from gptbert.data import ListDocumentSource
    from gptbert.objective import TrainingStream, layout, span_mask

    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=1024, help="examples materialised per measurement")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    # BabyLM-like: many short lines, a long tail of long documents.
    lengths = rng.lognormal(3.5, 1.2, size=50_000).clip(1, 5000).astype(int)
    source = ListDocumentSource([rng.integers(16, 8192, size=n) for n in lengths])
    cfg = TrainConfig(steps=7812)
    stream = TrainingStream(source, cfg, 8192)
    plan = stream.plan(0)
    n = min(args.examples, plan.batch_size)
    masked_idx = [i for i in range(n) if not plan.causal[i]]

    def per_example():
        for i in masked_idx:
            items, segs, starts = layout(source, plan.examples[i], plan.seq_len)
            span_mask(items, segs, starts, plan.mask_rate, np.random.default_rng([0, 0, 0, i]), 8192)

    t_loop = timed(per_example)
    t_batch = timed(lambda: stream.batch(plan, range(n)))
    t_plan = timed(lambda: stream.plan_from(0, stream.cursor), repeat=2)
    rows = [
        ("per-example layout + span_mask loop (baseline)", t_loop, n),
        ("build_batch (layout + batched masking + targets)", t_batch, n),
        (f"plan a global batch ({plan.batch_size} x {plan.seq_len})", t_plan, plan.batch_size),
    ]
    print(f"{'operation':58s} {'seconds':>9s} {'us/example':>11s} {'vs baseline':>12s}")
    for name, t, count in rows:
        ratio = (t / count) / (t_loop / n)
        print(f"{name:58s} {t:9.3f} {t / count * 1e6:11.1f} {ratio:11.2f}x")
    full = (t_batch / n) * plan.batch_size + t_plan
    print(f"\none global batch of the faithful first stage on one process: ~{full:.2f} s of data work "
          "(hidden behind the step by train.prefetch)")


if __name__ == "__main__":
    main()
