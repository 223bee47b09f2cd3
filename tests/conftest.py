"""Test lanes.

* reference / torch lane: always (CPU, and CUDA when present).
* interpreter lane: without a GPU, TRITON_INTERPRET=1 is set here — before anything imports
  triton — so the Triton launchers run on CPU tensors (forced backend "triton").
* GPU lane: every backend on CUDA tensors when a CUDA device is present (nothing to enable).
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


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
