"""How elementwise kernels address their inputs: (batch, inner) with at most three inner dims.

Kernels of the combine family see every input as ``B`` samples of ``inner`` elements. The output
(:func:`output_like`) has the branches' own dense layout when they have one with the batch
outermost (contiguous, channels-last, …) and is contiguous otherwise — the rule torch's
elementwise ops follow — so a kernel walks each sample's output in memory order: ``idx`` in
``[0, inner)`` is written at ``out + b * inner + idx``. Inputs are addressed as
``b * batch_stride + i0 * s0 + i1 * s1 + i2 * s2`` where ``(i0, i1, i2)`` is the position of
``idx`` in ``sizes`` (the inner dims in the output's memory order). All inputs of one launch
share strides (the branches of a stacked tensor always do; separate tensors with different
layouts are first copied into the output's layout). Dims that are contiguous with each other in
every tensor are merged, so chunked, sliced-batch and channels-last inputs all become rank 1
with stride 1: the vectorised fast path. Anything needing more than three dims is copied into
the output's layout (rare: a view strided in four independent dims).

Offsets are int64 in every kernel: video latents exceed 2**31 elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import prod

import torch

from . import _spec

MAX_RANK = 3


def output_strides(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, ...]:
    """Strides of the (B, …) output for inputs of this shape and layout: the inputs' own strides
    when they are dense (no gaps, no overlap; contiguous, channels-last, a batch slice of a dense
    stack, …) with the batch outermost, otherwise contiguous. A pure function of the layout, used
    by the fakes and every backend, so fake and real strides always agree."""
    contiguous = []
    running = 1
    for n in reversed(shape):
        contiguous.append(running)
        running *= n
    contiguous = tuple(reversed(contiguous))
    dims = sorted(((s, n) for n, s in zip(shape, strides) if n != 1), reverse=True)
    expected = 1
    for s, n in reversed(dims):
        if s != expected:
            return contiguous
        expected *= n
    if len(shape) > 1 and shape[0] > 1 and strides[0] != prod(shape[1:]):
        return contiguous  # batch not outermost: each sample must be one block
    return tuple(s if n != 1 else c for n, s, c in zip(shape, strides, contiguous))


# Memoised for concrete shapes (every eager call's path); symbolic ones (tracing) are unhashable.
_output_strides_cached = lru_cache(maxsize=1024)(output_strides)


def _strides_for(shape: tuple, strides: tuple) -> tuple:
    if all(type(n) is int for n in shape) and all(type(s) is int for s in strides):
        return _output_strides_cached(shape, strides)
    return output_strides(shape, strides)


def output_like(branch: torch.Tensor) -> torch.Tensor:
    """An uninitialised output buffer for inputs shaped and laid out like ``branch``."""
    return torch.empty_strided(branch.shape, _strides_for(tuple(branch.shape), tuple(branch.stride())),
                               dtype=branch.dtype, device=branch.device)


@dataclass(frozen=True)
class Plan:
    batch: int
    inner: int
    sizes: tuple[int, int, int]  # inner dims in the output's memory order, padded with leading 1s
    strides: tuple[int, int, int]  # matching input element strides (shared by every input)
    batch_stride: int
    rank: int  # number of meaningful inner dims (1..3)
    tensors: tuple[torch.Tensor, ...]  # the inputs, some possibly made contiguous


def layout_key(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, ...]:
    """Strides with those of size-1 dims (meaningless) zeroed, for comparing layouts."""
    return tuple(s if n != 1 else 0 for n, s in zip(shape, strides))


def _key(t: torch.Tensor) -> tuple[int, ...]:
    return layout_key(tuple(t.shape), tuple(t.stride()))


def _coalesce(shape: list[int], input_strides: list[int], out_strides: list[int]) -> list[tuple[int, int]]:
    """Merge adjacent (outer, inner) dims that are contiguous with each other in the input AND the
    output; drop size-1 dims. Returns (size, input stride) pairs, outermost first."""
    merged: list[list[int]] = []
    for n, s, o in zip(shape, input_strides, out_strides):
        if n == 1:
            continue
        if merged and merged[-1][1] == s * n and merged[-1][2] == o * n:
            merged[-1] = [merged[-1][0] * n, s, o]
        else:
            merged.append([n, s, o])
    return [(n, s) for n, s, _ in merged] or [(1, 1)]


def _in_layout_of(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it is laid out like ``out``, else a copy that is (then every dim merges)."""
    if _key(t)[1:] == _key(out)[1:] and (t.shape[0] <= 1 or t.stride(0) == out.stride(0)):
        return t
    return torch.empty_like(out).copy_(t)


