"""Triton kernels of gaussian_blur_2d: a separable Gaussian blur with 16-byte loads and the exact
spatial mean.

The record is ``_library.GaussianBlur2dArgs``. Every layout is addressed as ``x[b, g, j, y, x]`` with five strides (:func:`geometry`): channel
``c = g·D + j`` split into a "group" g and an inner index j so that both NCHW (``G = C, D = 1``,
x contiguous) and token layouts (``(B, N, C)``: ``G = 1, D = C``; ``(B, heads, N, d)``:
``G = heads, D = d``; j contiguous) load contiguous vectors; token ``n`` sits at ``(n // W, n % W)``.
Channels-last NCHW is addressed like tokens (``G = 1``, j = the contiguous channels).

``_blur_kernel`` blurs along ONE axis of the grid ("rows", walked serially with the rows' taps in
registers) and optionally along the other at the same time ("columns": each source row is read
``k`` times, shifted and reflected along the columns, and blurred before it is used). A program
owns ``BLOCK_Y`` output rows × ``BLOCK_X`` columns × ``BLOCK_J`` inner channels; one load is a
``(BLOCK_X, BLOCK_J)`` tile with 16 bytes of contiguous channels per thread. It walks the
``trip = min(BLOCK_Y + 2·pad, H)`` *source* rows its outputs need, each once, and adds source row
``r`` to output row ``y`` with the reflection folded into the weight (:func:`fold_table`: the sum
of the taps ``t`` whose reflect-padded index ``y + t − pad`` is ``r``; one reflection suffices as
pad < H). Rows outside every tap of ``y`` (weight 0: every tap is > 0) are skipped by a uniform
branch, not multiplied by 0 (an inf there would give NaN). The ``BLOCK_Y`` accumulators are a
tuple of (BLOCK_X, BLOCK_J) tiles in the loads' own register layout. Per output that is
``trip·(1 + k_cols/BLOCK_Y)`` multiply-adds.

One launch (both axes fused: input read once, output written once) where that is cheapest; for
large kernels, where the fused column taps are recomputed for every halo row, two launches
(rows into a float32 scratch, then columns from it, both register-blocked: ``~2·(k + BLOCK)``
multiply-adds per element for 12 instead of 4 bytes): :func:`blur_plan` weighs the two with the
FMA/byte balance of a Hopper GPU. Weights are the float32 ``_spec.blur_taps``; accumulation is
float32.

σ = ∞ — TWO launches, no atomics (deterministic): ``_spatial_sum_kernel`` writes float32 partial
sums per (item, group, chunk of positions); ``_mean_fill_kernel`` adds a sample's partials,
divides by ``H·W`` and writes the mean to every position.

Reflect padding needs ``pad < H`` and ``pad < W`` (checked by the public function). Item and
group offsets are int64; strides but the inner one are passed in units of ``ALIGN`` elements
(16-byte alignment known to the compiler, as in guided_attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .. import _layout
from .._library import GaussianBlur2dArgs
from .._spec import blur_taps
from ._common import device_guard

NUM_WARPS = 4
MAX_TILE = 2048  # fp32 elements of a mean-fill tile (16 registers per thread at 4 warps)
SUM_BLOCK_P = 64  # positions per tile in the mean kernels


@dataclass(frozen=True)
class Geometry:
    """``x[b, g, j, y, x]`` at ``b·sb + g·sg + j·sj + y·sy + x·sx``."""

    groups: int
    inner: int
    height: int
    width: int
    strides: tuple[int, int, int, int, int]  # sb, sg, sj, sy, sx


def geometry(t: torch.Tensor, layout: str, h: int, w: int, channels_last: bool = False) -> Geometry:
    """``t``'s geometry; ``channels_last`` (NCHW only): channels as the inner, vector axis."""
    s = t.stride()
    if layout == "nchw" and channels_last:
        return Geometry(1, t.shape[1], h, w, (s[0], 0, s[1], s[2], s[3]))
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
def _load_tile(ptrs, j_ok, EVEN_J: tl.constexpr):
    """A (columns, channels) tile; unmasked when the channel tiles divide D (16-byte vectors)."""
    if EVEN_J:
        val = tl.load(ptrs)
    else:
        val = tl.load(ptrs, mask=j_ok, other=0.0)
    return val


