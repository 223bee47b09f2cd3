"""Triton kernel of sag_degrade: threshold + nearest map lookup + Gaussian blur + blend + re-noise
in ONE launch.

One program computes a ``BLOCK_H × BLOCK_W`` tile of one (sample, channel) plane:

* blur: the k×k separable Gaussian ``Σ_i w_i Σ_j w_j x[ry_i, rx_j]`` in fp32, with reflect-padded
  indices (``|i|`` below 0, ``2(n−1) − i`` past the end; the public function guarantees
  ``n > k // 2`` so one reflection suffices). A runtime loop over the k rows of taps gathers a
  (rows, cols, taps) block per row — the reflected column offsets are computed once — and reduces
  it along the taps with the weight vector. The gathers hit L1: each input value is read by the k²
  neighbouring outputs of the same tile. (Unrolling all k² taps instead made ptxas hoist every
  load: 255 registers and spills on sm_90.)
* mask: the (B|1, h, w) map at the nearest source cell ``min(floor(y·scale_y), h − 1)`` with the
  float32 scale of ``F.interpolate(mode="nearest")`` (``_spec.nearest_scale``), thresholded
  ``> threshold`` for a key mass, used as blend weight for a ready mask.
* ``degraded = blurred·m + x0·(1 − m)``, then the re-noise (RENOISE 0 none, 1 DDPM with per-sample
  ᾱ, 2 k-diffusion ``(degraded + x_t) − x0``) and the store in x0's dtype.

Every tensor is addressed through its own (b, c, y, x) strides (int64 offsets), so strided and
channels-last inputs need no copies. Masked lanes never touch memory.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import _layout
from ..backends import triton_interpreter
from .._library import SagDegradeArgs
from .._spec import RENOISE, blur_taps, nearest_scale
from ._common import device_guard

BLOCK_H = 8
BLOCK_W = 32
NUM_WARPS = 4
# The interpreter (TRITON_INTERPRET=1, tests only) costs ~50 ms per program whatever the tile size:
# it gets bigger tiles so that test latents take a few programs. Same kernel, other constexprs.
INTERPRETER_BLOCK_H = 32
INTERPRETER_BLOCK_W = 64


@triton.jit
def _reflect(i, n):
    """Reflect-pad index (PyTorch "reflect": the edge is not repeated), valid for −n < i < 2n − 1,
    which covers every tap of every in-image output (n > k // 2). Lanes outside the image compute
    garbage indices but are masked: they never touch memory."""
    i = tl.abs(i)
    return tl.where(i >= n, 2 * n - 2 - i, i)


@triton.jit
def _nearest(dst, scale, in_size):
    """ATen's nearest source index: min(floor(float(dst) · scale), in − 1), float32."""
    src = tl.floor(dst.to(tl.float32) * scale).to(tl.int32)
    return tl.minimum(src, in_size - 1)


@triton.jit
def _degrade_kernel(out_ptr, deg_ptr, x_ptr, other_ptr, map_ptr, alpha_ptr,
                    channels, height, width, tiles_w, tiles,
                    sxb, sxc, sxh, sxw, sob, soc, soh, sow, s2b, s2c, s2h, s2w,
                    map_h, map_w, smb, smh, smw, scale_y, scale_x, threshold, alpha, alpha_stride, ws,
                    K: tl.constexpr, KP: tl.constexpr, THRESHOLDED: tl.constexpr, RENOISE_MODE: tl.constexpr,
                    ALPHA_TENSOR: tl.constexpr, WRITE_DEGRADED: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    pid = tl.program_id(0)
    plane = pid // tiles
    tile = pid % tiles
    b = (plane // channels).to(tl.int64)
    c = (plane % channels).to(tl.int64)
    ys = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
    xs = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
    valid = (ys < height)[:, None] & (xs < width)[None, :]
    x_base = x_ptr + b * sxb + c * sxc
    R: tl.constexpr = K // 2

    # Separable blur over a (rows, cols, taps) block: per row of taps i, one gather of the KP
    # horizontal taps of every output (the column offsets, reflected once, are reused by every
    # row), reduced along the taps with the weight vector, then weighted by w_i. Taps k >= K are
    # masked and weigh 0.
    taps = tl.arange(0, KP)
    w = tl.zeros([KP], dtype=tl.float32)
    for t in tl.static_range(K):
        w = tl.where(taps == t, ws[t], w)
    col_off = _reflect(xs[:, None] + (taps[None, :] - R), width).to(tl.int64) * sxw
    tap_mask = valid[:, :, None] & (taps < K)[None, None, :]
    blurred = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    for i in range(0, K):
        w_i = tl.sum(tl.where(taps == i, w, 0.0), axis=0)
        row_off = _reflect(ys + (i - R), height).to(tl.int64) * sxh
        vals = tl.load(x_base + row_off[:, None, None] + col_off[None, :, :], mask=tap_mask, other=0.0)
        blurred += w_i * tl.sum(vals.to(tl.float32) * w[None, None, :], axis=2)

    yo = ys.to(tl.int64)[:, None]
    xo = xs.to(tl.int64)[None, :]
    x0 = tl.load(x_base + yo * sxh + xo * sxw, mask=valid, other=0.0).to(tl.float32)
    my = _nearest(ys, scale_y, map_h).to(tl.int64)[:, None]
    mx = _nearest(xs, scale_x, map_w).to(tl.int64)[None, :]
    m = tl.load(map_ptr + b * smb + my * smh + mx * smw, mask=valid, other=0).to(tl.float32)
    if THRESHOLDED:
        m = tl.where(m > threshold, 1.0, 0.0)
    degraded = blurred * m + x0 * (1.0 - m)

    o_off = b * sob + c * soc + yo * soh + xo * sow
    if RENOISE_MODE == 1:
        if ALPHA_TENSOR:
            alpha = tl.load(alpha_ptr + b * alpha_stride).to(tl.float32)
        eps = tl.load(other_ptr + b * s2b + c * s2c + yo * s2h + xo * s2w, mask=valid, other=0.0).to(tl.float32)
        result = tl.sqrt_rn(alpha) * degraded + tl.sqrt_rn(1.0 - alpha) * eps
    elif RENOISE_MODE == 2:
        x_t = tl.load(other_ptr + b * s2b + c * s2c + yo * s2h + xo * s2w, mask=valid, other=0.0).to(tl.float32)
        result = (degraded + x_t) - x0
    else:
        result = degraded
    tl.store(out_ptr + o_off, result.to(out_ptr.dtype.element_ty), mask=valid)
    if WRITE_DEGRADED:
        tl.store(deg_ptr + o_off, degraded.to(deg_ptr.dtype.element_ty), mask=valid)


def sag_degrade(a: SagDegradeArgs):
    x0, thresholded, threshold = a.x0, a.thresholded, a.threshold
    taps = blur_taps(a.kernel_size, a.sigma)  # zero-weight taps dropped
    kernel_size = len(taps)
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
    block_h, block_w = (INTERPRETER_BLOCK_H, INTERPRETER_BLOCK_W) if triton_interpreter() else (BLOCK_H, BLOCK_W)
    tiles_w = triton.cdiv(width, block_w)
    tiles = triton.cdiv(height, block_h) * tiles_w
    with device_guard(out):
        _degrade_kernel[(batch * channels * tiles,)](
            out, degraded if return_degraded else out, x0, other_t, mask_map, alpha_t,
            channels, height, width, tiles_w, tiles,
            *x0.stride(), *out.stride(), *other_t.stride(),
            map_h, map_w, mask_map.stride(0) if map_b > 1 else 0, mask_map.stride(1), mask_map.stride(2),
            nearest_scale(map_h, height), nearest_scale(map_w, width), float(threshold), float(alpha),
            alpha_stride, taps,
            K=kernel_size, KP=triton.next_power_of_2(kernel_size), THRESHOLDED=bool(thresholded), RENOISE_MODE=RENOISE[renoise],
            ALPHA_TENSOR=alpha_tensor is not None, WRITE_DEGRADED=bool(return_degraded),
            BLOCK_H=block_h, BLOCK_W=block_w, num_warps=NUM_WARPS)
    return out, degraded
