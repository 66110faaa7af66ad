#!/usr/bin/env bash
# Trainer throughput and MFU on this machine's NVIDIA GPUs: bash bench/gpu.sh [OUT] [gpu.py flags]
#
# Runs bench/gpu.py (350m, then 1b if it fits; with several GPUs also the first that fits
# on all of them) with the project's existing virtualenv. It installs nothing and needs
# no network: run it from a checkout where `make setup` was done. The result (default
# bench/results/gpu.json) is written after every preset, and the whole run is bounded at
# under 8 minutes (gpu.py's own time guard, then this script's timeout).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/gpu.json}
shift || true
PY=${PY:-.venv/bin/python}
if [[ ! -x $PY ]]; then
    echo "bench/gpu.sh: no Python at $PY: run 'make setup' first (or PY=/path/to/python)" >&2
    exit 2
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
fi
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# gpu.py stops starting work after --budget-s; the timeout only catches a hung run.
exec timeout --kill-after=10 470 "$PY" bench/gpu.py --budget-s 400 --out "$OUT" "$@"