@triton.jit
def _unpack(c, VEC: tl.constexpr):
    """The VEC columns of a (G, VEC) tile as a tuple of (G,) tensors, in order (register moves:
    every column is already in the thread that loaded it)."""
    if VEC == 1:
        out = (tl.reshape(c, [c.shape[0]]),)
    elif VEC == 2:
        e0, e1 = tl.split(c)
        out = (e0, e1)
    elif VEC == 4:
        c0, c1 = tl.split(tl.reshape(c, [c.shape[0], 2, 2]))  # index 2a + b: split b, then a
        e0, e2 = tl.split(c0)
        e1, e3 = tl.split(c1)
        out = (e0, e1, e2, e3)
    else:
        c0, c1 = tl.split(tl.reshape(c, [c.shape[0], 2, 2, 2]))  # index 4a + 2b + c
        c00, c01 = tl.split(c0)
        c10, c11 = tl.split(c1)
        e0, e4 = tl.split(c00)
        e2, e6 = tl.split(c01)
        e1, e5 = tl.split(c10)
        e3, e7 = tl.split(c11)
        out = (e0, e1, e2, e3, e4, e5, e6, e7)
    return out


@triton.jit
def _pack(e, VEC: tl.constexpr):
    """Inverse of :func:`_unpack`: a tuple of VEC (G,) tensors as one (G, VEC) tile."""
    if VEC == 1:
        out = tl.reshape(e[0], [e[0].shape[0], 1])
    elif VEC == 2:
        out = tl.join(e[0], e[1])
    elif VEC == 4:
        out = tl.reshape(tl.join(tl.join(e[0], e[2]), tl.join(e[1], e[3])), [e[0].shape[0], 4])
    else:
        lo = tl.join(tl.join(e[0], e[4]), tl.join(e[2], e[6]))
        hi = tl.join(tl.join(e[1], e[5]), tl.join(e[3], e[7]))
        out = tl.reshape(tl.join(lo, hi), [e[0].shape[0], 8])
    return out


@triton.jit
def _row_chunks(row, chunk, q_ok, n_chunks, lane, taps, left, right, VEC: tl.constexpr, NC: tl.constexpr,
                K: tl.constexpr):
    """Column taps of one source row of contiguous NCHW planes, from aligned 16-byte loads: the
    (Q, VEC) output chunks ``chunk`` (of the planes whose rows start at the pointers ``row``) need
    the chunks ``chunk − NC … chunk + NC`` (NC·VEC ≥ the kernel's pad); every shifted tap is a
    static pick among their (2·NC + 1)·VEC columns. At the grid's edges (``left`` / ``right``:
    the tile holds the first / last chunks) the columns past the grid are replaced by their
    reflections, static picks again. Needs W % VEC == 0 and W ≥ (2·NC + 1)·VEC."""
    pad: tl.constexpr = K // 2
    win = ()
    for m in tl.static_range(2 * NC + 1):
        cm = chunk + (m - NC)
        ok = (q_ok & (cm >= 0) & (cm < n_chunks))[:, None] & (lane < VEC)[None, :]
        c = tl.load(row[:, None] + (cm * VEC)[:, None] + lane[None, :], mask=ok, other=0.0).to(tl.float32)
        win = win + _unpack(c, VEC)
    if left:
        # thread chunk m < NC: window column i < (NC − m)·VEC sits at x < 0; x → −x is column
        # 2(NC − m)·VEC − i
        fixed = ()
        for i in tl.static_range((2 * NC + 1) * VEC):
            v = win[i]
            for m in tl.static_range(NC):
                if i < (NC - m) * VEC:
                    v = tl.where(chunk == m, win[2 * (NC - m) * VEC - i], v)
            fixed = fixed + (v,)
        win = fixed
    if right:
        # thread chunk n_chunks − 1 − m: column i ≥ (m + NC + 1)·VEC sits at x > W − 1;
        # x → 2(W − 1) − x is column 2(m + NC + 1)·VEC − 2 − i
        fixed = ()
        for i in tl.static_range((2 * NC + 1) * VEC):
            v = win[i]
            for m in tl.static_range(NC):
                if i >= (m + NC + 1) * VEC:
                    v = tl.where(chunk == n_chunks - 1 - m, win[2 * (m + NC + 1) * VEC - 2 - i], v)
            fixed = fixed + (v,)
        win = fixed
    h = ()
    for e in tl.static_range(VEC):
        acc = taps[0] * win[NC * VEC + e - pad]
        for t in tl.static_range(1, K):
            acc += taps[t] * win[NC * VEC + e + t - pad]
        h = h + (acc,)
    return _pack(h, VEC)


