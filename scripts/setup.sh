#!/usr/bin/env bash
# Create (or reuse) a virtual environment in .venv with torch and guidance_kernels installed.
# Sourced by scripts/bench.sh and scripts/test.sh; needs only a Python >= 3.10 on PATH.
#
#   GK_VENV=path        where the environment lives (default: <repo>/.venv)
#   GK_PYTHON=python3   the interpreter that creates it
#   GK_TORCH=spec       the torch requirement. Default: torch==2.13.0 on machines without an NVIDIA
#                       GPU (a CPU machine needs no CUDA packages); on GPU machines, the torch already
#                       installed there if any, else "torch>=2.5" (the CUDA build from PyPI).
#   GK_EXTRAS=test,bench  the package extras to install
set -euo pipefail
GK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GK_VENV="${GK_VENV:-$GK_ROOT/.venv}"
GK_PYTHON="${GK_PYTHON:-python3}"
GK_EXTRAS="${GK_EXTRAS:-test,bench}"

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if [ ! -x "$GK_VENV/bin/python" ]; then
  echo "[setup] creating $GK_VENV"
  # --system-site-packages on GPU machines keeps a preinstalled CUDA torch usable.
  if has_gpu; then "$GK_PYTHON" -m venv --system-site-packages "$GK_VENV"; else "$GK_PYTHON" -m venv "$GK_VENV"; fi
fi
PY="$GK_VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true

if [ -z "${GK_TORCH:-}" ]; then
  if has_gpu; then
    if "$PY" -c "import torch" >/dev/null 2>&1; then GK_TORCH="torch"; else GK_TORCH="torch>=2.5"; fi
  else
    GK_TORCH="torch==2.13.0"
  fi
fi
echo "[setup] installing $GK_TORCH"
"$PY" -m pip install -q "$GK_TORCH"
if has_gpu && ! "$PY" -c "import triton" >/dev/null 2>&1; then "$PY" -m pip install -q triton; fi
if ! has_gpu && ! "$PY" -c "import triton" >/dev/null 2>&1; then
  # CPU machines use triton for the interpreter and compile-only test lanes.
  "$PY" -m pip install -q "triton>=3.6" || echo "[setup] triton unavailable: its test lanes will say so"
fi
echo "[setup] installing guidance_kernels[$GK_EXTRAS] (builds the CUDA extension where CUDA torch + nvcc exist)"
# --no-build-isolation: the extension must be built against the torch installed above.
"$PY" -m pip install -q --no-build-isolation -e "$GK_ROOT[$GK_EXTRAS]"
"$PY" -m guidance_kernels info
