"""Peak memory (RSS) of every stage, run as a user runs it, beside the floor that training needs.

    python benchmarks/memory.py [--presets tiny,mini] [--steps 150] [--trials 3] [--only pretrain,sweep]
                                [--sweep-config recipes/ratio-sweep-cpu.yaml --sweep-corpus CORPUS]
                                [--workdir DIR] [--json FILE]

For each preset, each stage is one ``gptbert`` command in a child process, on the demo's generated
corpus (3,000 documents) and its minimal pairs: clean, train-tokenizer, shard, pretrain with the
local launcher, pretrain with the Ray launcher (2 workers), evaluate, export, and the ratio sweep
with one trial and with ``--trials`` trials that differ only in their seed (their ratio is what the
sweep keeps per trial). With ``--sweep-config``, the same two sweeps of that recipe (fraction 1/2,
its evaluation) on the user's corpus. A sampler thread reads the RSS of the command's process and of every process it started every 0.1 s,
and reports per command:

- ``main``: the peak of the command's own process (for Ray: the driver);
- ``largest child``: the peak of the largest process it started, and what it is (a Ray worker, the
  Ray system processes, the Prefect server, a compiler, a sweep trial's process);
- ``all``: the peak of the sum over the whole tree (shared library pages count once per process,
  so an upper bound of what the machine gave).

Beside the training rows, the floor: parameters, gradients, LAMB's two moments and the EMA (20
bytes a parameter in fp32), plus what one micro-batch keeps for its backward pass, measured as the
tensors autograd saves in one forward of the run's largest micro-batch (its last sequence-length
stage) at the run's precision. Everything above the floor is the runtime: the interpreter and the
libraries, caches, buffers (docs/recipes.md, "Memory").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 2 ** 20
SAMPLE_S = 0.1
STAGES = ("clean", "tokenizer", "shard", "pretrain", "pretrain-ray", "evaluate", "export", "sweep")


def _kind(proc: psutil.Process) -> str:
    try:
        text = " ".join(proc.cmdline())[:300]
        name = proc.name()
    except psutil.Error:
        return "gone"
    if text.startswith("ray::") or "default_worker.py" in text:
        return "Ray worker"
    if any(k in name or k in text for k in ("raylet", "gcs_server", "log_monitor", "dashboard", "ray/_private")):
        return "Ray system"
    if "prefect" in text and ("server" in text or "uvicorn" in text):
        return "Prefect server"
    if "flows.isolation" in text:
        return "trial process"
    if name in ("cc1plus", "cc1", "g++", "gcc", "ld") or "compile_worker" in text or "_worker/subproc" in text:
        return "compiler"
    return name


class TreeSampler:
    """Peak RSS of a process, of its largest descendant (by kind) and of the whole tree."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.main = self.all = 0
        self.child: dict[str, int] = {}  # kind -> peak RSS of one process of that kind
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        kinds: dict[int, str] = {}
        while not self._stop.is_set():
            try:
                procs = self.root.children(recursive=True)
                main = self.root.memory_info().rss
            except psutil.Error:
                break
            total = main
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                kind = kinds.setdefault(proc.pid, _kind(proc))
                self.child[kind] = max(self.child.get(kind, 0), rss)
                total += rss
            self.main, self.all = max(self.main, main), max(self.all, total)
            time.sleep(SAMPLE_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_command(argv: list[str], env: dict[str, str], log: Path) -> dict:
    """Run ``gptbert ARGV`` in a child process; its peaks (MB) and wall time."""
    started = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", *argv], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        rc = proc.wait()
        sampler.stop()
    if rc != 0:
        raise SystemExit(f"gptbert {' '.join(argv)} failed (exit {rc}); see {log}")
    largest = max(sampler.child.items(), key=lambda kv: kv[1], default=("-", 0))
    return {"main_mb": round(sampler.main / MB), "child": largest[0], "child_mb": round(largest[1] / MB),
            "all_mb": round(sampler.all / MB), "wall_s": round(time.perf_counter() - started, 1)}


def floor_mb(preset: str, shards: Path, overrides: list[str]) -> dict:
    """Model + gradients + LAMB moments + EMA (fp32), and one micro-batch's saved activations."""
    import torch

    from common.config import load_config
    from gptbert.data import open_data
    from gptbert.device import with_micro_batch_tokens
    from gptbert.kernels import build_model
    from gptbert.model import num_parameters
    from gptbert.objective import Cursor, LossNorm, TrainingStream, hybrid_loss
    from gptbert.optim import resolve_precision

    cfg = load_config(preset=preset, overrides=overrides)
    cpu = torch.device("cpu")
    model = build_model(cfg.model, cpu).train()
    params = num_parameters(model)
    tc = with_micro_batch_tokens(cfg.train, cfg.model, cpu)
    stream = TrainingStream(open_data(shards).train, tc, cfg.model.vocab_size)
    plan, _ = stream.plan_from(tc.steps - 1, Cursor())  # the last stage: the longest sequences
    batch = stream.batch(plan, stream.micro_batches(plan, 0, 1)[0])
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}  # storage address -> bytes, each storage once

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    dtype = resolve_precision(tc.precision, cpu)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        hybrid_loss(model, batch, LossNorm(*batch.target_counts()), tc.causal_fraction, tc.z_loss)
    activations = sum(saved.values())
    return {"parameters": params, "state_mb": round(20 * params / MB, 1), "micro_batch": list(batch.input_ids.shape),
            "activations_mb": round(activations / MB, 1), "floor_mb": round((20 * params + activations) / MB, 1)}