@triton.jit
def _blur_rows(x_base, fold_ptr, wc_ptr, y0, H, W, D, pad, pad_c, k_cols, trip, sxj, sxy, sxx, offs_x, offs_j,
               COLS: tl.constexpr, EVEN_J: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
               BLOCK_J: tl.constexpr):
    """The BLOCK_Y output rows from y0 of one (BLOCK_X columns, BLOCK_J channels) tile, blurred
    along the rows (and along the columns when COLS: k_cols shifted loads per source row): a tuple
    of (BLOCK_X, BLOCK_J) fp32 tiles."""
    # the trip source rows [lo, lo + trip) cover every row the tile's outputs read (trip ≤ H)
    lo = tl.minimum(tl.maximum(y0 - pad, 0), H - trip)
    # one (BLOCK_X, BLOCK_J) accumulator per output row, all in the loads' register layout (a 3-D
    # accumulator would convert every source row through shared memory)
    accs = ()
    for i in tl.static_range(BLOCK_Y):
        accs = accs + (tl.zeros([BLOCK_X, BLOCK_J], dtype=tl.float32),)
    # columns past the grid compute column W − 1 again (never stored): every load stays in bounds
    # without a column mask
    x_in = tl.minimum(offs_x, W - 1)
    j_off = offs_j[None, :].to(tl.int64) * sxj
    # a full-shape mask (Triton's interpreter does not broadcast load masks)
    j_ok = (x_in[:, None] * 0 + offs_j[None, :]) < D
    for step in range(0, trip):
        r = lo + step
        row = x_base + r.to(tl.int64) * sxy
        if COLS:
            h = tl.zeros([BLOCK_X, BLOCK_J], dtype=tl.float32)
            for t in range(0, k_cols):
                col = _reflect(x_in + (t - pad_c), W)
                val = _load_tile(row + col.to(tl.int64)[:, None] * sxx + j_off, j_ok, EVEN_J)
                h += tl.load(wc_ptr + t) * val.to(tl.float32)
        else:
            h = _load_tile(row + x_in.to(tl.int64)[:, None] * sxx + j_off, j_ok, EVEN_J).to(tl.float32)
        accs = _add_row(accs, h, fold_ptr, r, y0, H, BLOCK_Y)
    return accs


@triton.jit
def _add_row(accs, h, fold_ptr, r, y0, H, BLOCK_Y: tl.constexpr):
    """accs[i] += T[r, y0 + i] · h for the output rows whose kernel holds source row r."""
    new = ()
    for i in tl.static_range(BLOCK_Y):
        # the folded weight of source row r in output row y0 + i; 0: outside its kernel, where the
        # row adds nothing (not 0·x: an inf there would give NaN)
        w = tl.load(fold_ptr + r * H + y0 + i, mask=y0 + i < H, other=0.0)
        acc = accs[i]
        if w > 0:
            acc = acc + w * h
        new = new + (acc,)
    return new


