#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite.
#
# Lanes: reference/torch always; Triton interpreter and Triton AOT compile (sm_80/sm_90) without a
# GPU; nvcc compile-only where nvcc exists; launcher compile where GK_TORCH_CUDA_INCLUDE points at a
# CUDA torch's include dir; the GPU lane where a GPU exists. Then, on machines without a GPU, the
# interpreter and AOT lanes again under Triton 3.6 (the version GPU images ship; GK_SKIP_COMPAT=1
# skips it). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$GK_ROOT"
echo "[test] main suite"
"$PY" -m pytest tests "$@"

if [ "${GK_SKIP_COMPAT:-0}" = "0" ] && ! has_gpu; then
  COMPAT="${GK_COMPAT_VENV:-$GK_ROOT/.venv-triton36}"
  if [ ! -x "$COMPAT/bin/python" ]; then
    echo "[test] creating $COMPAT (torch 2.13 CPU + triton 3.6)"
    "$GK_PYTHON" -m venv "$COMPAT"
    "$COMPAT/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  fi
  # numpy < 2.3: Triton 3.6's interpreter relies on behaviour numpy 2.3 removed. The package's own
  # [test] extras (diffusers, transformers, ...) so that this lane runs the same tests as the main one.
  "$COMPAT/bin/python" -m pip install -q torch==2.13.0 triton==3.6.0 "numpy<2.3" setuptools wheel
  "$COMPAT/bin/python" -m pip install -q --no-build-isolation -e "$GK_ROOT[test]" "numpy<2.3"
  echo "[test] Triton 3.6 lanes (interpreter + AOT compile)"
  PYTHONPATH="$GK_ROOT" "$COMPAT/bin/python" -m pytest tests -k "triton or compile_lanes" "$@"
fi
