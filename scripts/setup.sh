#!/usr/bin/env bash
# Idempotent setup: a virtual environment in .venv (sharing the system site-packages, so NVIDIA's
# container keeps its torch, Transformer Engine and apex) with everything in requirements.txt.
# Source it (`source scripts/setup.sh`) or call it; it leaves .venv/bin first on PATH when sourced.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGAMOE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV" >&2
  "$PY" -m venv --system-site-packages "$VENV"
fi
VPY="$VENV/bin/python"

stamp="$VENV/.megamoe-req-$(sha1sum "$ROOT/requirements.txt" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  # Without a GPU, take torch's CPU build explicitly: a bare `torch` requirement pulls a multi-GB CUDA
  # build from PyPI. A torch that already imports (e.g. NVIDIA's container) is kept as it is.
  if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      "$VPY" -m pip install --quiet "torch>=2.4"
    else
      "$VPY" -m pip install --quiet "torch==2.13.0+cpu" || "$VPY" -m pip install --quiet "torch==2.13.0"
    fi
  fi
  echo "[setup] installing requirements.txt into $VENV" >&2
  "$VPY" -m pip install --quiet --disable-pip-version-check -r "$ROOT/requirements.txt"
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
