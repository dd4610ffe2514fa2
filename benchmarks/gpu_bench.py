"""The one-command GPU benchmark behind ``benchmarks/gpu.sh`` (three modes). It measures GPUs only:
without a CUDA device it exits with status 2 and one line, unless ``--cpu-smoke`` asks for the same
code path on the CPU with a tiny budget (the ``tiny`` preset, a few steps; how the test suite runs it).

* default: training throughput, one row per configuration, each measured on its own (rows in
  ``benchmarks/gpu_rows.py``): ``small`` and ``base`` at sequence 512 and 128 in the plain loop,
  then through Ray Train + DeepSpeed ZeRO-1 and ZeRO-2 (one worker), then the flex-attention path
  and flex with the whole model under ``torch.compile``. Every row trains a global batch of
  ``--batch-tokens`` split into micro-batches with gradient accumulation (the trainer's own
  ``train_step``); the micro-batch is ``--micro-batch-tokens``, or ``auto``: the largest that fits
  the GPU, probed once per configuration (``gptbert.device``). A row reports tokens/s, MFU against
  the device's bf16 dense peak (named in the output), peak memory, the micro-batch and its count.
  An out-of-memory row says OOM and the run goes on; the GPU is freed between rows; the JSON
  (``--json``, default ``runs/gpu-bench/<mode>-<time>.json``) is rewritten after every row. Rows not started
  within ``--max-minutes`` (default 8) are written as skipped.
* ``--quality``: the data stages on ``--data`` (default ../shared/data/babylm-sample), then
  ``small`` pretrained for as many steps as fit ``--budget-minutes`` (up to 10 epochs, the BabyLM
  limit), then BLiMP (``--blimp``) in the three scoring modes; one row.
* ``--sweep``: the ratio sweep (``gptbert sweep``: the Prefect flow with its MLflow runs) of
  ``small``-class trials, each sized so the whole grid fits ``--budget-minutes`` of GPU time. The
  speed probe runs in a child process: this process never touches CUDA while the trials train.
"""

from __future__ import annotations

import os

# torch.cuda.is_available() through NVML: asking whether there is a GPU creates no CUDA context.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common.config import EvalConfig, load_config  # noqa: E402
from gptbert.device import free_cuda  # noqa: E402
from gpu_rows import (TABLE_HEADER, Results, RowSpec, describe_peak, device_peak, format_row,  # noqa: E402
                      micro_batch, plain_row, ray_row, row_config, run_rows)

SHARED = Path(os.environ.get("GPTBERT_SHARED_DATA", ROOT.parent / "shared" / "data"))
# The quality run's global batch: the recipe's 1M -> 4M tokens would leave ~50 steps for 10 epochs
# of an 8M-word corpus, so it is scaled down (same ramp shape); the report says so.
QUALITY_BATCH = (131_072, 262_144)
SMOKE_BATCH = (512, 1024)

# The default throughput plan, most informative first (a spent time budget skips the tail).
GPU_PLAN = ([RowSpec("plain", p, s) for p in ("small", "base") for s in (512, 128)]
            + [RowSpec(k, p, 512) for p in ("small", "base") for k in ("ray-zero1", "ray-zero2")]
            + [RowSpec("plain", "small", 512, "flex"), RowSpec("plain", "base", 512, "flex"),
               RowSpec("plain", "base", 512, "flex + compile")])
SMOKE_PLAN = [RowSpec("plain", "tiny", 64), RowSpec("ray-zero1", "tiny", 64)]


def no_cuda_line() -> str:
    """The one line printed where there is no CUDA device."""
    return (f"gpu.sh: no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}): "
            "this benchmark measures GPUs only; --cpu-smoke runs its code path on the CPU with a tiny budget")


