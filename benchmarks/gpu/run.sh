#!/usr/bin/env bash
# tokenmill GPU benchmark: kernel checks, copy bandwidth, decode vs roofline, nano-vllm workload vs
# transformers, CPU overhead; then TP=1 vs TP=2 where 2+ GPUs are visible. Installs nothing: uses the
# machine's python3 (torch, triton, transformers) and this checkout on PYTHONPATH. Results: $OUT/gpu_bench.json (or --out DIR); a short table is printed last.
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
status=0
"$PYTHON" benchmarks/gpu/bench.py "$@" || status=$?

# Tensor parallelism (TP=1 vs TP=2 on a random-weight Qwen2.5-0.5B shape: 14 query / 2 KV heads), on a machine with
# two GPUs or more; skipped with the reason otherwise (and in the CPU smoke run).
case " $* " in
  *" --tiny "*|*" --help "*|*" -h "*) exit "$status" ;;
esac
num_gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
out_dir=${OUT:-benchmarks/gpu/results}
if [ "$num_gpus" -ge 2 ]; then
  mkdir -p "$out_dir"
  timeout 600 "$PYTHON" benchmarks/tensor_parallel.py --random-model qwen2.5-0.5b --device cuda --tp-sizes 1,2 \
    --batches 1,64 --prompt-len 512 --max-tokens 128 --json "$out_dir/tensor_parallel.json" || status=$?
else
  echo "tensor-parallel variant (TP=2) skipped: $num_gpus GPU(s) visible, it needs 2 or more" >&2
fi
exit "$status"
