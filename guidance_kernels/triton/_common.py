"""Helpers every triton-backend module uses."""

from __future__ import annotations

import contextlib
import functools

import torch

from .._layout import device_constant

LOG2E = 1.4426950408889634  # softmax in the exp2 domain: scale · log2(e) folded into one multiply


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s device (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# The GPU generation CPU tensors tile for (the interpreter runs Hopper's tiles); the AOT compile
# lane (tests/triton_aot.py) sets it to each target it compiles for.
CPU_CAPABILITY = (9, 0)


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def capability(t: torch.Tensor) -> tuple[int, int]:
    """(major, minor) compute capability of ``t``'s GPU; :data:`CPU_CAPABILITY` for CPU tensors."""
    if t.is_cuda:
        return _cuda_capability(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return CPU_CAPABILITY


def index_tensor(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A cached int32 tensor of ``values`` on ``device`` (no host-to-device copy per call)."""
    return device_constant(tuple(values), device, torch.int32)
