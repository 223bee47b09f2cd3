"""The GPU run kit (benchmarks/gpu_kit.py) rehearsed on the CPU, so a broken kit fails CI instead of
wasting GPU time: its phases, budgets, results folder and summary (``--dry-run``), the wheel install
of the diffusers command, and preflight's one-line stop when the GPU, nvcc or a wheel is missing.

Like the GPU machine, every run here has diffusers unimportable (scripts/hide_modules) and works on a
copy of the tree without ``.git``. It needs the GPU image's kind of torch — a CUDA build — which
scripts/test.sh's second run (torch 2.11 + Triton 3.6, the image's versions) has.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
rehearsal = pytest.mark.skipif(torch.version.cuda is None, reason="the rehearsal needs a CUDA build of torch, as on "
                               "the GPU image (scripts/test.sh's torch 2.11 run has one)")


@pytest.fixture(scope="session")
def tree(tmp_path_factory) -> Path:
    """The tree as the GPU machine receives it: the sources, no .git, no environments or outputs."""
    dest = tmp_path_factory.mktemp("kit") / "tree"
    skip = shutil.ignore_patterns(".git", ".venv*", ".ci-cache", ".whl", "build", "bench-out", "gpu-kit-out",
                                  "__pycache__", ".pytest_cache", ".hypothesis", "*.so", "*.egg-info")
    shutil.copytree(ROOT, dest, ignore=skip)
    return dest


def _kit(tree: Path, *args: str, env: dict | None = None, timeout: float = 300) -> tuple[subprocess.CompletedProcess,
                                                                                          float]:
    base = dict(os.environ, GK_HIDE_MODULES="diffusers", GK_COMMIT="abc1234")
    base["PYTHONPATH"] = os.pathsep.join([str(tree / "scripts" / "hide_modules")]
                                         + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    base.pop("OUT", None)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(tree / "benchmarks" / "gpu_kit.py"), *args], capture_output=True,
                          text=True, cwd=tree, env={**base, **(env or {})}, timeout=timeout)
    return proc, time.monotonic() - start


def _assert_no_traceback(proc):
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]


def _results(out: Path) -> list[str]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_kit
    finally:
        sys.path.pop(0)
    assert gpu_kit.check_results(out) == []
    return sorted(p.name for p in out.iterdir())


@rehearsal
def test_dry_run_rehearses_every_phase(tree, tmp_path):
    out = tmp_path / "out"
    proc, _ = _kit(tree, "--dry-run", "--out", str(out), "--bench-ops", "apg_combine",
                         "--tests-marker", "not gpu",
                         "--pytest-args", "tests/test_cli.py -k 'rejects_unknown_ops or goal_limits'")
    _assert_no_traceback(proc)
    assert proc.returncode == 0, proc.stdout[-4000:]
    lines = proc.stdout.splitlines()
    for phase in ("preflight", "build", "tests", "bench", "sanitizer"):
        assert re.search(rf"^\[kit\] phase {phase}: budget \d+ s$", proc.stdout, re.M), phase
        assert re.search(rf"^\[kit\] phase {phase}: ok.* in [\d.]+ s$", proc.stdout, re.M), phase
    summary = lines[lines.index("[kit] ==== summary: main command, dry run ===="):]
    assert re.match(r"\[kit\] phases: preflight ok \d+s/\d+s \| build ok .* \| sanitizer ok \d+s/\d+s \| total \d+ s",
                    summary[1]), summary[1]
    assert any(re.match(r"\[kit\] tests \(-m not gpu\): [1-9]\d* passed, 0 failed, 0 errors", x) for x in summary)
    assert any(x.startswith("[kit] bench: ") and "(0 errors)" in x for x in summary), summary
    assert any(x.startswith("n/a     apg_combine | tiny 2x3x5x7 apg | >= 6.0x") for x in summary), summary
    assert "commit abc1234" in proc.stdout
    files = _results(out)
    assert {"summary.txt", "logs.tar.gz", "bench-cpu.json", "bench-cpu.md"} <= set(files) and len(files) <= 7
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = {Path(n).name for n in tar.getnames()}
    assert {"preflight.json", "build.log", "tests.log", "tests.xml", "bench.log", "sanitizer.log",
            "summary.txt"} <= logs
    payload = json.loads((out / "bench-cpu.json").read_text())
    assert payload["environment"]["commit"] == "abc1234" and payload["results"]
    assert (out / "summary.txt").read_text().splitlines() == summary[:len((out / "summary.txt").read_text()
                                                                           .splitlines())]


@rehearsal
def test_a_phase_over_its_budget_is_stopped_and_reported(tree, tmp_path):
    """The tests phase gets 4 s for the whole suite: it is stopped (SIGINT, pytest still reports), the
    kit says TIMEOUT and still writes its summary and folder."""
    out = tmp_path / "out"
    proc, _ = _kit(tree, "--dry-run", "--out", str(out), "--phases", "tests", "--phase-budget", "tests=4")
    _assert_no_traceback(proc)
    assert proc.returncode == 1
    assert re.search(r"^\[kit\] phase tests: TIMEOUT in ([\d.]+) s$", proc.stdout, re.M), proc.stdout[-2000:]
    took = float(re.search(r"phase tests: TIMEOUT in ([\d.]+) s", proc.stdout).group(1))
    assert 4 <= took < 4 + 16, took  # SIGINT at 4 s, SIGKILL 15 s later at the latest
    assert "[kit] phases: preflight ok" in proc.stdout and "tests TIMEOUT" in proc.stdout
    assert {"summary.txt", "logs.tar.gz"} <= set(_results(out))


def _wheel(folder: Path, dist: str, module: str) -> Path:
    """A minimal pure-Python wheel, as pip download would save one."""
    folder.mkdir(parents=True, exist_ok=True)
    name = dist.replace("-", "_")
    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{module}/__init__.py", "VALUE = 42\n")
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    return path


@rehearsal
def test_diffusers_command_installs_the_carried_wheels_into_a_target_folder(tree, tmp_path):
    out, wheels = tmp_path / "out", tmp_path / "whl"
    _wheel(wheels, "gk-kit-probe", "gk_kit_probe")
    proc, _ = _kit(tree, "diffusers", "--dry-run", "--out", str(out), "--wheels", str(wheels), "--require",
                   "gk-kit-probe", "--module", "gk-kit-probe=gk_kit_probe")
    _assert_no_traceback(proc)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert re.search(r"^\[kit\] wheel gk-kit-probe: import gk_kit_probe -> .*/site/gk_kit_probe/__init__\.py$",
                     proc.stdout, re.M), proc.stdout[-3000:]
    # diffusers itself is hidden here, as on the GPU image without its wheel: the family is skipped
    assert "[kit] skipped diffusers: needs diffusers" in proc.stdout
    files = _results(out)
    assert {"summary-diffusers.txt", "logs-diffusers.tar.gz", "bench-cpu-diffusers.json",
            "bench-cpu-diffusers.md"} <= set(files)
    if importlib.util.find_spec("matplotlib") is not None:
        assert "bench-cpu-diffusers.png" in files  # the skipped family's panel says why


def _one_stop_line(proc, seconds: float) -> str:
    _assert_no_traceback(proc)
    assert proc.returncode == 2, proc.stdout[-3000:]
    stops = [line for line in proc.stdout.splitlines() if line.startswith("[kit] STOP at preflight: ")]
    assert len(stops) == 1, proc.stdout
    assert seconds < 120
    return stops[0]


@rehearsal
def test_no_gpu_stops_at_preflight_with_one_line(tree, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc, seconds = _kit(tree, "--out", str(tmp_path / "out"))
    assert "no GPU" in _one_stop_line(proc, seconds) and "--dry-run" in proc.stdout
    assert "STOPPED at preflight: no GPU" in (tmp_path / "out" / "summary.txt").read_text()


@rehearsal
def test_no_nvcc_stops_at_preflight_with_one_line(tree, tmp_path):
    empty = tmp_path / "no-cuda"
    empty.mkdir()
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "nvcc").exists())
    proc, seconds = _kit(tree, "--dry-run", "--out", str(tmp_path / "out"), env={"PATH": path,
                                                                                 "CUDA_HOME": str(empty)})
    assert "nvcc not found" in _one_stop_line(proc, seconds)


@rehearsal
def test_missing_wheel_stops_at_preflight_with_one_line(tree, tmp_path):
    wheels = tmp_path / "whl"
    _wheel(wheels, "something-else", "something_else")
    proc, seconds = _kit(tree, "diffusers", "--dry-run", "--out", str(tmp_path / "out"), "--wheels", str(wheels))
    line = _one_stop_line(proc, seconds)
    assert "no wheel for diffusers" in line and "benchmarks/README.md" in line


def test_results_folder_limits(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_kit
    finally:
        sys.path.pop(0)
    for i in range(8):
        (tmp_path / f"f{i}.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    with open(tmp_path / "big.bin", "wb") as fh:
        fh.truncate(17 * 2**20)
    problems = "\n".join(gpu_kit.check_results(tmp_path))
    assert "11 files (at most 7)" in problems and "bad name.txt: a name outside" in problems
    assert "deep.txt: more than 2 folders deep" in problems and "big.bin: 17.0 MiB" in problems


def test_conftest_marks_cuda_work_for_the_gpu_lane():
    """What ``pytest -m gpu`` selects on a GPU machine: CUDA lane parameters, or "cuda" in the test body."""
    from types import SimpleNamespace

    import conftest

    def item(params=None, function=None):
        return SimpleNamespace(callspec=SimpleNamespace(params=params) if params is not None else None,
                               function=function)

    def on_cuda():
        return [torch.zeros(1, device=d) for d in ("cuda",)]

    def on_cpu():
        return torch.zeros(1, device="cpu")

    assert conftest.does_cuda_work(item({"lane": ("triton", "cuda")}, on_cpu))
    assert conftest.does_cuda_work(item({"lane": ("triton", "cuda", "fused"), "dtype": torch.float16}, on_cpu))
    assert not conftest.does_cuda_work(item({"lane": ("triton", "cpu")}, on_cpu))
    assert conftest.does_cuda_work(item(None, on_cuda))  # "cuda" inside a comprehension of the body
    assert not conftest.does_cuda_work(item(None, on_cpu))
