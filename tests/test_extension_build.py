"""Extension lane: ``guidance_kernels._C`` built for real by setup.py, on a machine without a GPU.

Needs a CUDA build of torch (it runs on a CPU-only machine: the scripts' torch 2.11 lane, the
version GPU images ship) and nvcc. A copy of the package is built in a temporary directory with
``setup.py build_ext --inplace`` for sm_90a, exactly as a GPU user's install builds it; then
``tests/extension_probe.py`` imports the result and drives every ``cuda``-backend entry point
through the real bindings up to the launcher's device check (see that file). This is what the
launcher lane (headers only) cannot see: linking against torch's libraries, module import, and
the glue agreeing with the pybind signatures.

``GK_EXPECT_CUDA_TORCH=1`` (set by scripts/test.sh for that lane) makes a CPU-only torch a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import needs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ARCH = "9.0a"


def _cuda_home() -> str | None:
    """CUDA_HOME as set, else a toolkit directory holding nvcc and libcudart (an nvcc wrapper on
    PATH can make torch guess a directory without the libraries)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = [Path("/usr/local/cuda")] + ([Path(nvcc).resolve().parent.parent] if nvcc else [])
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and any((home / d / "libcudart.so").exists() for d in ("lib64", "lib")):
            return str(home)
    return None


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    if torch.version.cuda is None:
        if os.environ.get("GK_EXPECT_CUDA_TORCH", "0") not in ("", "0"):
            pytest.fail(f"GK_EXPECT_CUDA_TORCH is set but torch {torch.__version__} is a CPU-only build")
        pytest.skip(f"torch {torch.__version__} is a CPU-only build (scripts/test.sh runs this lane with torch 2.11)")
    needs(shutil.which("nvcc") is not None, "nvcc is not on PATH")
    home = _cuda_home()
    needs(home is not None, "no CUDA toolkit directory with libcudart found (set CUDA_HOME)")
    copy = tmp_path_factory.mktemp("extension")
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "_build_info.json")
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(ROOT / name, copy / name)
    for name in ("csrc", "guidance_kernels"):
        shutil.copytree(ROOT / name, copy / name, ignore=ignore)
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=ARCH, CUDA_HOME=home, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return copy


def _probe(copy: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(copy), str(HERE)]))
    proc = subprocess.run([sys.executable, str(HERE / "extension_probe.py")], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def probe(built) -> dict:
    return _probe(built)


def test_extension_builds_imports_and_reports_its_arch(built, probe):
    assert probe["reason"] is None, probe["reason"]
    assert Path(probe["file"]).resolve().parent == (built / "guidance_kernels").resolve()
    assert probe["archs"] == ["9.0"], probe["archs"]
    info = json.loads((built / "guidance_kernels" / "_build_info.json").read_text())
    assert info == {"cuda_extension": True, "skip_reason": None, "archs": ARCH}


def test_glue_matches_the_bindings_up_to_the_launch(probe):
    """Every entry point reaches its launcher, which rejects the CPU tensors by name."""
    assert set(probe["calls"]) >= {"guidance_combine", "apg_combine", "apg_combine_momentum",
                                   "cfg_zero_star_combine", "sag_degrade_ddpm", "sag_degrade_kdiff_mask"}
    wrong = {name: outcome for name, outcome in probe["calls"].items()
             if outcome["type"] != "RuntimeError" or "CUDA tensor" not in outcome["message"]}
    assert not wrong, json.dumps(wrong, indent=1)
