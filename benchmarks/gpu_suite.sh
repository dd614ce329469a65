#!/usr/bin/env bash
# The whole GPU measurement of issue 17 in one command, under 8 minutes on one GPU:
#
#   bash benchmarks/gpu_suite.sh [--smoke] [OUT_DIR]     # OUT_DIR: default $OUT or ./gpu_results
#
# Steps, each under its own `timeout` (seconds below) so a slow one cannot eat the others; each
# writes OUT_DIR/<step>.log and (benchmarks) OUT_DIR/<step>.json, and OUT_DIR/summary.tsv lists
# step, exit code and seconds:
#   preflight     20  versions, CUDA device, which optional packages import
#   tests         70  the CUDA tests and the training-loop tests (pytest -n 4 when xdist exists)
#   train_step_*      ViT-B/16 (224 px, width 768, depth 12, 16 heads, batch 64, K = 20) against
#                     the reference design, fp32 (60 s, also counts graph breaks) and bf16 (45 s)
#   timm_*        35  the same step against timm's vit_base_patch16_224 (12 heads: its shape),
#                     fp32 and bf16 eager, and (120 s) bf16 with torch.compile of both models;
#                     SUITE_COMPILE_FP32=1 adds fp32 compiled (another 120 s, over 8 minutes)
#   data_pipeline 70  VOC-sized JPEGs through the voc.yaml preset at batch 64 bf16: per worker,
#                     loader at 0/8/15 workers, epoch against step
#   pseudo_masks  25  pseudo-mask generation on the device (224 px, K = 20) against the reference
# --smoke runs every step at tiny shapes (on the CPU when there is no GPU) to check the script.
# Runs from a source checkout without installing: src/ goes on PYTHONPATH. PYTHON picks the
# interpreter (default python3).
set -u -o pipefail

SMOKE=0
if [ "${1:-}" = "--smoke" ]; then
    SMOKE=1
    shift
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESULTS="${1:-${OUT:-./gpu_results}}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT" || exit 1
printf 'step\texit_code\tseconds\n' > "$RESULTS/summary.tsv"
FAILED=0

# run NAME SECONDS COMMAND...: one step under its time cap, logged and summarised.
run() {
    local name="$1" cap="$2"
    shift 2
    local started=$SECONDS
    echo "== $name (cap ${cap}s)"
    timeout --kill-after=5 "$cap" "$@" > "$RESULTS/$name.log" 2>&1
    local code=$?
    printf '%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - started))" >> "$RESULTS/summary.tsv"
    tail -n 12 "$RESULTS/$name.log"
    if [ "$code" -ne 0 ]; then
        echo "!! $name failed with exit code $code (124: over its ${cap}s cap)"
        FAILED=$((FAILED + 1))
    fi
}

run preflight 20 "$PYTHON" -c '
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
for name in ("attnmaps", "timm", "torchvision", "pytest", "xdist", "numpy", "PIL", "yaml",
             "safetensors", "scipy", "tqdm", "matplotlib"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "ok"))
    except Exception as error:
        print(name, "MISSING:", type(error).__name__, error)
'

DEVICE="$("$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')"
if [ "$SMOKE" = 1 ]; then
    VIT=(--img-size 32 --patch-size 16 --embed-dim 32 --depth 2 --heads 2 --batch-size 4
         --quick)
    VIT16=("${VIT[@]}")
    STEP_ROUNDS=()
    COMPILE_BACKEND=(--backend aot_eager)
    DATA=(--quick --config voc_cpu.yaml --workers 0,1 --set train.batch_size=8)
    MASKS=(--quick)
    TESTS=(tests/test_train_readback.py)
else
    VIT=(--img-size 224 --patch-size 16 --embed-dim 768 --depth 12 --heads 12 --batch-size 64)
    VIT16=(--img-size 224 --patch-size 16 --embed-dim 768 --depth 12 --heads 16 --batch-size 64)
    STEP_ROUNDS=(--warmup 2 --repeats 10)
    COMPILE_BACKEND=()
    DATA=(--images 512 --repeats 2 --config voc.yaml --workers 0,8,15
          --set train.batch_size=64 train.precision=bf16 data.num_workers=15
          data.normalize_on_device=true)
    MASKS=(--images 16 --repeats 3)
    TESTS=(tests/test_train_readback.py tests/test_precision.py tests/test_optim.py
           tests/test_pseudo_masks.py tests/test_crf_torch.py tests/test_interrupt.py)
fi

PARALLEL=()
if "$PYTHON" -c 'import xdist' 2> /dev/null; then
    PARALLEL=(-n 4)
fi
run tests 70 "$PYTHON" -m pytest -x -q -rs -p no:cacheprovider "${PARALLEL[@]}" "${TESTS[@]}"

run train_step_fp32 60 "$PYTHON" benchmarks/train_step.py --device "$DEVICE" "${VIT16[@]}" \
    "${STEP_ROUNDS[@]}" --explain --out "$RESULTS/train_step_fp32.json"
run train_step_bf16 45 "$PYTHON" benchmarks/train_step.py --device "$DEVICE" "${VIT16[@]}" \
    "${STEP_ROUNDS[@]}" --precision bf16 --out "$RESULTS/train_step_bf16.json"

run timm_fp32 35 "$PYTHON" benchmarks/timm_compare.py --device "$DEVICE" "${VIT[@]}" \
    "${STEP_ROUNDS[@]}" --out "$RESULTS/timm_fp32.json"
run timm_bf16 35 "$PYTHON" benchmarks/timm_compare.py --device "$DEVICE" "${VIT[@]}" \
    "${STEP_ROUNDS[@]}" --precision bf16 --out "$RESULTS/timm_bf16.json"
run timm_bf16_compiled 120 "$PYTHON" benchmarks/timm_compare.py --device "$DEVICE" "${VIT[@]}" \
    "${STEP_ROUNDS[@]}" --precision bf16 --compile "${COMPILE_BACKEND[@]}" \
    --out "$RESULTS/timm_bf16_compiled.json"
if [ "${SUITE_COMPILE_FP32:-0}" = 1 ]; then
    run timm_fp32_compiled 120 "$PYTHON" benchmarks/timm_compare.py --device "$DEVICE" \
        "${VIT[@]}" "${STEP_ROUNDS[@]}" --compile "${COMPILE_BACKEND[@]}" \
        --out "$RESULTS/timm_fp32_compiled.json"
fi

run data_pipeline 70 "$PYTHON" benchmarks/data_pipeline.py --device "$DEVICE" "${DATA[@]}" \
    --out "$RESULTS/data_pipeline.json"
run pseudo_masks 25 "$PYTHON" benchmarks/pseudo_mask_speed.py --device "$DEVICE" "${MASKS[@]}" \
    --out "$RESULTS/pseudo_masks.json"

echo "== summary ($RESULTS/summary.tsv)"
cat "$RESULTS/summary.tsv"
[ "$FAILED" -eq 0 ]
