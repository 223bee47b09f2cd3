"""Triton kernels of sag_degrade: threshold + nearest map lookup + Gaussian blur + blend + re-noise
in ONE launch.

The blur is gaussian_blur_2d's (its kernels' building blocks, same tiles and weights): each
program walks the source rows its ``BLOCK_Y`` output rows need, each row read once, blurred along
the columns and added to the output rows with the reflection folded into the row weights
(``gaussian_blur_2d.fold_table``); rows outside an output row's kernel add nothing (the
non-finite rule). Two tilings:

* ``_degrade_nchw_kernel`` — contiguous NCHW latents (x0, the outputs and eps / x_t alike, W a
  multiple of the 16-byte vector): one aligned 16-byte chunk of x per thread, the column taps
  static picks among the chunk and its neighbours (``gaussian_blur_2d._nchw_rows``); a tile is
  ``BLOCK_P`` (sample, channel) planes × ``BLOCK_X`` chunks of a row;
* ``_degrade_kernel`` — any other strides (channels-last: vectors of channels; else one element
  of x per thread) through ``gaussian_blur_2d._blur_rows``.

Then per output element, in fp32:

* mask: the (B|1, h, w) map at the nearest source cell ``min(floor(y·scale_y), h − 1)`` with the
  float32 scale of ``F.interpolate(mode="nearest")`` (``_spec.nearest_scale``), thresholded
  ``> threshold`` for a key mass, used as blend weight for a ready mask;
* ``degraded = blurred·m + x0·(1 − m)``, then the re-noise (RENOISE 0 none, 1 DDPM with per-sample
  ᾱ, 2 k-diffusion ``(degraded + x_t) − x0``) and the store in x0's dtype.

The public function guarantees ``H, W > taps // 2`` (one reflection reaches every tap). Sample and
channel offsets are int64; strides but the contiguous one are passed in units of ``ALIGN``
elements (16-byte alignment known to the compiler). Masked lanes never touch memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _layout
from .._library import SagDegradeArgs
from .._spec import RENOISE, blur_taps, nearest_scale
from ._common import device_guard
from .gaussian_blur_2d import (NUM_WARPS, Geometry, _blur_rows, _fma, _nchw_rows, _nchw_tile, _tiles, fold_table,
                               nchw_vector, vector_align)


@triton.jit
def _nearest(dst, scale, in_size):
    """ATen's nearest source index: min(floor(float(dst) · scale), in − 1), float32."""
    src = tl.floor(dst.to(tl.float32) * scale).to(tl.int32)
    return tl.minimum(src, in_size - 1)


