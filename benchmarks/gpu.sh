#!/usr/bin/env bash
# One-command GPU benchmark (benchmarks/gpu_bench.py has the details):
#   benchmarks/gpu.sh              training throughput, one row per configuration: small and base,
#                                  plain loop and Ray + DeepSpeed ZeRO-1/2, flex and compile (< 8 min on an H200)
#   benchmarks/gpu.sh --quality    small on ../shared/data/babylm-sample for ~8 min, then BLiMP
#   benchmarks/gpu.sh --sweep      the ratio sweep of small-class trials in ~10 min
# Results: printed as a table and rewritten after every row into
# runs/gpu-bench/<mode>-<time>.json (or --json PATH).
# Without a CUDA device it exits with status 2 and one line; --cpu-smoke runs the same code path on
# the CPU with a tiny budget (the test suite does).
set -euo pipefail
export GPU_BENCH_CALLER_CWD="$PWD"  # relative --json/--data/--workdir paths are the caller's
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python3 benchmarks/gpu_bench.py "$@"
