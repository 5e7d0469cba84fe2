#!/usr/bin/env bash
# Install tandem into the current Python environment. Usage: scripts/install.sh [extra]  (extra: test | bench)
#
# torch is installed first, so that pip never picks a build for us:
#   - torch already importable: kept as it is (any torch >= 2.4).
#   - a GPU (nvidia-smi present): pip's default torch, a CUDA build.
#   - no GPU: the CPU build from PyTorch's CPU wheel index when it is reachable ($TANDEM_TORCH_CPU_INDEX);
#     otherwise what the configured index offers for torch==$TANDEM_TORCH_VERSION (a CPU build where the
#     index has one, as on machines with a local wheel cache), with a warning if that is a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CPU_INDEX=${TANDEM_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
TORCH_VERSION=${TANDEM_TORCH_VERSION:-2.13.0}

reachable() {  # can we list torch on this index within a few seconds?
  "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5)' "$1" \
    >/dev/null 2>&1
}

install_cpu_torch() {
  if reachable "$CPU_INDEX"; then
    echo "install.sh: no GPU: installing the CPU build of torch from $CPU_INDEX"
    "$PY" -m pip install -q torch --index-url "$CPU_INDEX"
  else
    echo "install.sh: no GPU and $CPU_INDEX is not reachable: installing torch==$TORCH_VERSION from the configured index"
    "$PY" -m pip install -q "torch==$TORCH_VERSION"
    if "$PY" -c 'import torch, sys; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
      echo "install.sh: warning: the index gave a CUDA build of torch; it runs on a CPU but is large." \
           "Point TANDEM_TORCH_CPU_INDEX at a CPU wheel index to avoid it." >&2
    fi
  fi
}

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "install.sh: GPU found: torch comes with the package's dependencies (a CUDA build)"
  else
    install_cpu_torch
  fi
fi
extra=${1:-bench}
"$PY" -m pip install -q -e ".[${extra}]"
