#!/usr/bin/env bash
# The GPU run, in one command, on a machine with a CUDA torch, triton and nvcc (no network needed):
# build guidance_kernels._C for this GPU, run the whole test suite (the GPU lane included), then the
# benchmark at real diffusion shapes. Everything lands in one folder:
#
#   <dir>/info.txt          python -m guidance_kernels info (versions, extension, usable backends)
#   <dir>/tests.log, .xml   pytest output and JUnit XML
#   <dir>/bench-cuda.{json,md,png}
#
#   GK_RESULTS=dir          the folder (default: benchmarks/results/<date>-<gpu>-<commit>)
#   GK_COMMIT=sha           the commit to record when the tree has no .git (copied working trees)
#   GK_PYTHON=python3       the interpreter holding the CUDA torch
#   TORCH_CUDA_ARCH_LIST    default: this GPU's arch (9.0a on Hopper)
#   extra arguments go to the bench (e.g. --ops guided_attention)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${GK_PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

read -r arch gpu < <("$PY" - <<'PYEOF'
import re, torch
assert torch.cuda.is_available(), "no CUDA device: this script is for GPU machines (use scripts/bench.sh)"
major, minor = torch.cuda.get_device_capability()
name = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-")
print(f"{major}.{minor}{'a' if (major, minor) == (9, 0) else ''}", name)
PYEOF
) || exit 1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}"
# torch guesses CUDA_HOME from nvcc's location; a wrapper on PATH can point it at a directory
# without the CUDA libraries, so prefer the standard toolkit directory when it exists.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export GK_COMMIT="${GK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
dir="${GK_RESULTS:-benchmarks/results/$(date -u +%Y%m%d)-$gpu-$GK_COMMIT}"
mkdir -p "$dir"

echo "[gpu] building guidance_kernels._C for $TORCH_CUDA_ARCH_LIST"
"$PY" setup.py -q build_ext --inplace > "$dir/build.log" 2>&1 || { tail -50 "$dir/build.log"; exit 1; }
"$PY" -m guidance_kernels info | tee "$dir/info.txt"
"$PY" -c "from guidance_kernels import _extension as e; assert e.load() is not None, e.unavailable_reason()" || exit 1

echo "[gpu] test suite"
"$PY" -m pytest tests -q -rs -p no:cacheprovider --junitxml "$dir/tests.xml" > "$dir/tests.log" 2>&1
tests_rc=$?
tail -15 "$dir/tests.log"

echo "[gpu] benchmark"
"$PY" -m guidance_kernels bench --full --out "$dir" "$@"
bench_rc=$?
echo "[gpu] results in $dir (tests rc=$tests_rc, bench rc=$bench_rc)"
exit $(( tests_rc != 0 || bench_rc != 0 ))
