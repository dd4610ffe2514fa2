#!/usr/bin/env bash
# One-command GPU benchmark (benchmarks/gpu_bench.py has the details):
#   benchmarks/gpu.sh              throughput of small and base at seq 128 and 512 (< 5 min)
#   benchmarks/gpu.sh --quality    small on ../shared/data/babylm-sample for ~8 min, then BLiMP
#   benchmarks/gpu.sh --sweep      the ratio sweep of small-class trials in ~10 min
# Without a CUDA device it says so and runs a tiny CPU smoke test of the same code path.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python3 benchmarks/gpu_bench.py "$@"