def plan(tensors: list[torch.Tensor], out: torch.Tensor) -> Plan:
    """Plan an elementwise launch over same-shaped ``(B, …)`` inputs writing ``out`` (from
    :func:`output_like`)."""
    tensors = list(tensors)
    if len({_key(t) for t in tensors}) > 1:
        tensors = [_in_layout_of(t, out) for t in tensors]
    batch = out.shape[0]
    inner = prod(out.shape[1:])
    ndim = out.dim() - 1
    # Inner dims ordered as the output lies in memory (outermost first).
    order = sorted(range(ndim), key=lambda i: -out.stride(i + 1))
    shape = [out.shape[i + 1] for i in order]
    dims = _coalesce(shape, [tensors[0].stride(i + 1) for i in order], [out.stride(i + 1) for i in order])
    if len(dims) > MAX_RANK:
        tensors = [_in_layout_of(t, out) for t in tensors]
        dims = _coalesce(shape, [tensors[0].stride(i + 1) for i in order], [out.stride(i + 1) for i in order])
    rank = len(dims)
    dims = [(1, 0)] * (MAX_RANK - rank) + dims
    batch_stride = tensors[0].stride(0) if batch > 1 else 0
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


# --------------------------------------------------------------------------- channel-wise launches (CFG-Norm, Mahiro)


def channel_geometry(shape: tuple[int, ...], strides: tuple[int, ...],
                     out_strides: tuple[int, ...]) -> tuple[int, ...] | None:
    """How the channel-wise kernels address ``(B, C, *S)`` tensors: element ``(b, c, p)`` with ``p``
    a position over the spatial dims ``S`` in the output's memory order, ``p = i1·P2 + i2``, is read
    at ``b·bs + c·cs + i1·s1 + i2·s2`` and written at ``b·inner + c·ocs + i1·o1 + i2·o2`` (the
    output is dense, batch outermost). Spatial dims contiguous with each other in the inputs and
    the output are merged; returns ``(C, P1, P2, bs, cs, s1, s2, ocs, o1, o2)``, or None when more
    than two spatial runs remain (the caller then copies the inputs into the output's layout, in
    which the channel dim splits the spatial dims into at most two runs)."""
    runs: list[list[int]] = []
    for d in sorted(range(2, len(shape)), key=lambda d: -out_strides[d]):
        n = shape[d]
        if n == 1:
            continue
        if runs and runs[-1][1] == strides[d] * n and runs[-1][2] == out_strides[d] * n:
            runs[-1] = [runs[-1][0] * n, strides[d], out_strides[d]]
        else:
            runs.append([n, strides[d], out_strides[d]])
    if len(runs) > 2:
        return None
    runs = [[1, 0, 0]] * (2 - len(runs)) + runs
    channels = shape[1] if len(shape) > 1 else 1
    cs, ocs = (strides[1], out_strides[1]) if channels > 1 else (0, 0)
    bs = strides[0] if shape[0] > 1 else 0
    (p1, s1, o1), (p2, s2, o2) = runs
    return channels, p1, p2, bs, cs, s1, s2, ocs, o1, o2