@triton.jit
def _nchw_rows(planes, chunk, q_ok, lane, fold_ptr, wc_ptr, y0, H, n_chunks, pad, trip, sxy, left, right,
               VEC: tl.constexpr, NC: tl.constexpr, KC: tl.constexpr, BLOCK_Y: tl.constexpr,
               BLOCK_Q: tl.constexpr):
    """The BLOCK_Y output rows from y0 of contiguous NCHW planes, blurred along both axes: a tuple
    of (BLOCK_Q, VEC) fp32 tiles, thread q owning chunk ``chunk[q]`` of the plane whose (0, 0)
    element is at ``planes[q]`` (column taps: :func:`_row_chunks`, KC static taps)."""
    lo = tl.minimum(tl.maximum(y0 - pad, 0), H - trip)
    taps = ()
    for t in tl.static_range(KC):
        taps = taps + (tl.load(wc_ptr + t),)
    accs = ()
    for i in tl.static_range(BLOCK_Y):
        accs = accs + (tl.zeros([BLOCK_Q, VEC], dtype=tl.float32),)
    for step in range(0, trip):
        r = lo + step
        h = _row_chunks(planes + r.to(tl.int64) * sxy, chunk, q_ok, n_chunks, lane, taps, left, right, VEC, NC, KC)
        accs = _add_row(accs, h, fold_ptr, r, y0, H, BLOCK_Y)
    return accs


