"""Triton kernels of gaussian_blur_2d: a fused separable Gaussian blur and the exact spatial mean.

The record is ``_library.GaussianBlur2dArgs``. Every layout is addressed as ``x[b, g, j, y, x]`` with five strides (:func:`geometry`): channel
``c = g·D + j`` split into a "group" g and an inner index j so that both NCHW (``G = C, D = 1``,
x contiguous) and token layouts (``(B, N, C)``: ``G = 1, D = C``; ``(B, heads, N, d)``:
``G = heads, D = d``; j contiguous) load contiguous vectors; token ``n`` sits at ``(n // W, n % W)``.

``_blur_kernel`` (σ finite) — ONE launch, both 1-D passes fused, no intermediate in memory. A
program owns an output tile of ``BLOCK_Y`` rows × ``BLOCK_X`` columns × ``BLOCK_J`` channels. It
walks the ``BLOCK_Y + 2·pad`` rows of the reflect-padded input that the tile needs; each padded
row ``p`` (source row ``reflect(p)``) is blurred horizontally once (k taps, reflected columns) and
added to every output row ``y`` of the tile with the vertical weight ``w[p − y + pad]`` (zero
outside the kernel). Walking padded rows (not source rows) is what makes reflection exact: a
source row reached twice near an edge contributes twice, as in the padded reference. Per output
element that is about ``k·(1 + 2·pad / BLOCK_Y)`` horizontal plus ``BLOCK_Y + 2·pad`` vertical
multiply-adds — ``BLOCK_Y ≈ k`` keeps both near ``2k`` — against ``k²`` for the reference's 2-D
kernel. Weights are the float32 ``_spec.gaussian_kernel_1d``; accumulation is float32.

σ = ∞ — TWO launches, no atomics (deterministic): ``_spatial_sum_kernel`` writes float32 partial
sums per (item, group, chunk of positions); ``_mean_fill_kernel`` adds a sample's partials,
divides by ``H·W`` and writes the mean to every position.

Reflect padding needs ``pad < H`` and ``pad < W`` (checked by the public function); then every
padded index maps into the grid with one reflection. All offsets are int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import _layout
from .._library import GaussianBlur2dArgs
from ._common import device_guard

NUM_WARPS = 4
MAX_TILE = 2048  # fp32 accumulator elements per program (16 registers per thread at 4 warps)
SUM_BLOCK_P = 64  # positions per tile in the mean kernels


@dataclass(frozen=True)
class Geometry:
    """``x[b, g, j, y, x]`` at ``b·sb + g·sg + j·sj + y·sy + x·sx``."""

    groups: int
    inner: int
    height: int
    width: int
    strides: tuple[int, int, int, int, int]  # sb, sg, sj, sy, sx


def geometry(t: torch.Tensor, layout: str, h: int, w: int) -> Geometry:
    s = t.stride()
    if layout == "nchw":
        return Geometry(t.shape[1], 1, h, w, (s[0], s[1], 0, s[2], s[3]))
    if layout == "bnc":
        return Geometry(1, t.shape[2], h, w, (s[0], 0, s[2], w * s[1], s[1]))
    if layout == "bhnd":
        return Geometry(t.shape[1], t.shape[3], h, w, (s[0], s[1], s[3], w * s[2], s[2]))
    raise ValueError(f"unknown layout {layout!r}")


# --------------------------------------------------------------------------- kernels


@triton.jit
def _reflect(i, n):
    """Index of padded position ``i`` (``−n < i < 2n − 1``) under reflect padding of a size-n axis."""
    i = tl.where(i < 0, -i, i)
    return tl.where(i > n - 1, 2 * (n - 1) - i, i)


@triton.jit
def _sample_base(x_ptr, items_ptr, bg, G, sxb, sxg, HAS_ITEMS: tl.constexpr):
    """(output slot, group, input pointer) of program group ``bg = slot·G + g``: the slot's own
    sample, or ``items[slot]`` when only chosen samples are read."""
    slot = bg // G
    g = bg % G
    if HAS_ITEMS:
        b = tl.load(items_ptr + slot)
    else:
        b = slot
    return slot, g, x_ptr + b.to(tl.int64) * sxb + g.to(tl.int64) * sxg


@triton.jit
def _blur_kernel(out_ptr, x_ptr, w_ptr, items_ptr, G, D, H, W, pad, ksize, rows, tiles_x, tiles_j, tiles_y,
                 sxb, sxg, sxj, sxy, sxx, sob, sog, soj, soy, sox,
                 HAS_ITEMS: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_J: tl.constexpr):
    pid = tl.program_id(0)
    tx = pid % tiles_x
    rest = pid // tiles_x
    tj = rest % tiles_j
    rest = rest // tiles_j
    ty = rest % tiles_y
    bg = rest // tiles_y
    slot, g, x_base = _sample_base(x_ptr, items_ptr, bg, G, sxb, sxg, HAS_ITEMS)
    o_base = out_ptr + slot.to(tl.int64) * sob + g.to(tl.int64) * sog
    offs_y = ty * BLOCK_Y + tl.arange(0, BLOCK_Y)
    offs_x = tx * BLOCK_X + tl.arange(0, BLOCK_X)
    offs_j = tj * BLOCK_J + tl.arange(0, BLOCK_J)
    # Every block is 3-D (row, column, channel) in one layout: a source row is a [1, X, J] block
    # broadcast over the output rows, so the loops convert no layouts (a [X, J] row converted to
    # the accumulator's layout every trip made ptxas keep a stack frame on sm_90, Triton 3.6).
    col_mask = (offs_x < W)[None, :, None] & (offs_j < D)[None, None, :]
    j_off = offs_j.to(tl.int64)[None, None, :] * sxj
    acc = tl.zeros([BLOCK_Y, BLOCK_X, BLOCK_J], dtype=tl.float32)
    y0 = ty * BLOCK_Y
    # `rows` = BLOCK_Y + 2·pad is a plain integer trip count (Triton 3.6 interpreter friendly).
    for r in range(0, rows):
        p = y0 - pad + r  # padded row; p >= -pad always, rows past H - 1 + pad feed no output row
        # (a block comparison, not `col_mask & scalar`: Triton 3.9's interpreter rejects that mask)
        row_mask = col_mask & ((offs_x * 0 + p) < H + pad)[None, :, None]
        row_base = x_base + _reflect(p, H).to(tl.int64) * sxy
        hrow = tl.zeros([1, BLOCK_X, BLOCK_J], dtype=tl.float32)
        for t in range(0, ksize):
            col = _reflect(offs_x + (t - pad), W)
            val = tl.load(row_base + col.to(tl.int64)[None, :, None] * sxx + j_off, mask=row_mask, other=0.0)
            hrow += tl.load(w_ptr + t) * val.to(tl.float32)
        dy = p - offs_y
        in_kernel = (dy >= -pad) & (dy <= pad)
        wy = tl.load(w_ptr + pad + dy, mask=in_kernel, other=0.0)
        # rows outside an output row's kernel add nothing (not 0·x: an inf there would give NaN)
        acc += tl.where(in_kernel[:, None, None], wy[:, None, None] * hrow, 0.0)
    o_ptrs = (o_base + offs_y.to(tl.int64)[:, None, None] * soy + offs_x.to(tl.int64)[None, :, None] * sox
              + offs_j.to(tl.int64)[None, None, :] * soj)
    o_mask = (offs_y < H)[:, None, None] & col_mask
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _spatial_sum_kernel(psum_ptr, x_ptr, items_ptr, G, D, W, n_pos, chunk, chunk_tiles, parts, tiles_j,
                        sxb, sxg, sxj, sxy, sxx,
                        HAS_ITEMS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr):
    """psum[(slot·G + g)·parts + part, j] = Σ over this part's positions of x[b, g, j, ·] (fp32)."""
    pid = tl.program_id(0)
    tj = pid % tiles_j
    rest = pid // tiles_j
    part = rest % parts
    bg = rest // parts
    _, _, base = _sample_base(x_ptr, items_ptr, bg, G, sxb, sxg, HAS_ITEMS)
    offs_j = tj * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = offs_j < D
    j_off = offs_j.to(tl.int64)[None, :] * sxj
    lo = part * chunk
    hi = tl.minimum(lo + chunk, n_pos)
    acc = tl.zeros([BLOCK_J], dtype=tl.float32)
    for t in range(0, chunk_tiles):
        pos = lo + t * BLOCK_P + tl.arange(0, BLOCK_P)
        off = (pos // W).to(tl.int64) * sxy + (pos % W).to(tl.int64) * sxx
        val = tl.load(base + off[:, None] + j_off, mask=(pos < hi)[:, None] & j_ok[None, :], other=0.0)
        acc += tl.sum(val.to(tl.float32), axis=0)
    tl.store(psum_ptr + (bg.to(tl.int64) * parts + part) * D + offs_j, acc, mask=j_ok)


@triton.jit
def _mean_fill_kernel(out_ptr, psum_ptr, G, D, W, n_pos, parts, tiles_p, tiles_j,
                      sob, sog, soj, soy, sox,
                      PARTS_P: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr):
    pid = tl.program_id(0)
    tp = pid % tiles_p
    rest = pid // tiles_p
    tj = rest % tiles_j
    bg = rest // tiles_j
    slot = bg // G
    g = bg % G
    offs_j = tj * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = offs_j < D
    offs_s = tl.arange(0, PARTS_P)
    sums = tl.load(psum_ptr + (bg.to(tl.int64) * parts + offs_s[:, None]) * D + offs_j[None, :],
                   mask=(offs_s < parts)[:, None] & j_ok[None, :], other=0.0)
    mean = tl.sum(sums, axis=0) / n_pos
    pos = tp * BLOCK_P + tl.arange(0, BLOCK_P)
    off = (pos // W).to(tl.int64) * soy + (pos % W).to(tl.int64) * sox
    o_base = out_ptr + slot.to(tl.int64) * sob + g.to(tl.int64) * sog
    o_ptrs = o_base + off[:, None] + offs_j.to(tl.int64)[None, :] * soj
    vals = tl.zeros([BLOCK_P, BLOCK_J], dtype=tl.float32) + mean[None, :]
    tl.store(o_ptrs, vals.to(out_ptr.dtype.element_ty), mask=(pos < n_pos)[:, None] & j_ok[None, :])


# --------------------------------------------------------------------------- launchers


def blur_blocks(kernel_size: int, geo: Geometry) -> tuple[int, int, int]:
    """(BLOCK_Y, BLOCK_X, BLOCK_J): channel vectors up to 64 wide, BLOCK_Y ≈ k (see the module
    docstring), the fp32 accumulator at most MAX_TILE elements."""
    block_j = min(triton.next_power_of_2(geo.inner), 64)
    block_x = min(triton.next_power_of_2(geo.width), max(1, 512 // block_j))
    block_y = min(triton.next_power_of_2(geo.height), max(2, min(32, triton.next_power_of_2(kernel_size))))
    while block_y * block_x * block_j > MAX_TILE and block_x > 1:
        block_x //= 2
    while block_y * block_x * block_j > MAX_TILE and block_y > 1:
        block_y //= 2
    return block_y, block_x, block_j


def blur_into(out: torch.Tensor, out_geo: Geometry, x: torch.Tensor, geo: Geometry, kernel_size: int, sigma: float,
              items: torch.Tensor | None, slots: int) -> None:
    """Blur ``slots`` samples of ``x`` (sample ``items[i]``, or ``i``) into sample ``i`` of ``out``."""
    if kernel_size < 1 or kernel_size % 2 == 0 or kernel_size // 2 >= min(geo.height, geo.width):
        # the public function never passes these; the raw op must not read outside the grid either
        raise ValueError(f"gaussian_blur_2d: kernel_size: {kernel_size} is not an odd size whose reflect "
                         f"padding fits the grid {(geo.height, geo.width)}")
    w = _layout.blur_taps_like(x, kernel_size, sigma, torch.float32)  # zero-weight taps dropped
    kernel_size = w.numel()
    pad = kernel_size // 2
    block_y, block_x, block_j = blur_blocks(kernel_size, geo)
    tiles_x = triton.cdiv(geo.width, block_x)
    tiles_j = triton.cdiv(geo.inner, block_j)
    tiles_y = triton.cdiv(geo.height, block_y)
    grid = (slots * geo.groups * tiles_y * tiles_j * tiles_x,)
    with device_guard(x):
        _blur_kernel[grid](out, x, w, items if items is not None else w, geo.groups, geo.inner, geo.height, geo.width,
                           pad, kernel_size, block_y + 2 * pad, tiles_x, tiles_j, tiles_y, *geo.strides,
                           *out_geo.strides, HAS_ITEMS=items is not None, BLOCK_Y=block_y, BLOCK_X=block_x,
                           BLOCK_J=block_j, num_warps=NUM_WARPS)


def spatial_sums(x: torch.Tensor, geo: Geometry, items: torch.Tensor | None, slots: int,
                 target_programs: int) -> tuple[torch.Tensor, int]:
    """Float32 partial sums ``(slots·G, parts, D)`` over chunks of the ``H·W`` positions."""
    n_pos = geo.height * geo.width
    block_j = min(triton.next_power_of_2(geo.inner), 64)
    tiles_j = triton.cdiv(geo.inner, block_j)
    parts, chunk = _layout.partitions(slots * geo.groups * tiles_j, n_pos, SUM_BLOCK_P, target_programs,
                                      max_partitions=64)
    psum = torch.empty((slots * geo.groups, parts, geo.inner), dtype=torch.float32, device=x.device)
    with device_guard(x):
        _spatial_sum_kernel[(slots * geo.groups * parts * tiles_j,)](
            psum, x, items if items is not None else psum, geo.groups, geo.inner, geo.width, n_pos, chunk,
            chunk // SUM_BLOCK_P, parts, tiles_j, *geo.strides, HAS_ITEMS=items is not None, BLOCK_P=SUM_BLOCK_P,
            BLOCK_J=block_j, num_warps=NUM_WARPS)
    return psum, parts


def mean_into(out: torch.Tensor, out_geo: Geometry, x: torch.Tensor, geo: Geometry, batch: int) -> None:
    psum, parts = spatial_sums(x, geo, None, batch, _layout.target_programs(x.device))
    n_pos = geo.height * geo.width
    block_j = min(triton.next_power_of_2(geo.inner), 64)
    block_p = max(1, min(SUM_BLOCK_P, MAX_TILE // block_j))
    tiles_j = triton.cdiv(geo.inner, block_j)
    tiles_p = triton.cdiv(n_pos, block_p)
    with device_guard(x):
        _mean_fill_kernel[(batch * geo.groups * tiles_j * tiles_p,)](
            out, psum, geo.groups, geo.inner, geo.width, n_pos, parts, tiles_p, tiles_j, *out_geo.strides,
            PARTS_P=triton.next_power_of_2(parts), BLOCK_P=block_p, BLOCK_J=block_j, num_warps=NUM_WARPS)


def gaussian_blur_2d(a: GaussianBlur2dArgs):
    x = a.x
    out = _layout.output_like(x)
    if out.numel() == 0:
        return out
    geo = geometry(x, a.layout, a.grid_h, a.grid_w)
    out_geo = geometry(out, a.layout, a.grid_h, a.grid_w)
    if a.kernel_size == 0:
        mean_into(out, out_geo, x, geo, x.shape[0])
    else:
        blur_into(out, out_geo, x, geo, a.kernel_size, a.sigma, None, x.shape[0])
    return out