@triton.jit
def _epilogue(blurred, y, b, xs, ok, x_ptr, x_off, out_ptr, deg_ptr, o_off, other_ptr, e_off, map_ptr, alpha_ptr,
              sxh, soh, seh, height, width, map_h, map_w, smb, smh, smw, scale_y, scale_x, threshold, alpha,
              alpha_stride, THRESHOLDED: tl.constexpr, RENOISE_MODE: tl.constexpr, ALPHA_TENSOR: tl.constexpr,
              WRITE_DEGRADED: tl.constexpr):
    """Mask, blend, re-noise and store output row ``y`` of a tile: ``blurred`` and the per-element
    sample ``b``, column ``xs``, validity ``ok`` and row-0 offsets of x0 / outputs / eps share one
    shape."""
    y64 = y.to(tl.int64)
    x0 = tl.load(x_ptr + x_off + y64 * sxh, mask=ok, other=0.0).to(tl.float32)
    my = _nearest(xs * 0 + y, scale_y, map_h).to(tl.int64)
    mx = _nearest(xs, scale_x, map_w).to(tl.int64)
    m = tl.load(map_ptr + b * smb + my * smh + mx * smw, mask=ok, other=0).to(tl.float32)
    if THRESHOLDED:
        m = tl.where(m > threshold, 1.0, 0.0)
    degraded = blurred * m + x0 * (1.0 - m)
    if RENOISE_MODE == 1:
        if ALPHA_TENSOR:
            alpha = tl.load(alpha_ptr + b * alpha_stride, mask=ok, other=0.0).to(tl.float32)
        eps = tl.load(other_ptr + e_off + y64 * seh, mask=ok, other=0.0).to(tl.float32)
        result = tl.sqrt_rn(alpha) * degraded + tl.sqrt_rn(1.0 - alpha) * eps
    elif RENOISE_MODE == 2:
        x_t = tl.load(other_ptr + e_off + y64 * seh, mask=ok, other=0.0).to(tl.float32)
        result = (degraded + x_t) - x0
    else:
        result = degraded
    tl.store(out_ptr + o_off + y64 * soh, result.to(out_ptr.dtype.element_ty), mask=ok)
    if WRITE_DEGRADED:
        tl.store(deg_ptr + o_off + y64 * soh, degraded.to(deg_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _degrade_nchw_kernel(out_ptr, deg_ptr, x_ptr, other_ptr, map_ptr, alpha_ptr, fold_ptr, w_ptr,
                         n_planes, channels, height, width, n_chunks, pad, trip, tiles_x, tiles_y, sxb, sxc, sxh,
                         map_h, map_w, smb, smh, smw, scale_y, scale_x, threshold, alpha, alpha_stride,
                         ALIGN: tl.constexpr, VEC: tl.constexpr, NC: tl.constexpr, KC: tl.constexpr,
                         THRESHOLDED: tl.constexpr, RENOISE_MODE: tl.constexpr, ALPHA_TENSOR: tl.constexpr,
                         WRITE_DEGRADED: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
                         BLOCK_P: tl.constexpr):
    """Contiguous NCHW: x0, out, degraded and eps / x_t share x0's strides."""
    sxb, sxc, sxh = sxb * ALIGN, sxc * ALIGN, sxh * ALIGN
    y0, chunk, q_ok, x_off, _, left, right = _nchw_tile(tl.program_id(0), n_planes, channels, n_chunks, tiles_x,
                                                        tiles_y, sxb, sxc, sxb, sxc, NC, BLOCK_Y, BLOCK_X, BLOCK_P)
    lane = tl.arange(0, VEC)
    accs = _nchw_rows(x_ptr + x_off, chunk, q_ok, lane, fold_ptr, w_ptr, y0, height, n_chunks, pad, trip, sxh,
                      left, right, VEC, NC, KC, BLOCK_Y, BLOCK_P * BLOCK_X)
    plane = tl.program_id(0) // (tiles_x * tiles_y) * BLOCK_P + tl.arange(0, BLOCK_P * BLOCK_X) // BLOCK_X
    b = (plane // channels).to(tl.int64)[:, None] + (lane * 0)[None, :]
    xs = (chunk * VEC)[:, None] + lane[None, :]
    off = x_off[:, None] + xs
    for i in tl.static_range(BLOCK_Y):
        y = y0 + i
        ok = (q_ok & ((chunk * 0 + y) < height))[:, None] & (lane < VEC)[None, :]
        _epilogue(accs[i], y, b, xs, ok, x_ptr, off, out_ptr, deg_ptr, off, other_ptr, off, map_ptr, alpha_ptr,
                  sxh, sxh, sxh, height, width, map_h, map_w, smb, smh, smw, scale_y, scale_x, threshold, alpha,
                  alpha_stride, THRESHOLDED, RENOISE_MODE, ALPHA_TENSOR, WRITE_DEGRADED)


@triton.jit
def _degrade_kernel(out_ptr, deg_ptr, x_ptr, other_ptr, map_ptr, alpha_ptr, fold_ptr, w_ptr,
                    G, D, height, width, pad, k_cols, trip, tiles_x, tiles_j, tiles_y, sxg, sxj,
                    sxb, sxc, sxh, sxw, sob, soc, soh, sow, s2b, s2c, s2h, s2w,
                    map_h, map_w, smb, smh, smw, scale_y, scale_x, threshold, alpha, alpha_stride,
                    ALIGN: tl.constexpr, COLS: tl.constexpr, EVEN_J: tl.constexpr, THRESHOLDED: tl.constexpr,
                    RENOISE_MODE: tl.constexpr, ALPHA_TENSOR: tl.constexpr, WRITE_DEGRADED: tl.constexpr,
                    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_J: tl.constexpr):
    """Any strides: a tile is BLOCK_X columns × BLOCK_J channels of sample b (channels-last: the
    channels are the vectors, G = 1, D = C; else one channel g per program, G = C, D = 1). The
    rows walk addresses channels through (sxg, sxj) = (channel stride, 0) or (0, channel stride);
    the epilogue every tensor through its own (b, c, y, x) strides, all but the channel ones in
    units of ALIGN elements."""
    sxb, sxh, sxw = sxb * ALIGN, sxh * ALIGN, sxw * ALIGN
    sob, soh, sow = sob * ALIGN, soh * ALIGN, sow * ALIGN
    s2b, s2h, s2w = s2b * ALIGN, s2h * ALIGN, s2w * ALIGN
    pid = tl.program_id(0)
    tx = pid % tiles_x
    rest = pid // tiles_x
    tj = rest % tiles_j
    rest = rest // tiles_j
    ty = rest % tiles_y
    bg = rest // tiles_y
    b = (bg // G).to(tl.int64)
    g = bg % G
    y0 = ty * BLOCK_Y
    offs_x = tx * BLOCK_X + tl.arange(0, BLOCK_X)
    offs_j = tj * BLOCK_J + tl.arange(0, BLOCK_J)
    accs = _blur_rows(x_ptr + b * sxb + g.to(tl.int64) * sxg, fold_ptr, w_ptr, y0, height, width, D, pad, pad, k_cols,
                      trip, sxj, sxh, sxw, offs_x, offs_j, COLS, EVEN_J, BLOCK_Y, BLOCK_X, BLOCK_J)
    c = (g + offs_j).to(tl.int64)[None, :]  # the channel: g (D = 1) or j (G = 1)
    xo = offs_x.to(tl.int64)[:, None]
    xs = offs_x[:, None] + (offs_j * 0)[None, :]
    bb = b + xo * 0 + c * 0
    col_ok = (offs_x < width)[:, None] & ((offs_x * 0)[:, None] + offs_j[None, :] < D)
    for i in tl.static_range(BLOCK_Y):
        y = y0 + i
        ok = col_ok & ((offs_x * 0 + y) < height)[:, None]
        _epilogue(accs[i], y, bb, xs, ok, x_ptr, b * sxb + c * sxc + xo * sxw, out_ptr, deg_ptr,
                  b * sob + c * soc + xo * sow, other_ptr, b * s2b + c * s2c + xo * s2w, map_ptr, alpha_ptr, sxh, soh,
                  s2h, height, width, map_h, map_w, smb, smh, smw, scale_y, scale_x, threshold, alpha, alpha_stride,
                  THRESHOLDED, RENOISE_MODE, ALPHA_TENSOR, WRITE_DEGRADED)


def sag_degrade(a: SagDegradeArgs):
    x0, thresholded, threshold = a.x0, a.thresholded, a.threshold
    taps = blur_taps(a.kernel_size, a.sigma)  # zero-weight taps dropped
    renoise, alpha, alpha_tensor, other, return_degraded = a.renoise, a.alpha, a.alpha_tensor, a.other, a.return_degraded
    out = _layout.output_like(x0)
    degraded = _layout.output_like(x0) if return_degraded else x0.new_empty((0,))
    batch, channels, height, width = x0.shape
    if out.numel() == 0:
        return out, degraded
    mask_map = _layout.map_for_kernel(a.mask_map)
    map_b, map_h, map_w = mask_map.shape
    other_t = other if other is not None else x0
    alpha_t = alpha_tensor if alpha_tensor is not None else out
    alpha_stride = 0 if alpha_tensor is None or alpha_tensor.numel() == 1 else alpha_tensor.stride(0)
    w = _layout.blur_taps_like(x0, a.kernel_size, a.sigma, torch.float32)
    fold = fold_table(taps, height, x0.device)
    pad = len(taps) // 2
    common = (mask_map, alpha_t, fold, w)
    scalars = (map_h, map_w, mask_map.stride(0) if map_b > 1 else 0, mask_map.stride(1), mask_map.stride(2),
               nearest_scale(map_h, height), nearest_scale(map_w, width), float(threshold), float(alpha), alpha_stride)
    flags = dict(THRESHOLDED=bool(thresholded), RENOISE_MODE=RENOISE[renoise], ALPHA_TENSOR=alpha_tensor is not None,
                 WRITE_DEGRADED=bool(return_degraded), num_warps=NUM_WARPS)
    deg = degraded if return_degraded else out
    strides = x0.stride()
    target = _layout.target_programs(x0.device)
    geo = Geometry(channels, 1, height, width, (strides[0], strides[1], 0, strides[2], strides[3]))
    vec, nc = nchw_vector(geo, len(taps), x0.element_size())
    if vec and out.stride() == strides and other_t.stride() == strides:
        n_chunks = width // vec
        block_x = min(triton.next_power_of_2(n_chunks), 32 * NUM_WARPS)
        block_p = max(1, 32 * NUM_WARPS // block_x)
        block_y = _rows_per_program(len(taps), height, vec, batch * channels * height * width // (block_x * block_p * vec),
                                    target)
        align = vector_align(geo, elem=x0.element_size(), x_inner=True)
        tiles_x = triton.cdiv(n_chunks, block_x)
        tiles_y = triton.cdiv(height, block_y)
        with device_guard(out):
            _degrade_nchw_kernel[(triton.cdiv(batch * channels, block_p) * tiles_y * tiles_x,)](
                out, deg, x0, other_t, *common, batch * channels, channels, height, width, n_chunks, pad,
                min(block_y + 2 * pad, height), tiles_x, tiles_y, strides[0] // align, strides[1] // align,
                strides[2] // align, *scalars, ALIGN=align, VEC=vec, NC=nc, KC=len(taps), BLOCK_Y=block_y,
                BLOCK_X=block_x, BLOCK_P=block_p, **flags)
        return out, degraded
    # channels-last (x0 and out): vectors of channels; otherwise one element of x per thread
    tensors = (x0, out, other_t)
    cl = channels > 1 and all(t.stride(1) == 1 for t in tensors)
    if cl:
        geo = Geometry(1, channels, height, width, (strides[0], 0, 1, strides[2], strides[3]))
    block_x, block_j, warps = _tiles(geo, x0.element_size(), height, width)
    flags["num_warps"] = warps
    block_y = _rows_per_program(len(taps), height, max(1, block_x * block_j // (32 * warps)),
                                batch * channels * height * width // (block_x * block_j), target)
    align = _align(tensors) if cl else 1
    scaled = [s if d == 1 else s // align for t in tensors for d, s in enumerate(t.stride())]
    tiles_x = triton.cdiv(width, block_x)
    tiles_j = triton.cdiv(geo.inner, block_j)
    tiles_y = triton.cdiv(height, block_y)
    with device_guard(out):
        _degrade_kernel[(batch * geo.groups * tiles_y * tiles_j * tiles_x,)](
            out, deg, x0, other_t, *common, geo.groups, geo.inner, height, width, pad, len(taps),
            min(block_y + 2 * pad, height), tiles_x, tiles_j, tiles_y, 0 if cl else strides[1], 1 if cl else 0,
            *scaled, *scalars, ALIGN=align, COLS=len(taps) > 1, EVEN_J=geo.inner % block_j == 0, BLOCK_Y=block_y,
            BLOCK_X=block_x, BLOCK_J=block_j, **flags)
    return out, degraded


def _align(tensors) -> int:
    """The largest power of two ≤ 16 bytes / element dividing every stride but the channel one of
    every tensor (1 when one needs 64 bits)."""
    align = 16 // tensors[0].element_size()
    for t in tensors:
        for d, s in enumerate(t.stride()):
            if d == 1:
                continue
            if s >= 2**31:
                return 1
            while align > 1 and s % align:
                align //= 2
    return align


def _rows_per_program(k: int, height: int, per_thread: int, programs_at_1: int, target: int) -> int:
    """BLOCK_Y: the fewest multiply-adds per output (``gaussian_blur_2d._fma``) with the fp32
    accumulators ≤ 64 registers per thread, preferring launches of at least half ``target``
    programs."""
    options = [(programs_at_1 // block_y < target // 2, _fma(k, k, height, block_y), block_y)
               for block_y in (16, 8, 4, 2, 1)
               if block_y * per_thread <= 64 and block_y <= triton.next_power_of_2(height)]
    return min(options)[2]
