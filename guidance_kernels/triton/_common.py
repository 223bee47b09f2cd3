"""Helpers every triton-backend module uses."""

from __future__ import annotations

import contextlib

import torch

from .._layout import device_constant

LOG2E = 1.4426950408889634  # softmax in the exp2 domain: scale · log2(e) folded into one multiply


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s device (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def index_tensor(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A cached int32 tensor of ``values`` on ``device`` (no host-to-device copy per call)."""
    return device_constant(tuple(values), device, torch.int32)