def bench_preset(preset: str, root: Path, steps: int | None, trials: int, only: set[str], env: dict) -> list[dict]:
    from flows.demo import write_demo_data

    corpus, pairs = write_demo_data(root / "data")
    log = root / f"{preset}.log"
    train = ["--preset", preset] + (["--set", f"train.steps={steps}"] if steps else [])
    w = root / preset
    rows = []

    def row(stage: str, argv: list[str], **extra) -> None:
        if stage.split(" ")[0] not in only:
            return
        result = run_command(argv, env, log)
        rows.append({"preset": preset, "stage": stage, **result, **extra})
        print(json.dumps(rows[-1]), flush=True)

    row("clean", ["clean", str(corpus), "--out", str(w / "clean"), "--no-progress"])
    row("tokenizer", ["train-tokenizer", str(w / "clean"), "--out", str(w / "tok"), "--preset", preset,
                      "--no-progress"])
    row("shard", ["shard", str(w / "clean"), str(w / "tok"), "--out", str(w / "shards"), "--preset", preset,
                  "--no-progress"])
    floor = floor_mb(preset, w / "shards", [f"train.steps={steps}"] if steps else [])
    row("pretrain", ["pretrain", "--data", str(w / "shards"), "--out", str(w / "run"), "--no-progress", *train],
        **floor)
    row("pretrain-ray", ["pretrain", "--data", str(w / "shards"), "--out", str(w / "run-ray"), "--no-progress",
                         "--set", "launch.backend=ray", "--set", "launch.num_workers=2", *train], **floor)
    row("evaluate", ["evaluate", str(w / "run" / "model"), "--blimp", str(pairs), "--out", str(w / "eval"),
                     "--preset", preset])
    row("export", ["export", str(w / "run"), "--out", str(w / "hf")])
    # Trials that differ only in their seed (the same fraction), so that the sweep with more trials
    # differs from the one with one trial only in how many it ran.
    for n in sorted({1, trials}):
        row(f"sweep {n} trial{'s' if n > 1 else ''}",
            ["sweep", *train, "--workdir", str(w / f"sweep{n}"), "--corpus", str(corpus),
             "--set", "sweep.fractions=[0.5]", "--set", f"sweep.seeds={list(range(n))}",
             "--set", f"eval.blimp_dir={pairs}"], trials=n)
    return rows


def bench_sweep_config(config: Path, corpus: Path, root: Path, steps: int | None, trials: int, env: dict) -> list[dict]:
    """The sweep rows for a recipe file on the user's corpus (``--sweep-config``, ``--sweep-corpus``):
    one fraction of the recipe, with one trial and with ``trials`` seeds, its evaluation as the
    recipe says."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / "sweep-config.log"
    rows = []
    for n in sorted({1, trials}):
        argv = ["sweep", "--config", str(config), "--corpus", str(corpus), "--workdir", str(root / f"sweep-config{n}"),
                "--set", "sweep.fractions=[0.5]", "--set", f"sweep.seeds={list(range(n))}"]
        argv += ["--set", f"train.steps={steps}"] if steps else []
        rows.append({"preset": config.stem, "stage": f"sweep {n} trial{'s' if n > 1 else ''}",
                     **run_command(argv, env, log), "trials": n})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| preset | stage | main process | largest other process | all processes | floor | wall |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        child = f"{r['child_mb']} MB ({r['child']})" if r["child_mb"] else "-"
        floor = f"{r['floor_mb']} MB" if "floor_mb" in r else ""
        lines.append(f"| {r['preset']} | {r['stage']} | {r['main_mb']} MB | {child} | {r['all_mb']} MB | {floor} | "
                     f"{r['wall_s']:.0f} s |")
    sweeps = {}
    for r in rows:
        if r["stage"].startswith("sweep"):
            sweeps.setdefault(r["preset"], {})[r["trials"]] = r
    for preset, by_n in sweeps.items():
        if len(by_n) == 2:
            one, many = (by_n[k] for k in sorted(by_n))
            lines.append("")
            lines.append(f"{preset}: sweep peak with {many['trials']} trials / with 1: main process "
                         f"{many['main_mb'] / one['main_mb']:.3f}, all processes {many['all_mb'] / one['all_mb']:.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,mini")
    ap.add_argument("--steps", type=int, default=150, help="training steps of every run (0: the preset's)")
    ap.add_argument("--trials", type=int, default=3, help="trials of the larger sweep (the smaller has one)")
    ap.add_argument("--only", default=",".join(STAGES), help=f"stages to measure, of {','.join(STAGES)}")
    ap.add_argument("--sweep-config", type=Path, help="also measure this recipe's sweep (e.g. "
                    "recipes/ratio-sweep-cpu.yaml) on --sweep-corpus, 1 and --trials trials of fraction 1/2")
    ap.add_argument("--sweep-corpus", type=Path, help="the corpus of --sweep-config's sweep")
    ap.add_argument("--workdir", help="where the runs go (default: a temporary folder, removed after)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    only = set(args.only.split(","))
    unknown = only - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; known: {', '.join(STAGES)}")
    if bool(args.sweep_config) != bool(args.sweep_corpus):
        raise SystemExit("--sweep-config and --sweep-corpus go together")
    # The children (and Ray's workers) import this checkout, whatever is installed.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        rows = []
        for preset in filter(None, args.presets.split(",")):
            rows += bench_preset(preset, root / "runs", args.steps or None, args.trials, only, env)
        if args.sweep_config:
            rows += bench_sweep_config(args.sweep_config.resolve(), args.sweep_corpus.resolve(), root / "runs",
                                       args.steps or None, args.trials, env)
        print()
        print(table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
