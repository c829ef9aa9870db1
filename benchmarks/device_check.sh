#!/usr/bin/env bash
# The whole GPU check in one run, sized for a lent H100/H200 (torch 2.11+cu130, Python 3.12,
# 16 cores, no network): build, CUDA tests, sanitizers, the GPU targets, throughput, benchmarks,
# Nsight Compute on the controller backward, a short table last.
# Usage (from the repo root on the GPU machine):  bash benchmarks/device_check.sh [quick]
# Knobs for a shorter rerun: DC_BENCH="pytest -k expression" (default "cuda": every CUDA row),
# DC_COMPILE=0 (gpu_targets without its torch.compile variants).
# Everything goes to ${OUT:-/tmp/s2meta_device}: device_check.log (all output) and a few JSON files
# (the device tool returns at most 8 files). Each step has its own time cap, most important first.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT_DIR=${OUT:-/tmp/s2meta_device}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 S2META_REQUIRE_EXT=1
exec > >(tee -a "$OUT_DIR/device_check.log") 2>&1
start=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - start )) s] $*"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
date -u

step "build"
# editable: the tests below import s2meta_fast from the source tree, which then holds the .so
MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1 \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -q -e . 2>&1 | grep -v "^WARNING: Location" | tail -20
(cd /tmp && "$PY" -c "import s2meta_fast; b = s2meta_fast.backend(); print(b); assert b.cuda_kernels, b") || exit 1

step "CUDA tests"
# -v into its own log: a crash (a segfault ends pytest without its summary) still names the test
timeout 150 "$PY" -m pytest python_tests -v -k "cuda or Cuda or CUDA or graph" -p no:cacheprovider \
  > "$OUT_DIR/tests.log" 2>&1
echo "pytest exit: $?"
grep -E "PASSED|FAILED|ERROR|SKIPPED" "$OUT_DIR/tests.log" | awk '{print $2}' | sort | uniq -c
grep -E "FAILED|ERROR" "$OUT_DIR/tests.log" | head -20
grep -B2 -A12 "Fatal Python error" "$OUT_DIR/tests.log" | grep -v "site-packages" | head -30
tail -3 "$OUT_DIR/tests.log"

step "compute-sanitizer memcheck (every op, fwd + bwd, edge sizes; caching allocator off so overruns show)"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
  --print-limit 20 "$PY" benchmarks/studies/gpu_sanitize.py 2>&1 | tail -30
echo "memcheck exit: ${PIPESTATUS[0]}"

step "GPU targets (controller step, 8M bandwidth, sync-free graph replay)"
timeout 150 "$PY" benchmarks/studies/gpu_targets.py --json "$OUT_DIR/targets.json" \
  $([ "${DC_COMPILE:-1}" = 0 ] && echo --no-compile) 2>&1 | tail -40

step "meta-training throughput, 20 inner updates"
timeout 100 "$PY" benchmarks/studies/throughput.py --device cuda --batches 1,8,64 --steps 10 --json "$OUT_DIR/throughput.json"

step "evaluation throughput"
timeout 60 "$PY" benchmarks/studies/eval_throughput.py --device cuda --blocks 1,8,64 --json "$OUT_DIR/eval.json"

step "serving latency: adapt + rank one new scenario"
timeout 90 "$PY" benchmarks/studies/serving_latency.py --device cuda --json "$OUT_DIR/serving.json"

[ "${1:-}" = quick ] && { step "quick: done"; exit 0; }

step "compute-sanitizer racecheck + synccheck"
timeout 90 compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 9 --print-limit 20 \
  "$PY" benchmarks/studies/gpu_sanitize.py 2>&1 | tail -15
echo "racecheck exit: ${PIPESTATUS[0]}"
timeout 60 compute-sanitizer --tool synccheck --error-exitcode 9 --print-limit 20 \
  "$PY" benchmarks/studies/gpu_sanitize.py 2>&1 | tail -8
echo "synccheck exit: ${PIPESTATUS[0]}"

step "Nsight Compute: lstm_backward_kernel at paper size, S = 8"
if command -v ncu >/dev/null; then
  timeout 90 ncu --clock-control none --kernel-name regex:lstm_backward --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis \
    --section ComputeWorkloadAnalysis "$PY" - <<'PY' > "$OUT_DIR/ncu_lstm_backward.txt" 2>&1
import torch, s2meta_fast
from s2meta_fast.ops.sample_inputs import interaction_sizes, make_multi_args, with_grad, DIFFERENTIABLE
a = with_grad(make_multi_args(S=8, sizes=interaction_sizes(128), dtype=torch.float32, device="cuda"))
ins = [a[k] for k in DIFFERENTIABLE if a[k] is not None]
for _ in range(4):
    out = torch.ops.s2meta.lstm_update_multi(*a.values())
    torch.autograd.grad(out[0].sum() + out[1].sum() + out[2].sum(), ins)
torch.cuda.synchronize()
PY
  grep -E "lstm_backward|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Dynamic Shared|Local" "$OUT_DIR/ncu_lstm_backward.txt" | head -30
else
  echo "ncu not found"
fi

step "pytest-benchmark on CUDA: fused vs reference vs torch.compile"
timeout 200 "$PY" -m pytest benchmarks -q -k "${DC_BENCH:-cuda}" -p no:cacheprovider \
  --benchmark-columns=min,median,mean,rounds --benchmark-json="$OUT_DIR/bench.json" 2>&1 | tail -8
"$PY" benchmarks/summarize.py "$OUT_DIR/bench.json" 2>&1 | tail -60 || true

step "cost model"
timeout 60 "$PY" benchmarks/studies/cost_model.py --device cuda --steps 5

step "summary"
"$PY" - "$OUT_DIR" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except Exception:
        return None
t = load("targets.json") or {}
for r in t.get("controller", []):
    print(f"controller d128 {r['mode']:17s} {r['impl']:12s} eager {r.get('eager_us', float('nan')):9.1f} us  graph {r.get('graph_us', float('nan')):9.1f} us {r.get('error', '')}")
for r in t.get("bandwidth", []):
    if "impl" in r:
        print(f"8M {r['impl']:12s} {r.get('eager_us', float('nan')):9.1f} us  {r.get('GBps', 0):7.0f} GB/s  {100 * r.get('of_copy_bw', 0):5.1f} % of copy {r.get('error', '')}")
if "sync" in t:
    print("sync-free replay:", t["sync"])
for r in load("throughput.json") or []:
    print(f"meta-train {r['path']:5s} B={r['B']:3d} {r['scenarios_per_s']:9.1f} scen/s  {r['seconds_per_step'] * 1e3:8.2f} ms/step graphs={r['graphs']} updates={r['inner_updates']}")
for r in load("eval.json") or []:
    print(f"eval {r['config']:5s} block={r['block']:3d} {r['scenarios_per_s']:9.1f} scen/s")
PY
echo "total: $(( $(date +%s) - start )) s"
