#!/usr/bin/env bash
# The GPU check every issue lent an H100/H200 runs (bench/gpu_check.py says what it measures), under 8 minutes.
# Needs torch with CUDA, triton and transformers; no Ray, Redis, downloads or model files.
#   bash scripts/gpu_check.sh [OUT_DIR]      # writes OUT_DIR/gpu_check.json and gpu_check.md ($OUT, else ./gpu_check_out)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
if ! python3 -c "import pdserve" 2>/dev/null; then
  # Not installed (a bare GPU machine): import the checkout as the package it is.
  link_dir="$(mktemp -d)"
  ln -s "$PWD" "$link_dir/pdserve"
  export PYTHONPATH="$link_dir${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! command -v cc >/dev/null && ! command -v gcc >/dev/null; then
  echo "gpu_check: no C compiler (cc/gcc) on PATH: Triton builds its launcher with one, so the paged-kernel rows will fail" >&2
fi
export PYTHONUNBUFFERED=1
timeout 470 python3 -m pdserve.bench.gpu_check --out-dir "$out" "${@:2}"
