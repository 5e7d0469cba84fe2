#!/usr/bin/env bash
# Install tandem into the current Python environment. Usage: scripts/install.sh [extra]  (extra: test | bench)
# Without a GPU, pin the CPU build of torch first so pip never pulls the multi-GB CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v nvidia-smi >/dev/null 2>&1 && ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
extra=${1:-bench}
"$PY" -m pip install -q -e ".[${extra}]"
