"""LAMB step time on a preset's parameters: gptbert.optim.LAMB (multi-tensor) vs a per-parameter loop.

The per-parameter loop is the previous implementation of the same maths, kept here as the
baseline; the script also checks that both give the same parameters after the timed steps. Steps
of the two are interleaved so load from other processes on a shared machine hits both alike.

    python benchmarks/optimizer_step.py                       # small, 2 threads
    python benchmarks/optimizer_step.py --presets tiny small --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import preset  # noqa: E402
from gptbert.model import GPTBERT  # noqa: E402
from gptbert.optim import LAMB, param_groups  # noqa: E402


class LoopLAMB(LAMB):
    """The per-parameter Python loop (the previous LAMB.step), for comparison only."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps)
                if wd > 0:
                    update.add_(p, alpha=wd)
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                    update.mul_(trust)
                p.add_(update, alpha=-lr)


def setup(preset_name: str, cls):
    torch.manual_seed(0)
    model = GPTBERT(preset(preset_name).model)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return model, cls(param_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["small"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 1 warm-up step)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# LAMB.step() only (gradients fixed), {args.threads} threads, torch {torch.__version__}, "
          f"{args.steps} timed steps (median)")
    header = f"{'preset':<7} {'params':>10} {'variant':<22} {'step ms':>8} {'vs loop':>8} {'max |dp|':>9}"
    print(header)
    print("-" * len(header))
    for name in args.presets:
        runs = {"per-parameter loop": setup(name, LoopLAMB), "foreach (LAMB)": setup(name, LAMB)}
        times = {v: [] for v in runs}
        for i in range(args.steps + 1):
            for v, (_, opt) in runs.items():
                t0 = time.perf_counter()
                opt.step()
                if i:
                    times[v].append(time.perf_counter() - t0)
        (m0, _), (m1, _) = runs.values()
        diff = max((a - b).abs().max().item() for a, b in zip(m0.parameters(), m1.parameters()))
        n = sum(p.numel() for p in m0.parameters())
        base = statistics.median(times["per-parameter loop"])
        for v in runs:
            med = statistics.median(times[v])
            print(f"{name:<7} {n:>10,} {v:<22} {med * 1e3:>8.1f} {base / med:>7.2f}x {diff:>9.1e}")


if __name__ == "__main__":
    main()
