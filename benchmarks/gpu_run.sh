#!/usr/bin/env bash
# Everything a GPU session checks and measures, in one command (GPU time is scarce):
#   1. build the CUDA kernels in place, check every op and time the backward ops against a copy;
#   2. the gradient-step benchmarks on the GPU (MLP with CUDA graphs, GPT 6x768 bf16).
# Results go to $OUT (default out/): ops_gpu.md, bench_cuda.md and the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" \
    | tee -a "$OUT/gpu.txt"
timeout "${OPS_TIMEOUT:-330}" $PY benchmarks/gpu_check.py --out "$OUT/ops_gpu.md" 2>&1 | tail -n 80 | tee "$OUT/gpu_check.log"
echo "gpu_check exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_check.log"
timeout "${BENCH_TIMEOUT:-240}" $PY benchmarks/bench.py --device cuda --workloads mlp,gpt --repeats 30 \
    --out "$OUT/bench_cuda.md" 2>&1 | grep -v "^\[W" | tail -n 60 | tee "$OUT/bench.log"
echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"
