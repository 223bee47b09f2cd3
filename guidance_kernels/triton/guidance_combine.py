"""Triton kernels of the combine family: guidance_combine, apg_combine, cfg_zero_star_combine,
tcfg_combine, mag_combine.

Launch structure (B samples of ``inner`` elements, see :mod:`guidance_kernels._layout`):

* plain combine — ONE launch of ``_combine_kernel``: every program computes
  ``acc = D[base] + Σ g_t (D[pos_t] − D[neg_t])`` for BLOCK elements of one sample, in fp32, in
  the reference's operation order with FMA contraction disabled (one rounding per operation:
  the fp32 result is bit-identical to the eager formula), and stores it in the output dtype.
* with a per-sample reduction (rescale, APG, CFG-Zero*, TCFG, MAG) — TWO launches, no host sync:
  1. ``_moments_kernel``: each program takes one chunk of one sample and computes, for up to
     three fp32 "fields" of the data, the count, means and centred co-moments
     ``M_ij = Σ (f_i − mean_i)(f_j − mean_j)`` (merging BLOCK-sized tiles with Chan's formula;
     each tile's mean is taken relative to its first element, so a constant sample has exactly
     zero co-moments) and the raw dot products ``S_ij = Σ f_i f_j`` (plain sums, so an inf or a
     NaN propagates as in torch's sums). It writes one row of ``NSTAT`` floats per (sample,
     chunk): no atomics, deterministic.
  2. ``_combine_kernel`` / ``_projected_kernel``: every program first merges its sample's
     chunk rows (a few hundred floats, L2-resident) into per-sample moments, derives the
     per-sample coefficients (rescale ratio from the centred moments; APG projection, CFG-Zero*
     alpha, TCFG's projection, MAG's damped scale from the raw sums), then recomputes its
     elements from the inputs and writes the output. Recomputing instead of storing an
     intermediate keeps fp32 precision and moves no more bytes for two or three branches.

* CFG-Norm / Mahiro (``guidance_combine(cfg_norm=…)`` / ``(mahiro=True)``): channel-wise, on
  ``(B, C, *spatial)`` addressed through ``_layout.channel_geometry``; programs take BLOCK_P spatial
  positions of one sample and walk the channels in BLOCK_C blocks. CFG-Norm is ONE launch (a
  first channel sweep for the two norms per position, a second that writes); Mahiro TWO (per
  (sample, chunk of positions) sums of the channel cosine similarities, then the elementwise mix
  with the per-sample mean).

Fields per kind: KIND_COMBINE (ref, acc, 0); KIND_APG (cond, cond − uncond, running diff when a
momentum buffer is used); KIND_CFG0, KIND_TCFG, KIND_MAG (cond, cond − uncond, uncond). Every
output that needs a std is linear in the fields with per-sample coefficients, so its variance is
a quadratic form of the co-moments; the (cond, cond − uncond) basis avoids cancellation when
cond ≈ uncond. Comparisons that pick a minimum or maximum are written with ``tl.where`` so that
NaN propagates like ``torch.minimum``/``clamp`` on every target (``tl.minimum``/``tl.maximum``
drop NaN on a GPU and keep it in the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _layout, _spec
from .._layout import split_branches
from .._library import (ApgCombineArgs, CfgNormCombineArgs, CfgZeroStarCombineArgs, GuidanceCombineArgs,
                        MagCombineArgs, MahiroCombineArgs, TcfgCombineArgs)
from ._common import device_guard

BLOCK = 1024
NUM_WARPS = 4
NSTAT: tl.constexpr = tl.constexpr(16)  # n, mean0..2, M00 M11 M22 M01 M02 M12, S00 S11 S22 S01 S02 S12
KIND_COMBINE: tl.constexpr = tl.constexpr(0)
KIND_APG: tl.constexpr = tl.constexpr(1)
KIND_CFG0: tl.constexpr = tl.constexpr(2)
KIND_TCFG: tl.constexpr = tl.constexpr(3)
KIND_MAG: tl.constexpr = tl.constexpr(4)
NORMALIZE_EPS: tl.constexpr = tl.constexpr(_spec.NORMALIZE_EPS)
CFG_NORM_EPS: tl.constexpr = tl.constexpr(_spec.CFG_NORM_EPS)
COSINE_EPS: tl.constexpr = tl.constexpr(_spec.COSINE_EPS)
CFG0_EPS: tl.constexpr = tl.constexpr(_spec.CFG_ZERO_STAR_EPS)


# --------------------------------------------------------------------------- device helpers


@triton.jit
def _inner_offset(idx, n1, n2, s0, s1, s2, RANK: tl.constexpr):
    """Element offset of inner linear index ``idx`` (int64) for the (≤3-d) strided layout."""
    if RANK == 1:
        off = idx * s2
    elif RANK == 2:
        off = (idx // n2) * s1 + (idx % n2) * s2
    else:
        i2 = idx % n2
        rest = idx // n2
        off = (rest // n1) * s0 + (rest % n1) * s1 + i2 * s2
    return off


@triton.jit
def _tile(tiles, inner, bs, n1, n2, s0, s1, s2, RANK: tl.constexpr, BLOCK: tl.constexpr):
    """This program's sample, BLOCK inner indices, their mask and input offsets (1-D grid of
    ``batch * tiles`` programs: no grid-dimension limit on the batch)."""
    pid = tl.program_id(0)
    b = (pid // tiles).to(tl.int64)
    idx = (pid % tiles).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < inner
    return b, idx, mask, b * bs + _inner_offset(idx, n1, n2, s0, s1, s2, RANK)


@triton.jit
def _load(ptr, mask):
    return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _scale_at(value, ptr, stride, b, IS_TENSOR: tl.constexpr):
    """A guidance scale: the Python number ``value`` or ``ptr[b * stride]`` (stride 0: one scalar)."""
    if IS_TENSOR:
        value = tl.load(ptr + b * stride).to(tl.float32)
    return value


@triton.jit
def _linear(xs, off, mask, b, gs, gps, gss, BASE: tl.constexpr, TERMS: tl.constexpr, NT: tl.constexpr):
    """D[BASE] + Σ_t g_t (D[pos_t] − D[neg_t]) in fp32; TERMS[t] = (pos slot, neg slot, scale is tensor)."""
    acc = _load(xs[BASE] + off, mask)
    for t in tl.static_range(NT):
        g = _scale_at(gs[t], gps[t], gss[t], b, TERMS[t][2])
        acc = acc + g * (_load(xs[TERMS[t][0]] + off, mask) - _load(xs[TERMS[t][1]] + off, mask))
    return acc


@triton.jit
def _min_nan(a, b):
    """torch.minimum: NaN in either operand gives NaN."""
    return tl.where((a < b) | (a != a), a, b)


@triton.jit
def _max_nan(a, b):
    """torch.maximum / clamp_min: NaN in either operand gives NaN."""
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def _first(x, BLOCK: tl.constexpr):
    """Element 0 of a block, exactly (every other lane contributes a zero)."""
    return tl.sum(tl.where(tl.arange(0, BLOCK) == 0, x, 0.0), axis=0)


@triton.jit
def _centred(f, mask, n_t, BLOCK: tl.constexpr):
    """A tile's mean and deviations, the mean taken relative to the tile's first element so that a
    constant tile has exactly its value as mean and exactly zero deviations."""
    pivot = _first(f, BLOCK)
    mean = pivot + tl.sum(tl.where(mask, f - pivot, 0.0), axis=0) / tl.maximum(n_t, 1.0)
    return mean, tl.where(mask, f - mean, 0.0)


@triton.jit
def _sample_moments(row_ptr, num_parts, BLOCK_P: tl.constexpr):
    """Merge one sample's per-chunk rows into (n, means, centred co-moments, raw sums). The means
    are merged relative to row 0's (equal means stay exact, so do zero co-moments)."""
    p = tl.arange(0, BLOCK_P)
    valid = p < num_parts
    rows = row_ptr + p * NSTAT
    n_p = tl.load(rows, mask=valid, other=0.0)
    n = tl.sum(n_p, axis=0)
    a_p = tl.load(rows + 1, mask=valid, other=0.0)
    b_p = tl.load(rows + 2, mask=valid, other=0.0)
    c_p = tl.load(rows + 3, mask=valid, other=0.0)
    a0 = tl.load(row_ptr + 1)
    b0 = tl.load(row_ptr + 2)
    c0 = tl.load(row_ptr + 3)
    mean0 = a0 + tl.sum(tl.where(valid, n_p * (a_p - a0), 0.0), axis=0) / n
    mean1 = b0 + tl.sum(tl.where(valid, n_p * (b_p - b0), 0.0), axis=0) / n
    mean2 = c0 + tl.sum(tl.where(valid, n_p * (c_p - c0), 0.0), axis=0) / n
    d0 = tl.where(valid, a_p - mean0, 0.0)
    d1 = tl.where(valid, b_p - mean1, 0.0)
    d2 = tl.where(valid, c_p - mean2, 0.0)
    m00 = tl.sum(tl.load(rows + 4, mask=valid, other=0.0) + n_p * d0 * d0, axis=0)
    m11 = tl.sum(tl.load(rows + 5, mask=valid, other=0.0) + n_p * d1 * d1, axis=0)
    m22 = tl.sum(tl.load(rows + 6, mask=valid, other=0.0) + n_p * d2 * d2, axis=0)
    m01 = tl.sum(tl.load(rows + 7, mask=valid, other=0.0) + n_p * d0 * d1, axis=0)
    m02 = tl.sum(tl.load(rows + 8, mask=valid, other=0.0) + n_p * d0 * d2, axis=0)
    m12 = tl.sum(tl.load(rows + 9, mask=valid, other=0.0) + n_p * d1 * d2, axis=0)
    s00 = tl.sum(tl.load(rows + 10, mask=valid, other=0.0), axis=0)
    s11 = tl.sum(tl.load(rows + 11, mask=valid, other=0.0), axis=0)
    s22 = tl.sum(tl.load(rows + 12, mask=valid, other=0.0), axis=0)
    s01 = tl.sum(tl.load(rows + 13, mask=valid, other=0.0), axis=0)
    s02 = tl.sum(tl.load(rows + 14, mask=valid, other=0.0), axis=0)
    s12 = tl.sum(tl.load(rows + 15, mask=valid, other=0.0), axis=0)
    return n, m00, m11, m22, m01, m02, m12, s00, s11, s22, s01, s02, s12


