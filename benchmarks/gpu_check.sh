#!/usr/bin/env bash
# One prepared GPU check: every GPU benchmark and the GPU tests, on one GPU, in under 10
# minutes on one H100. Installs nothing (uses the python on PATH, or $PYTHON).
#
#   bash benchmarks/gpu_check.sh [OUTDIR]        # OUTDIR defaults to $OUT, else gpu-check-out
#
# Writes into OUTDIR: env.txt (GPU, driver, torch), train_step_<model>.json/.log (figures of
# benchmarks/train_step.py, ours vs the reference-style step), pytest_gpu.log and summary.txt
# (one line per command: name, exit status, seconds). Every command has its own timeout, and a
# failing command does not stop the others; the script exits non-zero if any failed.
#
# DINO_GPU_CHECK_TINY=1 runs the same commands in CPU tiny mode (one tiny train_step run, the
# GPU tests collected and skipped): what CI runs to keep this script working without a GPU.
# benchmarks/data_pipeline.py is not run: it measures CPU cores only (no GPU stage); the GPU
# photometric stage is covered by the GPU tests.
set -u -o pipefail

cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-gpu-check-out}}
PY=${PYTHON:-python}
TINY=${DINO_GPU_CHECK_TINY:-0}
# Only the files with GPU tests: collecting the others would import what a bare GPU machine
# lacks (Ray, moto) for tests that are skipped there anyway.
GPU_TESTS="tests/test_train_step.py tests/test_augment_batched.py"
mkdir -p "$OUTDIR"
: >"$OUTDIR/summary.txt"
failed=0

# run NAME SECONDS CMD...: stdout+stderr to OUTDIR/NAME.log, a summary line, the log's tail.
run() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS rc=0
    timeout --kill-after=15 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1 || rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUTDIR/summary.txt"
    tail -n 25 "$OUTDIR/$name.log"
    [ "$rc" -eq 0 ] || failed=1
}

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
    "$PY" -c 'import torch, timm; print("torch", torch.__version__, "cuda", torch.version.cuda,
"timm", timm.__version__, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
} >"$OUTDIR/env.txt" 2>&1
cat "$OUTDIR/env.txt"

if [ "$TINY" = "1" ]; then
    run train_step_tiny 240 "$PY" benchmarks/train_step.py --tiny --device cpu \
        --steps 3 --rounds 2 --warmup 1 --out "$OUTDIR/train_step_tiny.json"
    run pytest_gpu 240 "$PY" -m pytest -q -m gpu --collect-only $GPU_TESTS
else
    # Limits sum to 570 s; expected well under (a step is 0.02-0.5 s, 33 steps per variant).
    # torch.compile gets its own run: a slow compilation must not cost the plain figures.
    run train_step_s16 90 "$PY" benchmarks/train_step.py --model s16 \
        --out "$OUTDIR/train_step_s16.json"
    run train_step_b16 90 "$PY" benchmarks/train_step.py --model b16 \
        --out "$OUTDIR/train_step_b16.json"
    run train_step_b8 90 "$PY" benchmarks/train_step.py --model b8 \
        --out "$OUTDIR/train_step_b8.json"
    run pytest_gpu 120 "$PY" -m pytest -q -m gpu -rs $GPU_TESTS
    run train_step_s16_compile 180 "$PY" benchmarks/train_step.py --model s16 --compile \
        --out "$OUTDIR/train_step_s16_compile.json"
fi

echo "figures and logs in $OUTDIR"
exit "$failed"
