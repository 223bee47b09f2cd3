#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite.
#
# Lanes: reference/torch always; Triton interpreter and Triton AOT compile (sm_80/sm_90) without a
# GPU; nvcc compile-only where nvcc exists; host emulation of the CUDA kernels where g++ exists; the
# GPU lane where a GPU exists. On machines without a GPU the suite then runs a second time under
# the versions GPU images ship — torch 2.11 (its CUDA build, which runs on a CPU) and Triton 3.6 —
# in .venv-torch211 and, as on the GPU image, without diffusers; there it also builds the real CUDA
# extension (extension lane), compiles the launchers against that torch's CUDA headers (launcher
# lane) and rehearses the GPU run kit (tests/test_gpu_kit.py). GK_SKIP_COMPAT=1 skips that second
# run (it downloads a few GB once). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$GK_ROOT"

COMPAT=""
if [ "${GK_SKIP_COMPAT:-0}" = "0" ] && ! has_gpu; then
  COMPAT="${GK_COMPAT_VENV:-$GK_ROOT/.venv-torch211}"
  if [ ! -x "$COMPAT/bin/python" ]; then
    echo "[test] creating $COMPAT (torch 2.11 + triton 3.6, as on GPU images)"
    "$GK_PYTHON" -m venv "$COMPAT"
    "$COMPAT/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  fi
  # numpy < 2.3: Triton 3.6's interpreter relies on behaviour numpy 2.3 removed. Plus the package's
  # [test] and [bench] extras (what the GPU image has too: matplotlib, pytest-benchmark); the package
  # itself is used from the source tree (PYTHONPATH), not installed: installing it with this CUDA
  # torch would build _C into the tree, where the main environment's torch cannot load it.
  mapfile -t extras < <("$COMPAT/bin/python" - "$GK_ROOT/pyproject.toml" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
for name in ("test", "bench"):
    block = re.search(rf"^{name}\s*=\s*\[(.*?)\]", text, re.M | re.S).group(1)
    print("\n".join(re.findall(r'"([^"]+)"', block)))
PY
)
  "$COMPAT/bin/python" -m pip install -q torch==2.11.0 triton==3.6.0 "numpy<2.3" setuptools wheel "${extras[@]}"
  # ComfyUI for tests/test_comfyui.py (GPL: the tests import it, nothing copies it), from its wheel and
  # requirements in ../shared/comfyui; it imports torchvision, which this torch has a build of.
  COMFYUI_DIR="${GK_COMFYUI_DIR:-$GK_ROOT/../shared/comfyui}"
  if ls "$COMFYUI_DIR"/comfyui-*.whl >/dev/null 2>&1; then
    "$COMPAT/bin/python" -m pip install -q torch==2.11.0 torchvision==0.26.0 -r "$COMFYUI_DIR/requirements.txt"
    "$COMPAT/bin/python" -m pip install -q --no-deps "$COMFYUI_DIR"/comfyui-*.whl
  else
    echo "[test] no ComfyUI wheel in $COMFYUI_DIR: tests/test_comfyui.py will skip"
  fi
  # The launcher lane compiles csrc/ against a CUDA torch's headers: that torch's.
  : "${GK_TORCH_CUDA_INCLUDE:=$("$COMPAT/bin/python" -c \
      'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')}"
  export GK_TORCH_CUDA_INCLUDE
fi

# pytest-xdist (from the [test] extra) runs the tests on every core (GK_TEST_WORKERS=N to choose, 0 for
# one process); --dist loadgroup keeps the modules that build something expensive once on one worker
# (tests/conftest.py: ONE_WORKER_MODULES).
workers() {
  if [ "${GK_TEST_WORKERS:-auto}" != "0" ] && "$1" -c "import xdist" >/dev/null 2>&1; then
    echo "-n ${GK_TEST_WORKERS:-auto} --dist loadgroup"
  fi
}

echo "[test] main suite ($("$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>/dev/null || echo "$PY"))"
# shellcheck disable=SC2046
"$PY" -m pytest tests $(workers "$PY") "$@"

if [ -n "$COMPAT" ]; then
  # -m "not nvcc": the nvcc / launcher lanes depend on neither version and ran above; the extension
  # lane, which builds _C with this torch, supersedes the launcher lane here.
  # diffusers is made unimportable here (scripts/hide_modules), as on the GPU image, which has the
  # same torch and Triton and no diffusers: every test needing it must skip with a reason, and the GPU
  # kit's rehearsal (tests/test_gpu_kit.py) runs under the image's conditions. The diffusers tests ran
  # in the first run.
  export GK_HIDE_MODULES=diffusers GK_EXPECT_CUDA_TORCH=1 PYTHONPATH="$GK_ROOT:$GK_ROOT/scripts/hide_modules"
  if "$COMPAT/bin/python" -c "import diffusers" >/dev/null 2>&1; then
    echo "[test] diffusers is still importable with GK_HIDE_MODULES=diffusers: scripts/hide_modules is broken"
    exit 1
  fi
  echo "[test] the suite under torch 2.11 + triton 3.6, without diffusers (+ extension lane, GPU kit rehearsal)"
  # shellcheck disable=SC2046
  "$COMPAT/bin/python" -m pytest tests -m "not nvcc" $(workers "$COMPAT/bin/python") "$@"
fi