@triton.jit
def _quadratic(a0, a1, a2, m00, m11, m22, m01, m02, m12):
    """aᵀ M a for the symmetric co-moment matrix M, clamped at 0 (rounding can go below; NaN stays)."""
    q = a0 * a0 * m00 + a1 * a1 * m11 + a2 * a2 * m22 + 2.0 * (a0 * a1 * m01 + a0 * a2 * m02 + a1 * a2 * m12)
    return tl.where(q < 0.0, 0.0, q)


@triton.jit
def _rescaled(out, m_ref, m_out, phi):
    """diffusers' rescale_noise_cfg with centred sums of squares (the n − 1 of the unbiased std
    is kept so that a one-element sample gives NaN exactly as torch.std does)."""
    return phi * (out * (tl.sqrt(m_ref) / tl.sqrt(m_out))) + (1.0 - phi) * out


@triton.jit
def _tcfg_coefficients(s_cu, s_cd, s_dd, poison):
    """(e_c·e_u, e_u²) of the Gram matrix's principal unit eigenvector (see ops.tcfg_combine);
    ``poison`` (‖c‖² + ‖u‖²) makes them NaN for a non-finite sample."""
    delta = 2.0 * s_cd - s_dd
    two_b = 2.0 * s_cu
    big = _max_nan(tl.abs(delta), tl.abs(two_b))
    unit = tl.where(big > 0.0, big, 1.0)
    x = delta / unit
    y = two_b / unit
    r = big * tl.sqrt(x * x + y * y) + (poison - poison)  # hypot without overflow
    degenerate = r == 0.0
    safe = tl.where(degenerate, 1.0, r)
    pq = s_cu / safe
    q = tl.where(delta >= 0.0, 2.0 * pq * (s_cu / (safe + delta)), (safe - delta) / (2.0 * safe))
    return tl.where(degenerate, 0.0, pq), tl.where(degenerate, 0.0, q)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _combine_kernel(out_ptr, xs, gs, gps, gss, stats_ptr, phi, phi_ptr, phi_stride,
                    inner, tiles, num_parts, n1, n2, s0, s1, s2, bs,
                    BASE: tl.constexpr, TERMS: tl.constexpr, NT: tl.constexpr, RESCALE: tl.constexpr,
                    PHI_TENSOR: tl.constexpr, RANK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    b, idx, mask, off = _tile(tiles, inner, bs, n1, n2, s0, s1, s2, RANK, BLOCK)
    acc = _linear(xs, off, mask, b, gs, gps, gss, BASE, TERMS, NT)
    if RESCALE:
        n, m00, m11, _m22, _m01, _m02, _m12, _s00, _s11, _s22, _s01, _s02, _s12 = _sample_moments(
            stats_ptr + b * num_parts * NSTAT, num_parts, BLOCK_P)
        phi = _scale_at(phi, phi_ptr, phi_stride, b, PHI_TENSOR)
        acc = _rescaled(acc, m00 / (n - 1.0), m11 / (n - 1.0), phi)
    tl.store(out_ptr + b * inner + idx, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _moments_kernel(stats_ptr, xs, gs, gps, gss, buf_ptr, momentum,
                    inner, chunk, chunk_tiles, num_parts, n1, n2, s0, s1, s2, bs,
                    KIND: tl.constexpr, BASE: tl.constexpr, TERMS: tl.constexpr, NT: tl.constexpr,
                    REF: tl.constexpr, COND: tl.constexpr, UNCOND: tl.constexpr, HAS_BUF: tl.constexpr,
                    RANK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // num_parts).to(tl.int64)
    part = pid % num_parts
    lo = part.to(tl.int64) * chunk
    hi = tl.minimum(lo + chunk, inner)
    count = 0.0
    mean0 = 0.0
    mean1 = 0.0
    mean2 = 0.0
    m00 = 0.0
    m11 = 0.0
    m22 = 0.0
    m01 = 0.0
    m02 = 0.0
    m12 = 0.0
    s00 = 0.0
    s11 = 0.0
    s22 = 0.0
    s01 = 0.0
    s02 = 0.0
    s12 = 0.0
    # A plain integer trip count (tensor-valued range bounds break Triton 3.6's interpreter); the
    # last chunk's trailing tiles are empty and contribute nothing (n_t = 0).
    for tile in range(0, chunk_tiles):
        idx = lo + tile * BLOCK + tl.arange(0, BLOCK)
        mask = idx < hi
        off = b * bs + _inner_offset(idx, n1, n2, s0, s1, s2, RANK)
        if KIND == KIND_COMBINE:
            f0 = _load(xs[REF] + off, mask)
            f1 = _linear(xs, off, mask, b, gs, gps, gss, BASE, TERMS, NT)
            f2 = tl.zeros_like(f0)
        else:
            f0 = _load(xs[COND] + off, mask)
            u = _load(xs[UNCOND] + off, mask)
            f1 = f0 - u
            if KIND == KIND_APG:
                if HAS_BUF:
                    f2 = f1 + momentum * _load(buf_ptr + b * inner + idx, mask)
                    tl.store(buf_ptr + b * inner + idx, f2.to(buf_ptr.dtype.element_ty), mask=mask)
                    f2 = f2.to(buf_ptr.dtype.element_ty).to(tl.float32)  # what pass 2 reads back
                else:
                    f2 = tl.zeros_like(f0)
            else:
                f2 = u
        f0 = tl.where(mask, f0, 0.0)
        f1 = tl.where(mask, f1, 0.0)
        f2 = tl.where(mask, f2, 0.0)
        n_t = tl.sum(mask.to(tl.float32), axis=0)
        t0, e0 = _centred(f0, mask, n_t, BLOCK)
        t1, e1 = _centred(f1, mask, n_t, BLOCK)
        t2, e2 = _centred(f2, mask, n_t, BLOCK)
        # Chan et al.: merge the tile's (n_t, t, e·e) into the running (count, mean, m).
        total = count + n_t
        weight = n_t / tl.maximum(total, 1.0)
        cross = count * weight
        d0 = t0 - mean0
        d1 = t1 - mean1
        d2 = t2 - mean2
        m00 += tl.sum(e0 * e0, axis=0) + d0 * d0 * cross
        m11 += tl.sum(e1 * e1, axis=0) + d1 * d1 * cross
        m22 += tl.sum(e2 * e2, axis=0) + d2 * d2 * cross
        m01 += tl.sum(e0 * e1, axis=0) + d0 * d1 * cross
        m02 += tl.sum(e0 * e2, axis=0) + d0 * d2 * cross
        m12 += tl.sum(e1 * e2, axis=0) + d1 * d2 * cross
        mean0 += d0 * weight
        mean1 += d1 * weight
        mean2 += d2 * weight
        s00 += tl.sum(f0 * f0, axis=0)
        s11 += tl.sum(f1 * f1, axis=0)
        s22 += tl.sum(f2 * f2, axis=0)
        s01 += tl.sum(f0 * f1, axis=0)
        s02 += tl.sum(f0 * f2, axis=0)
        s12 += tl.sum(f1 * f2, axis=0)
        count = total
    row = stats_ptr + (b * num_parts + part) * NSTAT
    tl.store(row + 0, count)
    tl.store(row + 1, mean0)
    tl.store(row + 2, mean1)
    tl.store(row + 3, mean2)
    tl.store(row + 4, m00)
    tl.store(row + 5, m11)
    tl.store(row + 6, m22)
    tl.store(row + 7, m01)
    tl.store(row + 8, m02)
    tl.store(row + 9, m12)
    tl.store(row + 10, s00)
    tl.store(row + 11, s11)
    tl.store(row + 12, s22)
    tl.store(row + 13, s01)
    tl.store(row + 14, s02)
    tl.store(row + 15, s12)


@triton.jit
def _projected_kernel(out_ptr, xs, stats_ptr, buf_ptr, w, w_ptr, w_stride, eta, threshold, alpha, phi, phi_ptr,
                      phi_stride, inner, tiles, num_parts, n1, n2, s0, s1, s2, bs,
                      KIND: tl.constexpr, COND: tl.constexpr, UNCOND: tl.constexpr, HAS_BUF: tl.constexpr,
                      FORMULATION: tl.constexpr, W_TENSOR: tl.constexpr, RESCALE: tl.constexpr,
                      PHI_TENSOR: tl.constexpr, RANK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """Second pass of APG (KIND_APG; FORMULATION = _spec.APG_FORMULATION_CODES), CFG-Zero*, TCFG
    and MAG (FORMULATION 1 = original formulation)."""
    b, idx, mask, off = _tile(tiles, inner, bs, n1, n2, s0, s1, s2, RANK, BLOCK)
    n, m00, m11, m22, m01, m02, m12, s00, s11, s22, s01, s02, s12 = _sample_moments(
        stats_ptr + b * num_parts * NSTAT, num_parts, BLOCK_P)
    w = _scale_at(w, w_ptr, w_stride, b, W_TENSOR)
    c = _load(xs[COND] + off, mask)
    u = _load(xs[UNCOND] + off, mask)
    # Every output is a_c·cond + a_r·(cond − uncond) + a_d·(field 2); (a_c, a_r, a_d) give its std.
    a_c = 1.0
    a_r = 0.0
    a_d = 0.0
    if KIND == KIND_APG:
        if FORMULATION >= 3:  # AdaptiveProjectedMix's CFG phase: plain CFG, the buffer was fed by pass 1
            d = c - u
            if FORMULATION == 3:
                out = u + w * d
                a_r = w - 1.0
            else:
                out = c + w * d
                a_r = w
        else:
            if HAS_BUF:
                d = _load(buf_ptr + b * inner + idx, mask)
                r_dd = s22
                r_dc = s02
            else:
                d = c - u
                r_dd = s11
                r_dc = s01
            f = 1.0
            if threshold > 0.0:
                f = _min_nan(1.0, threshold / tl.sqrt(r_dd))
            c_norm = _max_nan(tl.sqrt(s00), NORMALIZE_EPS)
            par_coef = (f * r_dc / c_norm) / c_norm  # par = ⟨f·d, c/‖c‖⟩ · c/‖c‖
            diff = f * d
            par = par_coef * c
            update = (diff - par) + eta * par
            if FORMULATION == 0:
                gain = w - 1.0
                out = c + gain * update
            elif FORMULATION == 1:
                gain = w
                out = u + gain * update
            else:
                gain = w
                out = c + gain * update
            a_c = 1.0 + gain * (eta - 1.0) * par_coef
            if FORMULATION == 1:
                a_r = -1.0
            if HAS_BUF:
                a_d = gain * f
            else:
                a_r = a_r + gain * f
    elif KIND == KIND_CFG0:
        alpha_s = s02 / (s22 + CFG0_EPS)
        u_alpha = u * alpha_s
        if FORMULATION == 0:
            out = u_alpha + w * (c - u_alpha)
            a_cond = w
            a_unc = alpha_s * (1.0 - w)
        else:
            out = c + w * (c - u_alpha)
            a_cond = 1.0 + w
            a_unc = -w * alpha_s
        # In the (cond, cond − uncond) basis: a_cond·cond + a_unc·uncond = (a_cond + a_unc)·cond − a_unc·(…).
        a_c = a_cond + a_unc
        a_r = -a_unc
    elif KIND == KIND_TCFG:
        pq, q = _tcfg_coefficients(s02, s01, s11, s00 + s22)
        u_t = pq * c + q * u
        if FORMULATION == 0:
            out = u_t + w * (c - u_t)
            a_cond = (1.0 - w) * pq + w
            a_unc = (1.0 - w) * q
        else:
            out = c + w * (c - u_t)
            a_cond = 1.0 + w - w * pq
            a_unc = -w * q
        a_c = a_cond + a_unc
        a_r = -a_unc
    else:  # KIND_MAG
        damp = tl.exp(-alpha * (tl.sqrt(s11) / tl.sqrt(s22)))
        d = c - u
        if FORMULATION == 0:
            gain = 1.0 + (w - 1.0) * damp
            out = u + gain * d
            a_r = gain - 1.0
        else:
            gain = w * damp
            out = c + gain * d
            a_r = gain
    if RESCALE:
        m_out = _quadratic(a_c, a_r, a_d, m00, m11, m22, m01, m02, m12)
        phi = _scale_at(phi, phi_ptr, phi_stride, b, PHI_TENSOR)
        out = _rescaled(out, m00 / (n - 1.0), m_out / (n - 1.0), phi)
    tl.store(out_ptr + b * inner + idx, out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers


def _geometry(plan: _layout.Plan) -> tuple[int, ...]:
    n0, n1, n2 = plan.sizes
    s0, s1, s2 = plan.strides
    return n1, n2, s0, s1, s2, plan.batch_stride


def _scale_args(numbers, tensors, dummy):
    """Per-term (value, pointer, stride, is-tensor) tuples; never empty (Triton needs a type)."""
    gs = tuple(float(x) for x in numbers) or (0.0,)
    gps = tuple(t if t is not None else dummy for t in tensors) or (dummy,)
    gss = tuple(0 if t is None or t.numel() == 1 else 1 for t in tensors) or (0,)
    flags = tuple(t is not None for t in tensors)
    return gs, gps, gss, flags


def _moments(plan, out, xs, *, kind, base=0, terms=((0, 0, False),), nt=0, gs=(0.0,), gps=None, gss=(0,),
             ref=0, cond=0, uncond=0, buf=None, momentum=0.0):
    parts, chunk = _layout.partitions(plan.batch, plan.inner, BLOCK, _layout.target_programs(out.device))
    stats = torch.empty((plan.batch, parts, 16), dtype=torch.float32, device=out.device)
    _moments_kernel[(plan.batch * parts,)](
        stats, xs, gs, gps if gps is not None else (out,), gss, buf if buf is not None else out, float(momentum),
        plan.inner, chunk, chunk // BLOCK, parts, *_geometry(plan),
        KIND=kind, BASE=base, TERMS=terms, NT=nt, REF=ref, COND=cond, UNCOND=uncond, HAS_BUF=buf is not None,
        RANK=plan.rank, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return stats, parts


def _phi_args(rescale, rescale_tensor, dummy):
    if rescale_tensor is None:
        return float(rescale), dummy, 0, False
    return 0.0, rescale_tensor, 0 if rescale_tensor.numel() == 1 else 1, True


def guidance_combine(a: GuidanceCombineArgs):
    base, pos, neg, rescale_ref = a.base, a.pos, a.neg, a.rescale_ref
    branches = split_branches(a.preds, a.num_branches)
    do_rescale = a.rescaling
    used = sorted({base, *pos, *neg, *([rescale_ref] if do_rescale else [])})
    slot = {k: i for i, k in enumerate(used)}
    out = _layout.output_like(branches[0])
    plan = _layout.plan([branches[k] for k in used], out)
    if out.numel() == 0:
        return out
    xs = plan.tensors
    gs, gps, gss, flags = _scale_args(a.scales, a.scale_tensors, out)
    terms = tuple((slot[p], slot[n], f) for p, n, f in zip(pos, neg, flags)) or ((0, 0, False),)
    tiles = triton.cdiv(plan.inner, BLOCK)
    with device_guard(out):
        stats, parts = out, 1
        if do_rescale:
            stats, parts = _moments(plan, out, xs, kind=0, base=slot[base], terms=terms, nt=len(pos), gs=gs,
                                    gps=gps, gss=gss, ref=slot[rescale_ref])
        phi, phi_ptr, phi_stride, phi_tensor = _phi_args(a.rescale, a.rescale_tensor, out)
        _combine_kernel[(plan.batch * tiles,)](
            out, xs, gs, gps, gss, stats, phi, phi_ptr, phi_stride,
            plan.inner, tiles, parts, *_geometry(plan),
            BASE=slot[base], TERMS=terms, NT=len(pos), RESCALE=do_rescale, PHI_TENSOR=phi_tensor, RANK=plan.rank,
            BLOCK=BLOCK, BLOCK_P=triton.next_power_of_2(parts), num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out


def _projected(kind, a, *, eta=1.0, threshold=0.0, alpha=0.0, momentum=0.0, buf=None, formulation=0):
    scale, scale_tensor, rescale, rescale_tensor = a.scale, a.scale_tensor, a.rescale, a.rescale_tensor
    branches = split_branches(a.preds, a.num_branches)
    out = _layout.output_like(branches[0])
    plan = _layout.plan([branches[a.cond], branches[a.uncond]], out)
    if out.numel() == 0:
        return out
    xs = plan.tensors
    do_rescale = a.rescaling
    tiles = triton.cdiv(plan.inner, BLOCK)
    w_ptr = scale_tensor if scale_tensor is not None else out
    w_stride = 0 if scale_tensor is None or scale_tensor.numel() == 1 else 1
    phi, phi_ptr, phi_stride, phi_tensor = _phi_args(rescale, rescale_tensor, out)
    with device_guard(out):
        stats, parts = _moments(plan, out, xs, kind=kind, cond=0, uncond=1, buf=buf, momentum=momentum)
        _projected_kernel[(plan.batch * tiles,)](
            out, xs, stats, buf if buf is not None else out, float(scale), w_ptr, w_stride, float(eta),
            float(threshold), float(alpha), phi, phi_ptr, phi_stride, plan.inner, tiles, parts, *_geometry(plan),
            KIND=kind, COND=0, UNCOND=1, HAS_BUF=buf is not None, FORMULATION=formulation,
            W_TENSOR=scale_tensor is not None, RESCALE=do_rescale, PHI_TENSOR=phi_tensor, RANK=plan.rank,
            BLOCK=BLOCK, BLOCK_P=triton.next_power_of_2(parts), num_warps=NUM_WARPS)
    return out


def apg_combine(a: ApgCombineArgs):
    return _projected(1, a, eta=a.eta, threshold=a.norm_threshold, momentum=a.momentum, buf=a.momentum_buffer,
                      formulation=_spec.APG_FORMULATION_CODES[a.formulation])


apg_combine_momentum = apg_combine  # the same launcher: the record carries the buffer


def cfg_zero_star_combine(a: CfgZeroStarCombineArgs):
    return _projected(2, a, formulation=int(a.original_formulation))


def tcfg_combine(a: TcfgCombineArgs):
    return _projected(3, a, formulation=int(a.original_formulation))


def mag_combine(a: MagCombineArgs):
    return _projected(4, a, alpha=a.alpha, formulation=int(a.original_formulation))


# --------------------------------------------------------------------------- channel-wise: CFG-Norm, Mahiro


@triton.jit
def _positions(tile, P, P2, bs, s1, s2, o1, o2, b, BLOCK_P: tl.constexpr):
    """Positions ``tile·BLOCK_P + [0, BLOCK_P)`` of sample b: mask, input and output offsets."""
    p = tile.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < P
    i1 = p // P2
    i2 = p % P2
    return pmask, b * bs + i1 * s1 + i2 * s2, i1 * o1 + i2 * o2


@triton.jit
def _channels(cb, C, cs, ocs, pin, pout, pmask, BLOCK_C: tl.constexpr):
    """Channel block cb: the 2-D (BLOCK_C, BLOCK_P) mask, input and output offsets."""
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask = (ch < C)[:, None] & pmask[None, :]
    return mask, pin[None, :] + ch[:, None] * cs, pout[None, :] + ch[:, None] * ocs


@triton.jit
def _signed_sqrt(x):
    """√|x|·sign(x) (NaN stays NaN through the square root)."""
    root = tl.sqrt(tl.abs(x))
    return tl.where(x < 0.0, -root, tl.where(x > 0.0, root, root * 0.0))


@triton.jit
def _cfg_norm_kernel(out_ptr, xs, gs, gps, gss, strength, st_ptr, st_stride,
                     C, P, P2, bs, cs, s1, s2, ocs, o1, o2, inner, tiles_p, c_blocks,
                     BASE: tl.constexpr, TERMS: tl.constexpr, NT: tl.constexpr, REF: tl.constexpr,
                     ST_TENSOR: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // tiles_p).to(tl.int64)
    pmask, pin, pout = _positions(pid % tiles_p, P, P2, bs, s1, s2, o1, o2, b, BLOCK_P)
    n_ref = tl.zeros((BLOCK_P,), dtype=tl.float32)
    n_out = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for cb in range(0, c_blocks):
        mask, off, _o = _channels(cb, C, cs, ocs, pin, pout, pmask, BLOCK_C)
        acc = _linear(xs, off, mask, b, gs, gps, gss, BASE, TERMS, NT)
        ref = _load(xs[REF] + off, mask)
        n_out += tl.sum(acc * acc, axis=0)
        n_ref += tl.sum(ref * ref, axis=0)
    # clamp(‖ref‖ / (‖out‖ + eps), 0, 1): the ratio is >= 0 or NaN, and NaN stays
    scale = _min_nan(tl.sqrt(n_ref) / (tl.sqrt(n_out) + CFG_NORM_EPS), 1.0)
    strength = _scale_at(strength, st_ptr, st_stride, b, ST_TENSOR)
    for cb in range(0, c_blocks):
        mask, off, o = _channels(cb, C, cs, ocs, pin, pout, pmask, BLOCK_C)
        acc = _linear(xs, off, mask, b, gs, gps, gss, BASE, TERMS, NT)
        tl.store(out_ptr + b * inner + o, ((acc * scale[None, :]) * strength).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mahiro_moments_kernel(stats_ptr, xs, gs, gps, gss, C, P, P2, bs, cs, s1, s2, chunk_tiles, num_parts, c_blocks,
                           BASE: tl.constexpr, TERMS: tl.constexpr, NT: tl.constexpr, COND: tl.constexpr,
                           UNCOND: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Σ over a chunk of positions of cos(√|s·u|·sign, √|merge|·sign) over the channels."""
    pid = tl.program_id(0)
    b = (pid // num_parts).to(tl.int64)
    part = pid % num_parts
    s = _scale_at(gs[0], gps[0], gss[0], b, TERMS[0][2])
    total = 0.0
    for t in range(0, chunk_tiles):
        pmask, pin, pout = _positions(part * chunk_tiles + t, P, P2, bs, s1, s2, 0, 0, b, BLOCK_P)
        dot = tl.zeros((BLOCK_P,), dtype=tl.float32)
        n_u = tl.zeros((BLOCK_P,), dtype=tl.float32)
        n_m = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for cb in range(0, c_blocks):
            mask, off, _o = _channels(cb, C, cs, 0, pin, pout, pmask, BLOCK_C)
            acc = _linear(xs, off, mask, b, gs, gps, gss, BASE, TERMS, NT)
            leap = _load(xs[COND] + off, mask) * s
            norm_u = _signed_sqrt(_load(xs[UNCOND] + off, mask) * s)
            norm_m = _signed_sqrt((leap + acc) / 2.0)
            dot += tl.sum(norm_u * norm_m, axis=0)
            n_u += tl.sum(norm_u * norm_u, axis=0)
            n_m += tl.sum(norm_m * norm_m, axis=0)
        cos = dot / (_max_nan(tl.sqrt(n_u), COSINE_EPS) * _max_nan(tl.sqrt(n_m), COSINE_EPS))
        total += tl.sum(tl.where(pmask, cos, 0.0), axis=0)
    tl.store(stats_ptr + pid, total)


@triton.jit
def _mahiro_kernel(out_ptr, xs, gs, gps, gss, stats_ptr, C, P, P2, bs, cs, s1, s2, ocs, o1, o2, inner, tiles_p,
                   num_parts, c_blocks, BASE: tl.constexpr, TERMS: tl.constexpr, NT: tl.constexpr,
                   COND: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_PARTS: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // tiles_p).to(tl.int64)
    pmask, pin, pout = _positions(pid % tiles_p, P, P2, bs, s1, s2, o1, o2, b, BLOCK_P)
    rows = tl.arange(0, BLOCK_PARTS)
    sim = tl.sum(tl.load(stats_ptr + b * num_parts + rows, mask=rows < num_parts, other=0.0), axis=0) / P
    k = 2.0 * (sim + 1.0)
    s = _scale_at(gs[0], gps[0], gss[0], b, TERMS[0][2])
    for cb in range(0, c_blocks):
        mask, off, o = _channels(cb, C, cs, ocs, pin, pout, pmask, BLOCK_C)
        acc = _linear(xs, off, mask, b, gs, gps, gss, BASE, TERMS, NT)
        leap = _load(xs[COND] + off, mask) * s
        tl.store(out_ptr + b * inner + o, ((k * acc + (4.0 - k) * leap) / 4.0).to(out_ptr.dtype.element_ty),
                 mask=mask)


def _channel_plan(a, wanted):
    """Output, the used branches (slots) and their channel geometry."""
    branches = split_branches(a.preds, a.num_branches)
    slot = {k: i for i, k in enumerate(sorted(set(wanted)))}
    out = _layout.output_like(branches[0])
    xs, geo = _layout.channel_plan([branches[k] for k in slot], out)
    return out, xs, slot, geo


def _channel_blocks(channels: int) -> tuple[int, int]:
    block_c = min(triton.next_power_of_2(channels), 16)
    return block_c, max(16, 1024 // block_c)


def guidance_combine_cfg_norm(a: CfgNormCombineArgs):
    out, xs, slot, geo = _channel_plan(a, [a.base, *a.pos, *a.neg, a.ref])
    if out.numel() == 0:
        return out
    channels, p1, p2, bs, cs, s1, s2, ocs, o1, o2 = geo
    positions = p1 * p2
    block_c, block_p = _channel_blocks(channels)
    tiles_p = triton.cdiv(positions, block_p)
    gs, gps, gss, flags = _scale_args(a.scales, a.scale_tensors, out)
    terms = tuple((slot[p], slot[n], f) for p, n, f in zip(a.pos, a.neg, flags)) or ((0, 0, False),)
    strength, st_ptr, st_stride, st_tensor = _phi_args(a.strength, a.strength_tensor, out)
    with device_guard(out):
        _cfg_norm_kernel[(out.shape[0] * tiles_p,)](
            out, xs, gs, gps, gss, strength, st_ptr, st_stride, channels, positions, p2, bs, cs, s1, s2, ocs, o1, o2,
            out[0].numel(), tiles_p, triton.cdiv(channels, block_c),
            BASE=slot[a.base], TERMS=terms, NT=len(a.pos), REF=slot[a.ref], ST_TENSOR=st_tensor,
            BLOCK_C=block_c, BLOCK_P=block_p, num_warps=NUM_WARPS)
    return out


def guidance_combine_mahiro(a: MahiroCombineArgs):
    out, xs, slot, geo = _channel_plan(a, [a.base, *a.pos, *a.neg])
    if out.numel() == 0:
        return out
    channels, p1, p2, bs, cs, s1, s2, ocs, o1, o2 = geo
    positions = p1 * p2
    batch = out.shape[0]
    block_c, block_p = _channel_blocks(channels)
    tiles_p = triton.cdiv(positions, block_p)
    parts, chunk = _layout.partitions(batch, positions, block_p, _layout.target_programs(out.device))
    gs, gps, gss, flags = _scale_args(a.scales, a.scale_tensors, out)
    terms = tuple((slot[p], slot[n], f) for p, n, f in zip(a.pos, a.neg, flags))
    c_blocks = triton.cdiv(channels, block_c)
    common = dict(BASE=slot[a.base], TERMS=terms, NT=len(a.pos), BLOCK_C=block_c, BLOCK_P=block_p,
                  num_warps=NUM_WARPS)
    with device_guard(out):
        stats = torch.empty((batch, parts), dtype=torch.float32, device=out.device)
        _mahiro_moments_kernel[(batch * parts,)](
            stats, xs, gs, gps, gss, channels, positions, p2, bs, cs, s1, s2, chunk // block_p, parts, c_blocks,
            COND=slot[a.pos[0]], UNCOND=slot[a.neg[0]], **common)
        _mahiro_kernel[(batch * tiles_p,)](
            out, xs, gs, gps, gss, stats, channels, positions, p2, bs, cs, s1, s2, ocs, o1, o2, out[0].numel(), tiles_p,
            parts, c_blocks, COND=slot[a.pos[0]], BLOCK_PARTS=triton.next_power_of_2(parts), **common)
    return out