@triton.jit
def _nchw_tile(pid, n_planes, C, n_chunks, tiles_x, tiles_y, sxb, sxc, sob, soc, NC: tl.constexpr,
               BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program ``pid``'s tile of contiguous NCHW planes: BLOCK_P planes × BLOCK_X chunks (one per
    thread, flattened to BLOCK_Q = BLOCK_P·BLOCK_X), BLOCK_Y rows from y0. Returns (y0, chunk,
    valid thread, input plane offsets, output plane offsets, left / right edge tile)."""
    tx = pid % tiles_x
    rest = pid // tiles_x
    ty = rest % tiles_y
    tp = rest // tiles_y
    q = tl.arange(0, BLOCK_P * BLOCK_X)
    chunk = tx * BLOCK_X + q % BLOCK_X
    plane = tp * BLOCK_P + q // BLOCK_X
    q_ok = (plane < n_planes) & (chunk < n_chunks)
    b = (plane // C).to(tl.int64)
    c = (plane % C).to(tl.int64)
    left = tx * BLOCK_X < NC
    right = (tx + 1) * BLOCK_X > n_chunks - NC
    return ty * BLOCK_Y, chunk, q_ok, b * sxb + c * sxc, b * sob + c * soc, left, right


@triton.jit
def _blur_nchw_kernel(out_ptr, x_ptr, fold_ptr, wc_ptr, n_planes, C, H, n_chunks, pad, trip, tiles_x, tiles_y,
                      sxb, sxc, sxy, sob, soc, soy, ALIGN: tl.constexpr, VEC: tl.constexpr, NC: tl.constexpr,
                      KC: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_P: tl.constexpr):
    """The blur of contiguous NCHW planes (x the 16-byte vector axis): :func:`_nchw_rows`."""
    sxb, sxc, sxy = sxb * ALIGN, sxc * ALIGN, sxy * ALIGN
    sob, soc, soy = sob * ALIGN, soc * ALIGN, soy * ALIGN
    y0, chunk, q_ok, x_off, o_off, left, right = _nchw_tile(tl.program_id(0), n_planes, C, n_chunks, tiles_x,
                                                            tiles_y, sxb, sxc, sob, soc, NC, BLOCK_Y, BLOCK_X,
                                                            BLOCK_P)
    lane = tl.arange(0, VEC)
    accs = _nchw_rows(x_ptr + x_off, chunk, q_ok, lane, fold_ptr, wc_ptr, y0, H, n_chunks, pad, trip, sxy, left,
                      right, VEC, NC, KC, BLOCK_Y, BLOCK_P * BLOCK_X)
    o_cols = out_ptr + o_off[:, None] + (chunk * VEC)[:, None] + lane[None, :]
    for i in tl.static_range(BLOCK_Y):
        y = y0 + i
        ok = (q_ok & ((chunk * 0 + y) < H))[:, None] & (lane < VEC)[None, :]
        tl.store(o_cols + y.to(tl.int64) * soy, accs[i].to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _blur_kernel(out_ptr, x_ptr, fold_ptr, wc_ptr, items_ptr, G, D, H, W, pad, pad_c, k_cols, trip,
                 tiles_x, tiles_j, tiles_y, sxb, sxg, sxj, sxy, sxx, sob, sog, soj, soy, sox,
                 HAS_ITEMS: tl.constexpr, COLS: tl.constexpr, EVEN_J: tl.constexpr, ALIGN: tl.constexpr,
                 BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_J: tl.constexpr):
    sxb, sxg, sxy, sxx = sxb * ALIGN, sxg * ALIGN, sxy * ALIGN, sxx * ALIGN
    sob, sog, soy, sox = sob * ALIGN, sog * ALIGN, soy * ALIGN, sox * ALIGN
    pid = tl.program_id(0)
    tx = pid % tiles_x
    rest = pid // tiles_x
    tj = rest % tiles_j
    rest = rest // tiles_j
    ty = rest % tiles_y
    bg = rest // tiles_y
    slot, g, x_base = _sample_base(x_ptr, items_ptr, bg, G, sxb, sxg, HAS_ITEMS)
    o_base = out_ptr + slot.to(tl.int64) * sob + g.to(tl.int64) * sog
    y0 = ty * BLOCK_Y
    offs_x = tx * BLOCK_X + tl.arange(0, BLOCK_X)
    offs_j = tj * BLOCK_J + tl.arange(0, BLOCK_J)
    accs = _blur_rows(x_base, fold_ptr, wc_ptr, y0, H, W, D, pad, pad_c, k_cols, trip, sxj, sxy, sxx, offs_x, offs_j,
                      COLS, EVEN_J, BLOCK_Y, BLOCK_X, BLOCK_J)
    o_cols = o_base + offs_x.to(tl.int64)[:, None] * sox + offs_j.to(tl.int64)[None, :] * soj
    o_mask = (offs_x < W)[:, None] & ((offs_x * 0)[:, None] + offs_j[None, :] < D)
    for i in tl.static_range(BLOCK_Y):
        y = y0 + i
        row_ok = ((offs_x * 0 + y) < H)[:, None]  # a block comparison (Triton's interpreter)
        tl.store(o_cols + y.to(tl.int64) * soy, accs[i].to(out_ptr.dtype.element_ty), mask=o_mask & row_ok)


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


# Hopper balance: ~33 T fp32 FMA/s against ~4.3 TB/s of copy bandwidth (benchmarks/hopper.md)
FMA_PER_BYTE = 8


@dataclass(frozen=True)
class Pass:
    """One launch of ``_blur_kernel``: tiles, whether the columns' taps are fused in, and for a
    contiguous NCHW plane the vector width along x (``xvec``, 0 otherwise: vectors of channels)
    with the number of neighbour chunks each side (``nc``)."""

    block_y: int
    block_x: int
    block_j: int
    cols: bool
    xvec: int = 0
    nc: int = 0
    block_p: int = 1  # NCHW planes per tile (xvec > 0)
    warps: int = NUM_WARPS  # fewer for narrow tiles: every thread still loads 16 bytes


def _tiles(geo: Geometry, elem: int, rows: int, cols: int) -> tuple[int, int, int]:
    """(BLOCK_X, BLOCK_J, warps): one 16-byte vector of contiguous channels per thread per load
    (all the channels when fewer; a grid narrower than the tile runs fewer warps rather than
    shorter vectors)."""
    vec = max(1, 16 // elem)
    # channel tiles dividing D where 16-byte vectors do (d = 40: 8; an unmasked load vectorises,
    # a load masked at a run-time D does not); else one masked tile covering D (up to 64)
    divisor = min(geo.inner & -geo.inner, 64)
    block_j = divisor if divisor >= vec else min(triton.next_power_of_2(geo.inner), 64)
    block_x = min(triton.next_power_of_2(cols), max(1, vec * 32 * NUM_WARPS // block_j))
    return block_x, block_j, max(1, min(NUM_WARPS, block_x * block_j // (min(vec, block_j) * 32)))


def _fma(k_rows: int, k_cols: int, rows: int, block_y: int) -> float:
    """Instructions per output of one pass, in multiply-adds: ``trip`` source rows, each added to
    the output rows (the 1), after ``k_cols`` column taps, one row load and one weight load shared
    by ``block_y`` outputs."""
    trip = min(block_y + k_rows - 1, rows)
    return trip * (1 + (k_cols + 2) / block_y)


@lru_cache(maxsize=64)
def fold_table(taps: tuple[float, ...], n: int, device: torch.device) -> torch.Tensor:
    """``T[r, y]``: the weight of source index ``r`` in output ``y`` of a reflect-padded 1-D blur
    of an axis of ``n``: the sum of the taps whose padded index ``y + t − pad`` reflects to ``r``
    (0 when none does). Every tap is > 0 (``_spec.blur_taps``), so ``T > 0`` is exactly "r is in
    the kernel of y". Cached per device (no host-to-device copy per call)."""
    pad = len(taps) // 2
    y = torch.arange(n)
    table = torch.zeros((n, n), dtype=torch.float64)
    for t, w in enumerate(taps):
        p = (y + t - pad).abs()  # reflected at the top
        r = torch.where(p > n - 1, 2 * (n - 1) - p, p)  # and at the bottom
        table.index_put_((r, y), torch.full((n,), w, dtype=torch.float64), accumulate=True)
    return table.to(torch.float32).to(device)


