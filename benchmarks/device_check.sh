#!/usr/bin/env bash
# The whole GPU check in one run, sized for a lent H100/H200 (torch 2.11+cu130, Python 3.12,
# 16 cores, no network): build, CUDA tests, GPU benchmarks, a short table last.
# Usage (from the repo root on the GPU machine):  bash benchmarks/device_check.sh
# Writes its logs under ${OUT:-/tmp/s2meta_device} so they come back with the run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-/tmp/s2meta_device}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 S2META_REQUIRE_EXT=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT_DIR/gpu.txt"

start=$(date +%s)
MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1 \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -q . 2>&1 | tail -20 | tee "$OUT_DIR/build.log"
echo "build: $(( $(date +%s) - start )) s"
cd /tmp  # import the installed package, not the source tree
"$PY" -c "import s2meta_fast; b = s2meta_fast.backend(); print(b); assert b.cuda_kernels, b" || exit 1
cd - >/dev/null

# CUDA tests only (everything else already ran on the CPU in CI); -x stops at the first failure.
timeout 120 "$PY" -m pytest python_tests -q -x -k "cuda or Cuda or CUDA or graph" -p no:cacheprovider \
  2>&1 | tee "$OUT_DIR/tests.log" | tail -15

timeout 120 "$PY" -m pytest benchmarks -q -k "cuda" -p no:cacheprovider \
  --benchmark-columns=min,median,mean,rounds --benchmark-json="$OUT_DIR/bench.json" \
  2>&1 | tee "$OUT_DIR/bench.log" | tail -40

timeout 90 "$PY" benchmarks/studies/throughput.py --device cuda --batches 1,8,64 --steps 10 2>&1 | tee "$OUT_DIR/throughput.log"
timeout 45 "$PY" benchmarks/studies/eval_throughput.py --device cuda --blocks 1,8,64 2>&1 | tee "$OUT_DIR/eval.log"
timeout 45 "$PY" benchmarks/studies/cost_model.py --device cuda --steps 5 2>&1 | tee "$OUT_DIR/cost_model.log"

"$PY" benchmarks/summarize.py "$OUT_DIR/bench.json" || true
echo "total: $(( $(date +%s) - start )) s"
