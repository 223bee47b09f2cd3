"""How elementwise kernels address their inputs: (batch, inner) with at most three inner dims.

Kernels of the combine family see every input as ``B`` samples of ``inner`` elements. Each input
is addressed as ``b * batch_stride + i0 * s0 + i1 * s1 + i2 * s2`` where ``(i0, i1, i2)`` is the
row-major position of the inner linear index in ``sizes``; the output is contiguous. All inputs
of one launch share the strides (the branches of a stacked tensor always do; separate tensors
with different layouts are made contiguous first). Adjacent dims that are contiguous with each
other are merged, so ordinary tensors — contiguous, chunked from a stacked batch, sliced along
the batch — become rank 1 with stride 1, the fast path. Channels-last and permuted video
latents stay rank 2 or 3 without a copy; anything needing more than three dims is copied.

Offsets are int64 in every kernel: video latents exceed 2**31 elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch

MAX_RANK = 3


@dataclass(frozen=True)
class Plan:
    batch: int
    inner: int
    sizes: tuple[int, int, int]  # inner dims, innermost last, padded with leading 1s
    strides: tuple[int, int, int]  # matching element strides (shared by every input)
    batch_stride: int
    rank: int  # number of meaningful inner dims (1..3)
    tensors: tuple[torch.Tensor, ...]  # the inputs, some possibly made contiguous


def _coalesce(shape: tuple[int, ...], strides: tuple[int, ...]) -> list[tuple[int, int]]:
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    merged: list[tuple[int, int]] = []
    for n, s in dims:
        if merged and merged[-1][1] == s * n:
            merged[-1] = (merged[-1][0] * n, s)
        else:
            merged.append((n, s))
    return merged or [(1, 1)]


def _key(t: torch.Tensor) -> tuple[int, ...]:
    # Strides of size-1 dims are meaningless; ignore them when comparing layouts.
    return tuple(s if n != 1 else 0 for n, s in zip(t.shape, t.stride()))


def plan(tensors: list[torch.Tensor]) -> Plan:
    """Plan an elementwise launch over same-shaped ``(B, …)`` tensors."""
    tensors = list(tensors)
    if len({_key(t) for t in tensors}) > 1:
        tensors = [t.contiguous() for t in tensors]
        if len({_key(t) for t in tensors}) > 1:  # pragma: no cover - contiguous tensors agree
            raise AssertionError("layouts still differ after .contiguous()")
    first = tensors[0]
    batch = first.shape[0]
    inner = prod(first.shape[1:])
    dims = _coalesce(tuple(first.shape[1:]), tuple(first.stride()[1:]))
    if len(dims) > MAX_RANK:
        tensors = [t.contiguous() for t in tensors]
        first = tensors[0]
        dims = _coalesce(tuple(first.shape[1:]), tuple(first.stride()[1:]))
    rank = len(dims)
    dims = [(1, 0)] * (MAX_RANK - rank) + dims
    batch_stride = first.stride(0) if batch > 1 else 0
    return Plan(batch=batch, inner=inner, sizes=tuple(n for n, _ in dims), strides=tuple(s for _, s in dims),
                batch_stride=batch_stride, rank=rank, tensors=tuple(tensors))


def partitions(batch: int, inner: int, block: int, target_programs: int, max_partitions: int = 1024) -> tuple[int, int]:
    """Split each sample's ``inner`` elements into ``P`` chunks (multiples of ``block``) for the
    per-sample reduction passes. Returns ``(P, chunk)``; ``batch * P`` is about ``target_programs``."""
    tiles = max(1, -(-inner // block))
    wanted = max(1, -(-target_programs // max(batch, 1)))
    parts = max(1, min(tiles, wanted, max_partitions))
    chunk = -(-tiles // parts) * block
    parts = max(1, -(-inner // chunk))
    return parts, chunk


def target_programs(device: torch.device) -> int:
    """About four waves of programs on a GPU; a handful on CPU (interpreter/test runs)."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


_SM_COUNTS: dict[int, int] = {}


def _sm_count(index: int) -> int:
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]