def _best_pass(geo: Geometry, elem: int, k_rows: int, k_cols: int, rows: int, cols: int, outputs: int,
               target: int) -> tuple[float, Pass]:
    """The cheapest tiles of one pass: ``BLOCK_Y`` such that the accumulator (BLOCK_Y vectors of
    fp32 per thread) stays ≤ 64 registers (more spills on sm_90 with the column taps) and the launch has at least half the target programs
    where it can."""
    block_x, block_j, warps = _tiles(geo, elem, rows, cols)
    per_thread = max(1, 16 // elem)
    options = []
    for block_y in (16, 8, 4, 2, 1):
        if block_y * per_thread > 64 or block_y > triton.next_power_of_2(rows):
            continue
        programs = outputs // max(1, block_y * block_x * block_j)
        options.append((programs < target // 2, _fma(k_rows, k_cols, rows, block_y), block_y))
    _, cost, block_y = min(options)
    return cost, Pass(block_y, block_x, block_j, k_cols > 1, warps=warps)


MAX_CHUNKS = 2  # neighbour chunks each side of the NCHW column taps (pad ≤ 2 vectors)


def nchw_vector(geo: Geometry, kernel_size: int, elem: int) -> tuple[int, int]:
    """(vector width, neighbour chunks) of the aligned-chunk column taps for a contiguous NCHW
    plane (x contiguous, W a multiple of the 16-byte vector, the kernel's pad within
    MAX_CHUNKS vectors), else (0, 0)."""
    vec = max(1, 16 // elem)
    nc = -(-(kernel_size // 2) // vec)
    if (geo.inner != 1 or geo.strides[4] != 1 or geo.width % vec or nc > MAX_CHUNKS
            or geo.width < (2 * max(nc, 1) + 1) * vec):
        return 0, 0
    return vec, nc


def blur_plan(geo: Geometry, kernel_size: int, elem: int, outputs: int, target: int) -> tuple[Pass, ...]:
    """One fused pass, or two (rows into a float32 scratch, then columns), whichever the FMA and
    byte counts predict faster (:data:`FMA_PER_BYTE`); a contiguous NCHW plane with a small
    kernel takes its column taps from aligned 16-byte chunks (:func:`nchw_vector`)."""
    vec, nc = nchw_vector(geo, kernel_size, elem)
    if vec:
        # one 16-byte chunk per thread: a tile is BLOCK_P planes × BLOCK_X chunks of a row
        block_x = min(triton.next_power_of_2(geo.width // vec), 32 * NUM_WARPS)
        block_p = max(1, 32 * NUM_WARPS // block_x)
        options = []
        for block_y in (16, 8, 4, 2, 1):
            if block_y * vec <= 64 and block_y <= triton.next_power_of_2(geo.height):
                programs = outputs // (block_y * block_x * block_p * vec)
                cost = _fma(kernel_size, kernel_size, geo.height, block_y)
                options.append((programs < target // 2, cost, block_y))
        return (Pass(min(options)[2], block_x, vec, kernel_size > 1, vec, nc, block_p),)
    fused_cost, fused = _best_pass(geo, elem, kernel_size, kernel_size, geo.height, geo.width, outputs, target)
    rows_cost, rows = _best_pass(geo, elem, kernel_size, 0, geo.height, geo.width, outputs, target)
    cols_cost, cols = _best_pass(geo, 4, kernel_size, 0, geo.width, geo.height, outputs, target)
    fused_time = max(fused_cost, FMA_PER_BYTE * 2 * elem)
    split_time = max(rows_cost, FMA_PER_BYTE * (elem + 4)) + max(cols_cost, FMA_PER_BYTE * (4 + elem))
    if kernel_size == 1 or fused_time <= split_time:
        return (fused,)
    return rows, cols


def vector_align(*geos: Geometry, elem: int, x_inner: bool = False) -> int:
    """The largest power of two ≤ 16 bytes / element dividing every stride but the inner one —
    the x stride too when x is the vector axis (``x_inner``) —: the unit the launcher passes them
    in (1 when one needs 64 bits)."""
    align = max(1, 16 // elem)
    for geo in geos:
        sb, sg, _, sy, sx = geo.strides
        for stride in (sb, sg, sy) if x_inner else (sb, sg, sy, sx):
            if abs(stride) >= 2**31:
                return 1
            while align > 1 and stride % align:
                align //= 2
    return align


def _launch_pass(out: torch.Tensor, out_geo: Geometry, x: torch.Tensor, geo: Geometry, taps: tuple[float, ...],
                 cols_w: torch.Tensor, items: torch.Tensor | None, slots: int, plan: Pass) -> None:
    """``_blur_kernel`` over ``geo``'s rows (its ``height`` axis), with the column taps ``cols_w``
    when ``plan.cols`` (``_blur_nchw_kernel`` for contiguous NCHW planes: ``plan.xvec``)."""
    pad = len(taps) // 2
    fold = fold_table(taps, geo.height, x.device)
    if plan.xvec:
        _launch_nchw(out, out_geo, x, geo, fold, cols_w, pad, slots, plan)
        return
    trip = min(plan.block_y + 2 * pad, geo.height)
    tiles_x = triton.cdiv(geo.width, plan.block_x)
    tiles_j = triton.cdiv(geo.inner, plan.block_j)
    tiles_y = triton.cdiv(geo.height, plan.block_y)
    align = vector_align(geo, out_geo, elem=min(x.element_size(), out.element_size()))

    def strides(g: Geometry):
        sb, sg, sj, sy, sx = g.strides
        return sb // align, sg // align, sj, sy // align, sx // align

    with device_guard(x):
        _blur_kernel[(slots * geo.groups * tiles_y * tiles_j * tiles_x,)](
            out, x, fold, cols_w, items if items is not None else fold, geo.groups, geo.inner, geo.height,
            geo.width, pad, cols_w.numel() // 2, cols_w.numel(), trip, tiles_x, tiles_j, tiles_y,
            *strides(geo), *strides(out_geo), HAS_ITEMS=items is not None, COLS=plan.cols,
            EVEN_J=geo.inner % plan.block_j == 0, ALIGN=align, BLOCK_Y=plan.block_y, BLOCK_X=plan.block_x,
            BLOCK_J=plan.block_j, num_warps=plan.warps)


def _launch_nchw(out: torch.Tensor, out_geo: Geometry, x: torch.Tensor, geo: Geometry, fold: torch.Tensor,
                 taps: torch.Tensor, pad: int, slots: int, plan: Pass) -> None:
    n_chunks = geo.width // plan.xvec
    n_planes = slots * geo.groups
    tiles_x = triton.cdiv(n_chunks, plan.block_x)
    tiles_y = triton.cdiv(geo.height, plan.block_y)
    align = vector_align(geo, out_geo, elem=min(x.element_size(), out.element_size()), x_inner=True)
    sxb, sxc, _, sxy, _ = geo.strides
    sob, soc, _, soy, _ = out_geo.strides
    with device_guard(x):
        _blur_nchw_kernel[(triton.cdiv(n_planes, plan.block_p) * tiles_y * tiles_x,)](
            out, x, fold, taps, n_planes, geo.groups, geo.height, n_chunks, pad, min(plan.block_y + 2 * pad, geo.height),
            tiles_x, tiles_y, sxb // align, sxc // align, sxy // align, sob // align, soc // align, soy // align,
            ALIGN=align, VEC=plan.xvec, NC=plan.nc, KC=taps.numel(), BLOCK_Y=plan.block_y, BLOCK_X=plan.block_x,
            BLOCK_P=plan.block_p, num_warps=NUM_WARPS)


def _transposed(geo: Geometry) -> Geometry:
    """The same tensor with the grid's two axes swapped (a pass over the columns is a pass over the
    rows of the transpose)."""
    sb, sg, sj, sy, sx = geo.strides
    return Geometry(geo.groups, geo.inner, geo.width, geo.height, (sb, sg, sj, sx, sy))


def blur_into(out: torch.Tensor, out_geo: Geometry, x: torch.Tensor, geo: Geometry, kernel_size: int, sigma: float,
              items: torch.Tensor | None, slots: int) -> None:
    """Blur ``slots`` samples of ``x`` (sample ``items[i]``, or ``i``) into sample ``i`` of ``out``."""
    if kernel_size < 1 or kernel_size % 2 == 0 or kernel_size // 2 >= min(geo.height, geo.width):
        # the public function never passes these; the raw op must not read outside the grid either
        raise ValueError(f"gaussian_blur_2d: kernel_size: {kernel_size} is not an odd size whose reflect "
                         f"padding fits the grid {(geo.height, geo.width)}")
    taps = blur_taps(kernel_size, sigma)  # zero-weight taps dropped
    w = _layout.blur_taps_like(x, kernel_size, sigma, torch.float32)
    outputs = slots * geo.groups * geo.inner * geo.height * geo.width
    plan = blur_plan(geo, len(taps), x.element_size(), outputs, _layout.target_programs(x.device))
    if len(plan) == 1:
        _launch_pass(out, out_geo, x, geo, taps, w, items, slots, plan[0])
        return
    # rows into a float32 scratch laid out (slot, g, y, x, j), then its columns into out
    g, d, h, wd = geo.groups, geo.inner, geo.height, geo.width
    scratch = torch.empty((slots, g, h, wd, d), dtype=torch.float32, device=x.device)
    s_geo = Geometry(g, d, h, wd, (g * h * wd * d, h * wd * d, 1, wd * d, d))
    one = _layout.blur_taps_like(x, 1, 1.0, torch.float32)
    _launch_pass(scratch, s_geo, x, geo, taps, one, items, slots, plan[0])
    _launch_pass(out, _transposed(out_geo), scratch, _transposed(s_geo), taps, one, None, slots, plan[1])


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
    # channels-last NCHW: the channels are the contiguous vectors (both tensors laid out alike)
    cl = a.layout == "nchw" and x.shape[1] > 1 and x.stride(1) == 1 and out.stride(1) == 1
    geo = geometry(x, a.layout, a.grid_h, a.grid_w, cl)
    out_geo = geometry(out, a.layout, a.grid_h, a.grid_w, cl)
    if a.kernel_size == 0:
        mean_into(out, out_geo, x, geo, x.shape[0])
    else:
        blur_into(out, out_geo, x, geo, a.kernel_size, a.sigma, None, x.shape[0])
    return out
