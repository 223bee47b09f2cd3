"""Shared plumbing of the host lanes (tests/test_*_host.py): compiling an emulator from
tests/host/ with g++ (or nvcc's host pass), talking to it, and moving tensor storage through the
text protocol of tests/host/host_io.hpp (hex bit patterns, C99 hex floats)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch

from helpers import needs

HOST_DIR = Path(__file__).resolve().parent / "host"
INCLUDE = HOST_DIR.parent.parent / "csrc" / "include"
CXX_FLAGS = ["-std=c++17", "-O2", "-ffp-contract=off", "-fno-strict-aliasing"]
FMT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.uint8: "u8"}
INT_VIEW = {4: torch.int32, 2: torch.int16, 1: torch.uint8}


def compile_command(command: list[str]) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, " ".join(command) + "\n" + proc.stderr[-4000:]


def build_gxx(name: str, directory: Path) -> Path:
    """``tests/host/<name>.cpp`` compiled with g++ (warnings are errors) into ``directory``."""
    needs(shutil.which("g++") is not None, "g++ is not on PATH")
    exe = directory / name
    compile_command(["g++", *CXX_FLAGS, "-Wall", "-Wextra", "-Werror", f"-I{INCLUDE}", str(HOST_DIR / f"{name}.cpp"),
                     "-o", str(exe)])
    return exe


def build_nvcc_host(name: str, directory: Path) -> Path:
    """The same program compiled as CUDA by nvcc (its host pass: ``__CUDACC__`` defined)."""
    needs(shutil.which("nvcc") is not None, "nvcc is not on PATH")
    exe = directory / f"{name}_nvcc"
    compile_command(["nvcc", "-x", "cu", *CXX_FLAGS[:2], "-Xcompiler", "-ffp-contract=off,-fno-strict-aliasing",
                     "--expt-relaxed-constexpr", f"-I{INCLUDE}", str(HOST_DIR / f"{name}.cpp"), "-o", str(exe)])
    return exe


def run(exe: Path, request: str) -> list[str]:
    """One request to the emulator; its non-empty output lines."""
    proc = subprocess.run([str(exe)], input=request, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [line for line in proc.stdout.splitlines() if line]


def storage(t: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` storage elements from ``t``'s data pointer on (what a kernel can address)."""
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset(), (count,), (1,))


def to_bits(flat: torch.Tensor) -> str:
    size = flat.element_size()
    ints = flat.contiguous().view(INT_VIEW[size]).to(torch.int64) & ((1 << (8 * size)) - 1)
    return " ".join(f"{v:x}" for v in ints.tolist())


def from_bits(words: list[str], dtype: torch.dtype) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    ints = torch.tensor([int(w, 16) for w in words], dtype=torch.int64)
    if size > 1:  # back to the signed integer view of the same width
        ints = torch.where(ints >= 1 << (8 * size - 1), ints - (1 << (8 * size)), ints)
    return ints.to(INT_VIEW[size]).view(dtype)
