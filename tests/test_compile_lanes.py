"""Compile lanes that need no GPU.

Triton AOT: ``tests/triton_aot.py`` (a subprocess without TRITON_INTERPRET) compiles every kernel
launched by the ``CASES`` of ``tests/aot_*.py`` to sm_80 and sm_90 cubin with Triton's own compiler
and ptxas; every compile must succeed and no kernel may spill registers to local memory.

nvcc (nvcc on PATH): ``tests/nvcc/*.cu`` instantiate every kernel template of the torch-free
headers in ``csrc/include`` for every element type; they are compiled for sm_80 and sm_90a with the
extension's flags and ``-Xptxas -v``, whose report must list every kernel for both targets with no
spill, no stack frame (a run-time indexed register array) and at most 128 registers (two 256-thread
blocks per SM).

Launcher (GK_TORCH_CUDA_INCLUDE = the ``torch/include`` directory of a CUDA build of torch;
scripts/test.sh points it at its torch 2.11 environment's): ``csrc/*.cu`` compiled by nvcc (sm_90a only, to
stay fast) and ``csrc/*.cpp`` by g++ exactly as ``torch.utils.cpp_extension`` builds ``_C``, in
parallel; the objects must link into one shared object that exports ``PyInit__C`` and leaves none of
the package's own symbols undefined.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import HAS_TRITON
from helpers import needs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CSRC = ROOT / "csrc"
# What torch.utils.cpp_extension adds to every nvcc command (COMMON_NVCC_FLAGS), plus setup.py's own.
NVCC_FLAGS = ["-std=c++17", "-O3", "-lineinfo", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-D__CUDA_NO_HALF2_OPERATORS__"]
NVCC_TARGETS = {"sm_80": "arch=compute_80,code=sm_80", "sm_90a": "arch=compute_90a,code=sm_90a"}
MAX_REGISTERS = 128


@pytest.fixture(scope="session")
def aot_records():
    needs(HAS_TRITON, "triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(HERE / "triton_aot.py")], capture_output=True, text=True, env=env,
                          cwd=HERE, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_triton_kernels_compile_for_sm80_and_sm90(aot_records):
    failures = [r for r in aot_records if not r["ok"]]
    assert not failures, "\n".join(f"{r['case']} {r['kernel']} {r['target']}: {r['error']}" for r in failures)
    cases = {r["case"] for r in aot_records}
    modules = {p.stem for p in HERE.glob("aot_*.py")}
    assert {c.split(":")[0] for c in cases} == modules, "every aot_*.py module must launch kernels"
    assert {r["target"] for r in aot_records} == {"sm_80", "sm_90"}


def test_triton_kernels_do_not_spill(aot_records):
    spilling = [r for r in aot_records if r.get("local", 0) or r.get("stack", 0)]
    assert not spilling, "\n".join(f"{r['case']} {r['kernel']} {r['target']}: local={r.get('local')} "
                                   f"stack={r.get('stack')}" for r in spilling)
    assert all("reg" in r for r in aot_records), "resource usage could not be read from the cubins"


# Shared memory one block may request: sm_86/sm_89 (in the default arch list) allow 99 KiB, sm_90 227 KiB.
SHARED_LIMITS = {"sm_80": 101376, "sm_90": 232448}


def test_triton_kernels_fit_shared_memory(aot_records):
    """A kernel needing more shared memory than the GPU allows compiles fine and fails at launch
    (OutOfResources); the sm_80 build stands in for sm_86/sm_89, which allow the least."""
    assert all(isinstance(r.get("shared"), int) for r in aot_records), "shared memory could not be read"
    over = [r for r in aot_records if r["shared"] > SHARED_LIMITS[r["target"]]]
    assert not over, "\n".join(f"{r['case']} {r['kernel']} {r['target']}: {r['shared']} B" for r in over)


def test_contiguous_combine_uses_128_bit_loads(aot_records):
    """The fast path must vectorise: a contiguous bf16 combine reads each branch with ld.global.v4."""
    rows = [r for r in aot_records if r["case"].endswith("combine-torch.bfloat16-contiguous")
            and r["kernel"] == "_combine_kernel"]
    assert rows and all(r["global_loads"].get("v4.b32", 0) >= 3 for r in rows), rows


HALF_ATTENTION = ("bf16", "fp16", "float16", "bfloat16")
HEAD_DIMS = (40, 64, 80, 128, 160)


def _attention_records(aot_records, kernel, target):
    return [r for r in aot_records if r["kernel"] == kernel and r["target"] == target
            and any(t in r["case"] for t in HALF_ATTENTION)]


def _head_dim(record) -> int:
    return int(re.search(r"-d(\d+)$", record["case"]).group(1))


def _mma_kinds(record) -> set[str]:
    return {op.split(".")[0] for op in record["sass"]["ops"] if "MMA" in op and not op.startswith("HFMA2")}


def test_attention_kernels_use_wgmma_on_sm90(aot_records):
    """Every 16-bit attention kernel (main kernel, key-mass forward and column sums) runs its dots
    on Hopper's warpgroup MMA (HGMMA, wgmma) in every head dim served, never mma.sync (HMMA);
    sm_80 runs mma.sync."""
    for kernel in ("_attention_kernel", "_forward_kernel", "_colsum_kernel"):
        hopper = _attention_records(aot_records, kernel, "sm_90")
        ampere = _attention_records(aot_records, kernel, "sm_80")
        assert hopper and ampere, kernel
        bad = [(r["case"], sorted(_mma_kinds(r))) for r in hopper if _mma_kinds(r) != {"HGMMA"}]
        assert not bad, f"{kernel} sm_90 not on wgmma only: {bad}"
        assert all(_mma_kinds(r) == {"HMMA"} for r in ampere), kernel
    dims = {_head_dim(r) for r in _attention_records(aot_records, "_attention_kernel", "sm_90")}
    assert dims >= set(HEAD_DIMS), dims


def test_attention_tiles_follow_each_targets_table(aot_records):
    """The launch tiles of the default cases are that target's table's first entry (the lane
    compiles sm_80 and sm_90 with their own tiles), and sm_90 compiles 128x128 tiles spill-free at
    d = 40, 64, 80 and 128."""
    from guidance_kernels.triton.guided_attention import attention_configs

    for target, arch in (("sm_80", (8, 0)), ("sm_90", (9, 0))):
        rows = [r for r in _attention_records(aot_records, "_attention_kernel", target)
                if re.search(r":(mixed|joint)-bf16-d\d+$", r["case"])]
        assert {_head_dim(r) for r in rows} == set(HEAD_DIMS)
        for r in rows:
            block_m, block_n, warps, stages = attention_configs(_head_dim(r), torch.bfloat16, arch)[0]
            c = r["constants"]
            assert (c["BLOCK_M"], c["BLOCK_N"], r["num_warps"], c["STAGES"]) == (block_m, block_n, warps, stages), r
    wide = {_head_dim(r) for r in _attention_records(aot_records, "_attention_kernel", "sm_90")
            if (r["constants"]["BLOCK_M"], r["constants"]["BLOCK_N"]) == (128, 128)}
    assert wide >= {40, 64, 80, 128}, wide


def test_key_mass_column_sums_reduce_once(aot_records):
    """attention_key_mass pass 2 keeps its column sums in registers: its query-tile loop (the
    innermost loop holding the exp2) has no warp shuffle, and on sm_90 in 16 bits no shared-memory
    store either (the cross-warp reduction happens once, after the loop; the loads are cp.async /
    wgmma operands; fp32 tiles and sm_80's one-stage d = 160 tiles stage their operands with STS)."""
    rows = [r for r in aot_records if r["kernel"] == "_colsum_kernel"]
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        hot = [loop["ops"] for loop in r["sass"]["loops"] if any(op.startswith("MUFU.EX2") for op in loop["ops"])]
        assert hot, f"{r['case']} {r['target']}: no exp2 loop found"
        for ops in hot:
            shuffles = sum(n for op, n in ops.items() if op.startswith("SHFL"))
            stores = sum(n for op, n in ops.items() if op.startswith("STS"))
            assert shuffles == 0, (r["case"], r["target"], ops)
            if r["target"] == "sm_90" and any(t in r["case"] for t in HALF_ATTENTION):
                assert stores == 0, (r["case"], r["target"], ops)


def _elements_per_thread(record) -> int:
    c = record["constants"]
    if "VEC" in c:  # contiguous NCHW: one aligned chunk of VEC elements per thread
        return c["VEC"]
    return c["BLOCK_X"] * c["BLOCK_J"] // (32 * record["num_warps"])


def test_blurs_use_16_byte_loads_on_sm90(aot_records):
    """The blur and degrade kernels' hot loop (the innermost loop with the most FMAs) reads the
    data with 16-byte loads (LDG.E.128) wherever the tile holds 16 bytes per thread, and never with
    1- or 2-byte gathers. (Tiles hold less where the layout or the grid is too narrow: 4 channels
    of 2 bytes channels-last, one 8-byte pixel; the 8×8 grids of the attention cases at d = 40
    and 80.)"""
    kernels = ("_blur_kernel", "_blur_nchw_kernel", "_degrade_kernel", "_degrade_nchw_kernel")
    rows = [r for r in aot_records if r["kernel"] in kernels and r["target"] == "sm_90"]
    wide = []
    for r in rows:
        loops = [loop["ops"] for loop in r["sass"]["loops"]]
        assert loops, r["case"]
        hot = max(loops, key=lambda ops: sum(n for op, n in ops.items() if op.startswith("FFMA")))
        narrow = [op for op in hot if op.startswith("LDG") and re.search(r"\.(U8|S8|U16|S16)\b", op)]
        assert not narrow, (r["case"], r["kernel"], hot)
        elem = 4 if re.search(r"fp32|float32", r["case"]) else 2
        if _elements_per_thread(r) * elem >= 16:
            wide.append(r)
            assert "LDG.E.128" in hot, (r["case"], r["kernel"], hot)
    assert {r["kernel"] for r in wide} == set(kernels)
    assert any(r["case"].endswith("bhnd-d40") for r in wide)


# --------------------------------------------------------------------------- nvcc lane


def _run_parallel(commands: list[list[str]], timeout: float = 900) -> list[subprocess.CompletedProcess]:
    """Run compiler commands concurrently (CI has two cores; nvcc spends much time in one thread)."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    results = []
    for command, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    return results


def _ptxas_records(report: str) -> list[dict]:
    """One record per (entry function, target) from ``-Xptxas -v`` output."""
    records, current = [], None
    for line in report.splitlines():
        match = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if match:
            current = {"kernel": match.group(1), "target": match.group(2)}
            records.append(current)
            continue
        if current is None:
            continue
        match = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if match:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, match.groups())
        match = re.search(r"Used (\d+) registers", line)
        if match:
            current["registers"] = int(match.group(1))
    return records


@pytest.fixture(scope="session")
def nvcc_report(tmp_path_factory):
    needs(shutil.which("nvcc") is not None, "nvcc is not on PATH")
    out = tmp_path_factory.mktemp("nvcc")
    sources = sorted((HERE / "nvcc").glob("*.cu"))
    assert sources, "tests/nvcc/ has no translation units"
    commands = []
    for source in sources:
        gencode = [arg for target in NVCC_TARGETS.values() for arg in ("-gencode", target)]
        commands.append(["nvcc", "-c", str(source), "-o", str(out / f"{source.stem}.o"), *NVCC_FLAGS, *gencode,
                         "--threads", "2", f"-I{CSRC / 'include'}", "-Xptxas", "-v"])
    results = _run_parallel(commands)
    report = {}
    for source, result in zip(sources, results):
        assert result.returncode == 0, f"{source.name}:\n{result.stderr[-6000:]}"
        expected = re.search(r"GK_EXPECTED_KERNELS = (\d+)", source.read_text())
        assert expected, f"{source.name} must state GK_EXPECTED_KERNELS"
        report[source.name] = (int(expected.group(1)), _ptxas_records(result.stderr + result.stdout))
    return report


@pytest.mark.nvcc
def test_nvcc_compiles_every_kernel_for_sm80_and_sm90a(nvcc_report):
    for name, (expected, records) in nvcc_report.items():
        for target in NVCC_TARGETS:
            kernels = {r["kernel"] for r in records if r["target"] == target}
            assert len(kernels) == expected, f"{name}: {len(kernels)} kernels for {target}, expected {expected}"


@pytest.mark.nvcc
def test_nvcc_kernels_do_not_spill(nvcc_report):
    bad = [f"{name} {r['kernel']} {r['target']}: registers={r.get('registers')} stack={r.get('stack')} "
           f"spills={r.get('spill_stores')}/{r.get('spill_loads')}"
           for name, (_, records) in nvcc_report.items() for r in records
           if r.get("stack", -1) != 0 or r.get("spill_stores", -1) != 0 or r.get("spill_loads", -1) != 0
           or not 0 < r.get("registers", 0) <= MAX_REGISTERS]
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------- launcher lane


@pytest.fixture(scope="session")
def launcher_objects(tmp_path_factory):
    include = os.environ.get("GK_TORCH_CUDA_INCLUDE", "")
    needs(bool(include), "GK_TORCH_CUDA_INCLUDE is not set (the torch/include dir of a CUDA build of torch)")
    include = Path(include)
    assert (include / "ATen" / "core" / "Tensor.h").is_file(), f"GK_TORCH_CUDA_INCLUDE={include}: no ATen headers"
    needs(shutil.which("nvcc") is not None, "nvcc is not on PATH")
    needs(shutil.which("g++") is not None, "g++ is not on PATH")
    out = tmp_path_factory.mktemp("launcher")
    common = [f"-I{include}", f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
              f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC / 'include'}", "-D_GLIBCXX_USE_CXX11_ABI=1",
              "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    commands, objects = [], []
    for source in sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp")):
        obj = out / f"{source.name}.o"
        objects.append(obj)
        if source.suffix == ".cu":
            commands.append(["nvcc", "-c", str(source), "-o", str(obj), *NVCC_FLAGS, "-gencode",
                             NVCC_TARGETS["sm_90a"], *common, "-Xcompiler", "-fPIC"])
        else:
            commands.append(["g++", "-c", str(source), "-o", str(obj), "-std=c++17", "-O3", "-fPIC", *common])
    results = _run_parallel(commands)
    failures = [f"{' '.join(r.args[:3])}:\n{r.stderr[-4000:]}" for r in results if r.returncode != 0]
    assert not failures, "\n\n".join(failures)
    return out, objects


@pytest.mark.nvcc
def test_launchers_compile_against_torch_cuda_headers(launcher_objects):
    _, objects = launcher_objects
    assert {o.name for o in objects} >= {"guidance_combine.cu.o", "_C.cpp.o"}
    assert all(o.is_file() and o.stat().st_size > 0 for o in objects)


@pytest.mark.nvcc
def test_launcher_objects_link_into_the_extension(launcher_objects):
    out, objects = launcher_objects
    library = out / "_C.so"
    proc = subprocess.run(["g++", "-shared", "-o", str(library), *map(str, objects)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    needs(shutil.which("nm") is not None, "nm is not on PATH")
    undefined = subprocess.run(["nm", "-C", "-u", str(library)], capture_output=True, text=True, check=True).stdout
    ours = [line for line in undefined.splitlines() if "guidance_kernels" in line]
    assert not ours, "symbols of the package left undefined:\n" + "\n".join(ours)
    exported = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True,
                              check=True).stdout
    assert re.search(r"\bPyInit__C\b", exported), "the module init function PyInit__C is not exported"
