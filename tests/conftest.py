"""Test lanes.

* reference / torch lane: always (CPU, and CUDA when present).
* interpreter lane: without a GPU, TRITON_INTERPRET=1 is set here — before anything imports
  triton — so the Triton launchers run on CPU tensors (forced backend "triton").
* GPU lane: every backend on CUDA tensors when a CUDA device is present (nothing to enable); there
  every test doing CUDA work is marked ``gpu``, so ``-m gpu`` selects the lane alone.
* AOT and nvcc lanes: subprocesses that compile every Triton kernel and CUDA source for
  sm_80/sm_90 without a GPU (tests/test_compile_lanes.py).

The fixture ``lane`` yields ``(backend, device)`` pairs usable on this machine.
"""

from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _lanes() -> list[tuple[str, str]]:
    lanes = [("torch", "cpu")]
    if HAS_TRITON and INTERPRETER:
        lanes.append(("triton", "cpu"))
    if HAS_CUDA:
        from guidance_kernels import _extension

        lanes.append(("torch", "cuda"))
        if HAS_TRITON and not INTERPRETER:
            lanes.append(("triton", "cuda"))
        if _extension.load() is not None:
            lanes.append(("cuda", "cuda"))
    return lanes


LANES = _lanes()


def lane_id(lane: tuple[str, str]) -> str:
    return f"{lane[0]}-{lane[1]}"


@pytest.fixture(params=LANES, ids=lane_id)
def lane(request):
    return request.param


def pytest_report_header(config):
    return [f"guidance_kernels lanes: {', '.join(lane_id(x) for x in LANES)}",
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')} cuda={HAS_CUDA}"]


def _names_cuda(const) -> bool:
    """``const`` is "cuda", or a folded tuple / a nested function or lambda holding it."""
    if isinstance(const, str):
        return const == "cuda"
    if isinstance(const, (tuple, frozenset)):
        return any(_names_cuda(c) for c in const)
    return hasattr(const, "co_consts") and any(_names_cuda(c) for c in const.co_consts)


def does_cuda_work(item) -> bool:
    """On a GPU machine: the test runs a CUDA lane (a lane parameter on device "cuda") or names the
    device in its body (loops over LANES, builds CUDA tensors)."""
    for value in getattr(getattr(item, "callspec", None), "params", {}).values():
        if isinstance(value, tuple) and len(value) >= 2 and value[1] == "cuda":
            return True
    function = getattr(item, "function", None)
    return function is not None and _names_cuda(function.__code__)


ONE_WORKER_MODULES = {"test_compile_lanes", "test_extension_build", "test_guidance_combine_host",
                      "test_fdg_combine_host", "test_sag_degrade_host", "test_comfyui", "test_gpu_kit",
                      "test_parallel"}


def pytest_collection_modifyitems(config, items):
    # ``-m gpu`` is the GPU lane: explicitly marked tests (skipped without a GPU) and, where a GPU is
    # present, every test that does CUDA work (the GPU run selects exactly these).
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        module = item.module.__name__ if item.module is not None else ""
        if module in ONE_WORKER_MODULES:
            # with pytest-xdist (--dist loadgroup): these modules build something expensive once
            # (compiled lanes, the extension, host emulators, ComfyUI models): one worker each.
            # NOTE: under pytest 9.2 + pytest-xdist 3.8 loadgroup does not group (even a static
            # xdist_group mark is spread over the workers), so each worker builds its own copy.
            item.add_marker(pytest.mark.xdist_group(module))
        if HAS_CUDA and does_cuda_work(item):
            item.add_marker(pytest.mark.gpu)
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
