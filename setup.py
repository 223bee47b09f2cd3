"""Build script: a pure-Python install everywhere, plus the CUDA extension `guidance_kernels._C`
where a CUDA build of torch and nvcc are present.

No GPU is needed at build time. Switches (environment variables):
  GUIDANCE_KERNELS_SKIP_CUDA=1   never build the extension
  TORCH_CUDA_ARCH_LIST           archs to build (default "8.0;8.6;8.9;9.0a")
  MAX_JOBS                       parallel nvcc jobs (default: sized to CPU count and memory)

What was decided is written to guidance_kernels/_build_info.json, which
`python -m guidance_kernels info` reports.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0a"
BUILD_INFO = ROOT / "guidance_kernels" / "_build_info.json"


def _cuda_skip_reason() -> str | None:
    """Why the extension cannot be built here, or None if it can."""
    if os.environ.get("GUIDANCE_KERNELS_SKIP_CUDA", "") not in ("", "0"):
        return "GUIDANCE_KERNELS_SKIP_CUDA is set"
    try:
        import torch
    except ImportError:
        return "torch is not importable at build time (install torch first, then build with --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "nvcc / CUDA_HOME not found"
    return None


def _max_jobs() -> str:
    if "MAX_JOBS" in os.environ:
        return os.environ["MAX_JOBS"]
    # Each nvcc job can take ~2-3 GB with several archs; do not oversubscribe memory.
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = 8.0
    return str(max(1, min(os.cpu_count() or 1, int(mem_gb // 3))))


def _extensions_and_cmdclass():
    reason = _cuda_skip_reason()
    info = {"cuda_extension": reason is None, "skip_reason": reason, "archs": None}
    if reason is not None:
        print(f"guidance_kernels: building without the CUDA extension: {reason}", file=sys.stderr)
        return [], {}, info

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    os.environ.setdefault("MAX_JOBS", _max_jobs())
    info["archs"] = archs
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    ext = CUDAExtension(
        name="guidance_kernels._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc" / "include")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )
    print(f"guidance_kernels: building the CUDA extension for TORCH_CUDA_ARCH_LIST={archs}", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, info


ext_modules, cmdclass, build_info = _extensions_and_cmdclass()
BUILD_INFO.write_text(json.dumps(build_info, indent=2) + "\n")

setup(ext_modules=ext_modules, cmdclass=cmdclass)
