#!/usr/bin/env bash
# tokenmill GPU benchmark: kernel checks, copy bandwidth, decode vs roofline, nano-vllm workload vs
# transformers, CPU overhead. Installs nothing: uses the machine's python3 (torch, triton, transformers) and
# this checkout on PYTHONPATH. Results: $OUT/gpu_bench.json (or --out DIR); a short table is printed last.
#
#   benchmarks/gpu/run.sh [--skip hf,workload] [--models qwen2.5-0.5b] [--tiny] [--help]
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python3}
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem,driver_version --format=csv >&2 || true
fi
exec "$PYTHON" benchmarks/gpu/bench.py "$@"
