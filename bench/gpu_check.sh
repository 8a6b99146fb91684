#!/usr/bin/env bash
# GPU figures of the image path (issue 21): bare ResNet101 encoder at 512² bf16 (batch 64/128/256)
# and the extraction pipeline on a 20k-JPEG synthetic catalogue, decode cpu vs gpu; peak memory.
# One command, meant to finish within 8 minutes on one GPU; prints the device and one JSON line per figure.
# Usage: bench/gpu_check.sh [extra args for bench/gpu_check.py, e.g. --images 5000]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 480 "$PY" bench/gpu_check.py "$@"
