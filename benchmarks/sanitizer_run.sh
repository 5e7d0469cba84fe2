#!/usr/bin/env bash
# Issue 12, item 7, in one command (under 8 minutes on an H100):
#   1. compute-sanitizer memcheck on a long-ish async engine run (scripts/sanitizer_workload.py: CUDA
#      graphs on, mixed prefill/decode steps, aborts, preemption from a small KV cache, prefix caching
#      when EngineConfig has enable_prefix_caching), on the random:tiny preset
#   2. the same under racecheck (fewer requests: racecheck is the slower tool)
#   3. TANDEM_DIFF_CASES=200 python3 scripts/gpu_checks.py differential (async == sync, graphs on;
#      DIFF_WORKERS processes, default 6, share the GPU)
# With SET=kernels instead, memcheck and racecheck on the other kernels' workloads (under 8 minutes too):
#   W4A16 (random:tiny, --quantization int4), the fused MoE kernel with FP8 experts (random:tiny-qwen3-moe,
#   --quantization fp8), Gemma's fused norms with an FP8 KV cache (random:tiny-gemma3, --kv-cache-dtype fp8).
# Logs go to OUTDIR; a short summary is printed last (and kept in OUTDIR/summary.txt).
# Usage: [SET=core|kernels] scripts/sanitizer_run.sh OUTDIR   (COMPUTE_SANITIZER=/path/to/compute-sanitizer to override)
# Exit status: 0 when every stage is clean, 1 otherwise, 2 when it cannot run here.
set -uo pipefail

OUT=${1:?usage: scripts/sanitizer_run.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
SAN=${COMPUTE_SANITIZER:-compute-sanitizer}
CUDA_SAN=/usr/local/cuda/bin/compute-sanitizer
if ! command -v "$SAN" >/dev/null 2>&1 && [ -x "$CUDA_SAN" ]; then
    SAN=$CUDA_SAN
fi
if ! command -v "$SAN" >/dev/null 2>&1; then
    echo "sanitizer_run: compute-sanitizer not found (set COMPUTE_SANITIZER)"
    exit 2
fi
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "sanitizer_run: no CUDA device visible to torch"; exit 2; }

# Stage limits (seconds) keep the whole run under 8 minutes even if a tool is slower than expected;
# the workload itself stops starting requests after its --budget-s.
MEMCHECK_S=${MEMCHECK_S:-170}
RACECHECK_S=${RACECHECK_S:-170}
DIFF_S=${DIFF_S:-120}

{
    dirty=$(git diff --quiet 2>/dev/null || echo ' (uncommitted changes)')
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$dirty"
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1 | sed 's/^/gpu: /'
    "$SAN" --version 2>/dev/null | grep -i version | tail -1 | sed 's/^/sanitizer: /'
    python3 -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}')" 2>/dev/null
} > "$OUT/env.txt"

stage() {  # stage NAME LIMIT_S CMD...: run CMD with a hard time limit, log to OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "sanitizer_run: $name (at most ${limit} s) ..."
    timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - t0))" >> "$OUT/stages.txt"
}

: > "$OUT/stages.txt"
if [ "${SET:-core}" = kernels ]; then
    KERNEL_S=${KERNEL_S:-75}
    for w in "int4 --model random:tiny --quantization int4" "moe_fp8 --model random:tiny-qwen3-moe --quantization fp8" \
             "gemma_kv_fp8 --model random:tiny-gemma3 --kv-cache-dtype fp8"; do
        set -- $w
        name=$1
        shift
        stage "memcheck_$name" "$KERNEL_S" "$SAN" --tool memcheck --error-exitcode 99 --print-limit 50 \
            python3 scripts/sanitizer_workload.py --requests 12 --budget-s $((KERNEL_S - 45)) "$@"
        stage "racecheck_$name" "$KERNEL_S" "$SAN" --tool racecheck --racecheck-report hazard --error-exitcode 99 \
            --print-limit 50 python3 scripts/sanitizer_workload.py --requests 6 --budget-s $((KERNEL_S - 45)) "$@"
    done
    python3 scripts/sanitizer_summary.py "$OUT" | tee "$OUT/summary.txt"
    exit "${PIPESTATUS[0]}"
fi
stage memcheck "$MEMCHECK_S" "$SAN" --tool memcheck --error-exitcode 99 --print-limit 50 \
    python3 scripts/sanitizer_workload.py --requests 24 --budget-s $((MEMCHECK_S - 60))
stage racecheck "$RACECHECK_S" "$SAN" --tool racecheck --racecheck-report hazard --error-exitcode 99 --print-limit 50 \
    python3 scripts/sanitizer_workload.py --requests 12 --budget-s $((RACECHECK_S - 60))
stage differential "$DIFF_S" env TANDEM_DIFF_CASES=200 TANDEM_DIFF_WORKERS=${DIFF_WORKERS:-6} python3 scripts/gpu_checks.py differential

python3 scripts/sanitizer_summary.py "$OUT" | tee "$OUT/summary.txt"
exit "${PIPESTATUS[0]}"