def device_name(device: torch.device) -> str | None:
    """The GPU's name (initialises CUDA in this process), None on the CPU."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


# ----------------------------------------------------------------------------- throughput


def throughput(args, device: torch.device, results: Results) -> list[dict]:
    gpu = device.type == "cuda"
    kinds = set((args.only or ("plain,ray" if gpu else "plain")).split(","))
    plan = [s for s in (GPU_PLAN if gpu else SMOKE_PLAN)
            if ("plain" in kinds and s.kind == "plain") or ("ray" in kinds and s.kind.startswith("ray"))]
    batch_tokens = args.batch_tokens or (524_288 if gpu else 512)
    peak = (device_peak(device_name(device)) or (None, None))[1]
    micro_cache: dict = {}
    scratch = Path(tempfile.mkdtemp(prefix="gptbert-gpu-bench-"))

    def measure(spec: RowSpec) -> dict:
        if spec.kind == "plain":
            return plain_row(spec, device, batch_tokens, args.steps, args.warmup, args.micro_batch_tokens, peak,
                             micro_cache)
        key = (spec.preset, spec.seq, "fused")
        if key not in micro_cache:  # probed here, then freed before the Ray worker takes the GPU
            micro_cache[key] = micro_batch(row_config(spec, batch_tokens, 1, str(device)), device,
                                           args.micro_batch_tokens)
            free_cuda()
        micro, how = micro_cache[key]
        return ray_row(spec, device, batch_tokens, args.steps, scratch, micro, args.warmup, peak, how)

    print(f"# global batch {batch_tokens:,} tokens, {args.warmup} warm-up + {args.steps} timed steps per row; "
          f"micro-batch {args.micro_batch_tokens or 'auto'}", flush=True)
    print(TABLE_HEADER, flush=True)
    deadline = time.time() + args.max_minutes * 60 if args.max_minutes else None
    return run_rows(plan, measure, results, deadline, show=lambda r: print(format_row(r), flush=True))


# ----------------------------------------------------------------------------- quality


def probe_run(cfg, preset: str, device: torch.device, batch_tokens: int, given_micro: int | None) -> dict:
    """The run's micro-batch (fitted at its longest sequence) and its plain-loop speed at its first
    sequence length (1 warm-up + 3 timed global batches of ``batch_tokens``); the GPU is freed after."""
    micro, how = micro_batch(cfg, device, given_micro)
    free_cuda()
    spec = RowSpec("plain", preset, cfg.train.seq_len_at(0))
    row = plain_row(spec, device, batch_tokens, 3, 1, micro)
    free_cuda()
    return {**how, "micro_batch_tokens": micro, "tokens_per_s": row["tokens_per_s"],
            "device_name": device_name(device)}


def data_stages(cfg):
    """clean -> tokenizer -> shards through the pipeline's cached stage functions (no Prefect)."""
    from flows.stages import clean, shard, train_tokenizer

    corpus = clean(cfg)
    tok = train_tokenizer(cfg, corpus)
    return shard(cfg, corpus, tok), tok


def eval_device_overrides(gpu: bool) -> tuple[list[str], str]:
    """``eval.device`` where this version has it (evaluation then runs on the GPU), and a note of
    where BLiMP is scored."""
    if "device" in EvalConfig.__dataclass_fields__:
        where = "cuda" if gpu else "cpu"
        return [f"eval.device={where}"], where
    return [], "cpu (this version has no eval.device: evaluation runs on the CPU)"


def quality(args, device: torch.device, results: Results) -> list[dict]:
    from flows.stages import evaluate, pretrain
    from gptbert.data import open_data
    from gptbert.metrics import MetricsCallback

    gpu = device.type == "cuda"
    name = args.preset or ("small" if gpu else "tiny")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gptbert-quality-"))
    batch = QUALITY_BATCH if gpu else SMOKE_BATCH
    eval_set, eval_where = eval_device_overrides(gpu)
    common = [f"clean.inputs=[{json.dumps(str(Path(args.data).resolve()))}]", f"workdir={workdir}",
              "launch.backend=local", "train.word_milestones=none", f"train.device={'cuda' if gpu else 'cpu'}",
              f"train.batch_tokens_start={batch[0]}", f"train.batch_tokens_end={batch[1]}",
              "eval.tasks=[blimp]", f"eval.blimp_dir={Path(args.blimp).resolve()}"] + eval_set

    def measure(spec: RowSpec) -> dict:
        t_start = time.time()
        cfg = load_config(name, overrides=common)
        shards, tokenizer = data_stages(cfg)
        corpus_tokens = open_data(shards.path).train.num_tokens
        probe = probe_run(cfg, name, device, batch[1], args.micro_batch_tokens)
        budget_tokens = min(10 * corpus_tokens, int(args.budget_minutes * 60 * probe["tokens_per_s"] * 0.9))
        steps = max(4, int(budget_tokens / (sum(batch) / 2)))
        cfg = load_config(name, overrides=common + [f"train.steps={steps}", f"train.checkpoint_every={steps}",
                                                    f"train.validate_every={steps}",
                                                    f"train.micro_batch_tokens={probe['micro_batch_tokens']}"])
        mfu: list[float] = []
        callback = MetricsCallback(cfg.model, cfg.train.causal_fraction, 1, probe["device_name"], gpu,
                                   inner=lambda m, s: mfu.append(m["mfu"]) if m.get("mfu") is not None else None)
        t_train = time.time()
        model = pretrain(cfg, shards, tokenizer, callback=callback)
        train_s = time.time() - t_train
        free_cuda()  # the trainer is gone: its cache goes back before the evaluation
        stats = evaluate(cfg, model).record.get("stats", {})
        summary = model.record["stats"]
        return {"steps": steps, "tokens": summary["tokens"], "words": summary.get("words"),
                "epochs": summary["tokens"] / corpus_tokens, "train_minutes": train_s / 60,
                "wall_minutes": (time.time() - t_start) / 60, "mfu": sum(mfu) / len(mfu) if mfu else None,
                "precision": summary.get("precision"), "micro_batch_tokens": probe["micro_batch_tokens"],
                "micro_batch_source": probe["micro_batch_source"], "probe_tokens_per_s": probe["tokens_per_s"],
                "global_batch_tokens": list(batch), "eval_device": eval_where, "run_root": str(workdir),
                **{k: v for k, v in stats.items() if k.startswith("blimp.")}}

    [row] = run_rows([RowSpec("quality", name, 0, "fused")], measure, results)
    if row["status"] != "ok":
        print(f"quality run: {row['status']}: {row.get('error')}", flush=True)
        return [row]
    print(f"quality run: {name}, {row['steps']} steps, global batch {batch[0]:,} -> {batch[1]:,} tokens, "
          f"micro-batch {row['micro_batch_tokens']:,} ({row['micro_batch_source']}), BLiMP on {eval_where}, "
          f"run root {workdir}")
    print(f"{'tokens':>12} {'words':>12} {'epochs':>7} {'train min':>9} {'wall min':>8} {'MFU':>6} "
          f"{'causal':>7} {'mntp':>7} {'fused':>7}  (BLiMP, best T)")
    acc = [row.get(f"blimp.{m}.best_accuracy") for m in ("causal", "mntp", "fused")]
    print(f"{row['tokens']:>12,} {row['words'] or 0:>12,} {row['epochs']:>7.2f} {row['train_minutes']:>9.2f} "
          f"{row['wall_minutes']:>8.2f} {(format(row['mfu'], '.1%') if row['mfu'] else '-'):>6} "
          + " ".join(f"{a:>7.1%}" if a is not None else f"{'-':>7}" for a in acc), flush=True)
    return [row]