def channel_plan(branches: list[torch.Tensor], out: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
    """The inputs of a channel-wise launch writing ``out`` (from :func:`output_like`), sharing one
    layout (copied into the output's when they differ or need more than two spatial runs), and
    their :func:`channel_geometry`."""
    xs = plan(branches, out).tensors
    geo = channel_geometry(tuple(out.shape), tuple(xs[0].stride()), tuple(out.stride()))
    if geo is None:
        xs = tuple(torch.empty_like(out).copy_(x) for x in xs)
        geo = channel_geometry(tuple(out.shape), tuple(xs[0].stride()), tuple(out.stride()))
    return xs, geo


def image_view(t: torch.Tensor) -> torch.Tensor:
    """``(B, …, H, W)`` as ``(B, C', H, W)`` (the middle dims as one channel dim, as fdg_combine's
    kernels address it): a view when those dims merge, else a contiguous copy."""
    shape = (t.shape[0], -1, *t.shape[-2:])
    try:
        return t.view(shape)
    except RuntimeError:
        return t.contiguous().view(shape)


# --------------------------------------------------------------------------- branches and batch items


def split_branches(preds: list[torch.Tensor], num_branches: int) -> list[torch.Tensor]:
    """Views of the K branches, each (B, …), without copying."""
    if len(preds) == num_branches:
        return list(preds)
    (stacked,) = preds
    parts = stacked.chunk(num_branches)  # one dispatch; the same views as unflatten + unbind
    if len(parts) == num_branches:
        return list(parts)
    return list(stacked.unflatten(0, (num_branches, -1)).unbind(0))


# Shared by the torch backend and the triton_sdpa route of guided_attention.


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """torch's ``scaled_dot_product_attention`` (its fastest kernel) with the non-finite rule of the
    definition ``softmax(scale·q kᵀ) v``. torch's fused kernels treat a row whose every logit is
    NaN or −inf as fully masked and return 0; the definition gives NaN there. Such rows are exactly
    those whose query holds a NaN or inf, and every row when every key holds one (a finite query
    then meets ±inf or NaN in every logit); elsewhere the max logit is finite and torch propagates
    NaN/inf as the definition does. One extra read of q and k."""
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    dead = ~torch.isfinite(q).all(dim=-1, keepdim=True)
    dead = dead | (~torch.isfinite(k).all(dim=-1)).all(dim=-1)[..., None, None]
    return out.masked_fill(dead, float("nan"))


def take_items(t: torch.Tensor, items: list[int]) -> torch.Tensor:
    """``t[items]``: a view when the items are a contiguous range (the usual [u, c | p] batch),
    else a device-side gather of slices (indexing with a Python list would copy an index tensor
    from the host on every call, which CUDA-graph capture forbids)."""
    if items == list(range(items[0], items[0] + len(items))):
        return t[items[0]:items[0] + len(items)]
    return torch.cat([t[i:i + 1] for i in items])


def put_items(out: torch.Tensor, items: list[int], rows: slice, result: torch.Tensor) -> None:
    """``out[items, :, rows] = result``: one copy for a contiguous range of items."""
    if items == list(range(items[0], items[0] + len(items))):
        out[items[0]:items[0] + len(items), :, rows].copy_(result)
        return
    for j, i in enumerate(items):
        out[i, :, rows].copy_(result[j])


# --------------------------------------------------------------------------- small device constants
# Weights and index lists the kernels read, cached per device: no host-to-device copy per call
# (which would also break CUDA-graph capture after the first call).


@lru_cache(maxsize=256)
def device_constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A cached tensor of ``values`` on ``device``."""
    return torch.tensor(values, dtype=dtype, device=device)


def blur_taps_like(like: torch.Tensor, kernel_size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    """The float32 Gaussian taps of ``_spec.blur_taps`` on ``like``'s device, in ``dtype`` (their
    length is the blur's effective size). Real tensors use the cache; fake ones (an autograd
    formula traced by torch.compile, possibly wrapped by torch.func) build them in the tracing
    mode, which must never be cached."""
    from torch._subclasses.fake_tensor import is_fake

    taps = _spec.blur_taps(kernel_size, sigma)
    if is_fake(like):
        return torch.tensor(taps, dtype=torch.float32, device=like.device).to(dtype)
    return device_constant(taps, like.device, dtype)


def map_for_kernel(mask_map: torch.Tensor) -> torch.Tensor:
    """A ``(B|1, h, w)`` map the kernels can load: bool viewed as uint8 (no copy)."""
    return mask_map.view(torch.uint8) if mask_map.dtype == torch.bool else mask_map
