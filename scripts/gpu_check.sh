#!/usr/bin/env bash
# The checks that need a GPU, with every figure in one file:
#   bash scripts/gpu_check.sh [OUT]        (OUT default: ./gpu-check; results in OUT/gpu_check_results.txt)
# 1. bash scripts/setup.sh
# 2. the tests marked cuda (pytest -m cuda: tests/test_cuda.py): detections equal to the CPU's, bf16
#    training, resume with solver.deterministic bit for bit (a toy model; single frame, RDN, MEGA, base),
#    roi_align's backward under deterministic algorithms, torchrun/NCCL; run with -s so that the figures
#    they print (differences, triton present or not) land in the results file
# 3. megavod bench on CUDA at 600 px: single_R_101, base_R_101, mega_R_101
# 4. the same for the compared methods: single_R_50, dff_R_50, fgfa_R_50, rdn_base_R_50, mega_R_50
# 5. many streams (N = 1, 2, 4, 8) and batched training (B = 1, 2, 4) of mega_R_101 and synthetic_mega
#    at 600 px
# Every step runs even if one before it failed; the exit status is 1 if any failed. Without a CUDA device
# it refuses in one line (exit 1).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-./gpu-check}
PY=.venv/bin/python

refuse() {
  echo "gpu_check: no CUDA device (torch.cuda.is_available() is false); run it on a machine with a GPU" >&2
  exit 1
}
has_cuda() { "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

# Refuse before installing anything where the environment already exists, else right after setting it up.
if [ -x "$PY" ] && "$PY" -c 'import torch' 2>/dev/null; then
  has_cuda || refuse
fi

mkdir -p "$OUT" || exit 1
RESULTS="$OUT/gpu_check_results.txt"
: > "$RESULTS" || exit 1
FAILED=()

step() {  # step NAME COMMAND...: run it, its output to the console and to the results file
  local name=$1 status
  shift
  printf '\n===== %s\n$ %s\n' "$name" "$*" | tee -a "$RESULTS"
  "$@" 2>&1 | tee -a "$RESULTS"
  status=${PIPESTATUS[0]}
  printf -- '----- %s: exit %s\n' "$name" "$status" | tee -a "$RESULTS"
  [ "$status" -eq 0 ] || FAILED+=("$name")
  return "$status"
}

step setup bash scripts/setup.sh || { echo "gpu_check: setup failed" | tee -a "$RESULTS" >&2; exit 1; }
has_cuda || refuse

{
  echo "megavod gpu_check, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  "$PY" -c 'import torch, torchvision; p = torch.cuda.get_device_properties(0); print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; {torch.cuda.device_count()} device(s), cuda:0 = {p.name}, {p.total_memory / 2**30:.0f} GiB")'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
} 2>&1 | tee -a "$RESULTS"

step "cuda tests" "$PY" -m pytest -q -s -p no:cacheprovider -m cuda -rs tests
step "bench R-101: single, base, MEGA" "$PY" -m megavod bench --device cuda --size 600 \
  --config single_R_101 --config base_R_101 --config mega_R_101
step "bench R-50: the compared methods" "$PY" -m megavod bench --device cuda --size 600 \
  --config single_R_50 --config dff_R_50 --config fgfa_R_50 --config rdn_base_R_50 --config mega_R_50
step "bench streams" "$PY" -m megavod bench --device cuda --size 600 --frames 20 --streams 1 2 4 8 \
  --config synthetic_mega --config mega_R_101
step "bench batched training" "$PY" -m megavod bench --device cuda --size 600 --iterations 5 --batch 1 2 4 \
  --config synthetic_mega --config mega_R_101

if [ ${#FAILED[@]} -gt 0 ]; then
  printf '\ngpu_check: FAILED: %s (results: %s)\n' "$(IFS=,; echo "${FAILED[*]}")" "$RESULTS" | tee -a "$RESULTS" >&2
  exit 1
fi
printf '\ngpu_check: all steps passed (results: %s)\n' "$RESULTS" | tee -a "$RESULTS"