# ----------------------------------------------------------------------------- sweep


def sweep_batch(gpu: bool) -> tuple[int, int]:
    return QUALITY_BATCH if gpu else SMOKE_BATCH


def probe_child(args, device: torch.device) -> int:
    """``--probe PRESET``: the sweep's speed probe, in its own process; prints one JSON line."""
    batch = sweep_batch(device.type == "cuda")
    cfg = load_config(args.probe, overrides=[f"train.batch_tokens_start={batch[0]}", f"train.batch_tokens_end={batch[1]}",
                                             f"train.device={device.type}"])
    print(json.dumps(probe_run(cfg, args.probe, device, batch[1], args.micro_batch_tokens)), flush=True)
    return 0


def sweep(args, gpu: bool, results: Results) -> int:
    """``gptbert sweep`` with trials sized so the grid fits the budget (6 fractions by default)."""
    name = args.preset or ("small" if gpu else "tiny")
    from common.config.sweep import PAPER_FRACTIONS

    fractions = args.fractions or list(PAPER_FRACTIONS)
    batch = sweep_batch(gpu)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = [sys.executable, str(Path(__file__).resolve()), "--probe", name] + (["--cpu-smoke"] if not gpu else [])
    if args.micro_batch_tokens:
        child += ["--micro-batch-tokens", str(args.micro_batch_tokens)]
    out = subprocess.run(child, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"gpu.sh: the speed probe failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
        return 1
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    rate = probe["tokens_per_s"]
    # Two thirds of each trial's share of the budget for training, the rest for its evaluation.
    per_trial_s = args.budget_minutes * 60 / len(fractions) * 2 / 3
    steps = max(4, int(per_trial_s * rate * 0.9 / (sum(batch) / 2)))
    workdir = args.workdir or tempfile.mkdtemp(prefix="gptbert-sweep-")
    eval_set, eval_where = eval_device_overrides(gpu)
    sets = [f"sweep.fractions={json.dumps(fractions)}", f"train.steps={steps}", f"train.batch_tokens_start={batch[0]}",
            f"train.batch_tokens_end={batch[1]}", f"train.micro_batch_tokens={probe['micro_batch_tokens']}",
            f"train.device={'cuda' if gpu else 'cpu'}", "launch.backend=local", "eval.tasks=[blimp]",
            f"eval.blimp_dir={Path(args.blimp).resolve()}", "eval.milestones=none",
            f"train.checkpoint_every={steps}"] + eval_set
    cmd = [sys.executable, "-m", "cli.main", "sweep", "--preset", name, "--corpus", str(Path(args.data).resolve()),
           "--workdir", str(workdir)] + [x for s in sets for x in ("--set", s)]
    print(f"sweep: {name}, {len(fractions)} trials of {steps} steps ({rate:,.0f} tokens/s probed in a child "
          f"process, micro-batch {probe['micro_batch_tokens']:,}), run root {workdir}", flush=True)
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    results.add({"kind": "sweep", "preset": name, "seq": 0, "variant": "fused", "status": "ok" if rc == 0 else "error",
                 "rc": rc, "steps": steps, "fractions": fractions, "probe": probe, "eval_device": eval_where,
                 "seconds": round(time.time() - t0, 1), "run_root": str(workdir)})
    return rc


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quality", action="store_true", help="pretrain small on --data, then BLiMP")
    mode.add_argument("--sweep", action="store_true", help="the ratio sweep within --budget-minutes")
    mode.add_argument("--probe", metavar="PRESET", help=argparse.SUPPRESS)  # the sweep's child process
    p.add_argument("--cpu-smoke", action="store_true",
                   help="without a GPU: run the mode's code path on the CPU with a tiny budget (no GPU numbers)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per throughput row (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per row (compilation, allocation)")
    p.add_argument("--batch-tokens", type=int, help="global batch per throughput step (default 524,288; smoke 512)")
    p.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="tokens per forward/backward (default: auto, the largest that fits the GPU)")
    p.add_argument("--max-minutes", type=float, default=8.0,
                   help="throughput: rows not started within this many minutes are written as skipped (0: none)")
    p.add_argument("--only", help="throughput: plain, ray or plain,ray (default plain,ray on a GPU, plain for the smoke)")
    p.add_argument("--data", default=str(SHARED / "babylm-sample"), help="corpus (file or folder)")
    p.add_argument("--blimp", default=str(SHARED / "blimp-dev"), help="BLiMP-format folder")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="GPU time for --quality (default 8) or --sweep (default 10); 0.2 for the CPU smoke")
    p.add_argument("--preset", help="--quality/--sweep model preset (default small on a GPU, tiny for the smoke)")
    p.add_argument("--fractions", type=float, nargs="+", help="--sweep: causal fractions (default the paper's 6)")
    p.add_argument("--workdir", help="run root for --quality/--sweep (default a new temporary folder)")
    p.add_argument("--json", help="results file, rewritten after every row (default runs/gpu-bench/<mode>-<time>.json)")
    args = p.parse_args(argv)
    caller = Path(os.environ.get("GPU_BENCH_CALLER_CWD", os.getcwd()))
    for key in ("json", "data", "blimp", "workdir"):
        value = getattr(args, key)
        if value and not Path(value).is_absolute():
            setattr(args, key, str(caller / value))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu and not args.cpu_smoke:
        print(no_cuda_line(), file=sys.stderr)
        return 2
    if gpu and args.cpu_smoke:
        print("gpu.sh: --cpu-smoke is for machines without a GPU; this one has one", file=sys.stderr)
        return 2
    if args.micro_batch_tokens is not None and args.micro_batch_tokens < 1:
        print("gpu.sh: --micro-batch-tokens must be positive", file=sys.stderr)
        return 2
    device = torch.device("cuda") if gpu else torch.device("cpu")
    if args.probe:
        return probe_child(args, device)
    mode = "sweep" if args.sweep else "quality" if args.quality else "throughput"
    if args.budget_minutes is None:
        args.budget_minutes = (10.0 if args.sweep else 8.0) if gpu else 0.2
    if (args.quality or args.sweep) and not (Path(args.data).exists() and Path(args.blimp).is_dir()):
        print(f"gpu.sh: --data {args.data} and --blimp {args.blimp} must exist", file=sys.stderr)
        return 2
    # The sweep's parent never initialises CUDA (its trials train in children): no name lookup here.
    name = device_name(device) if gpu and not args.sweep else None
    peak_line = describe_peak(name) if name else ("MFU: see the trials" if gpu else "CPU smoke: no GPU numbers")
    print(f"# {name or ('CUDA (name not queried: the sweep leaves CUDA to its trials)' if gpu else 'CPU smoke')}, "
          f"torch {torch.__version__}, bf16 autocast where supported; {peak_line}", flush=True)
    peak = device_peak(name)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    results = Results(args.json or ROOT / "runs" / "gpu-bench" / f"{mode}-{stamp}.json", {
        "mode": mode, "device": name or ("cuda" if gpu else "cpu"), "torch": torch.__version__,
        "cuda": torch.version.cuda, "peak": peak_line, "peak_name": peak[0] if peak else None,
        "peak_flops": peak[1] if peak else None, "cpu_smoke": not gpu,
        "started": datetime.datetime.now().isoformat(timespec="seconds"), "args": vars(args)})
    results.write(complete=False)
    started = time.time()
    if args.sweep:
        rc = sweep(args, gpu, results)
    else:
        rows = quality(args, device, results) if args.quality else throughput(args, device, results)
        failed = [r for r in rows if r["status"] == "error"]
        rc = 1 if failed else 0
        if failed:
            print(f"# {len(failed)} row(s) failed with an error (OOM and skipped rows are results)", flush=True)
    results.write(complete=True)
    print(f"# done in {(time.time() - started) / 60:.1f} min; results in {results.path}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
