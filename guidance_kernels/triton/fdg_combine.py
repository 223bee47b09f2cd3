"""Triton kernels of fdg_combine (the algorithm: guidance_kernels.ops.fdg_combine).

Launches, B samples of C' = prod(dims 1..−3) channels, L levels, no host sync:

1. ``_down_kernel`` per level i = 1 … L−1: ``G_i = pyrdown(G_{i−1})`` of d = cond − uncond (and of
   cond when some level needs statistics), as one 6×6 stencil per output pixel (kornia's blur and
   bilinear halving composed: ``[1, 5, 10, 10, 5, 1]/32`` per axis on the reflected source). Level
   0 is read straight from the predictions through kornia's power-of-two reflect padding, so no
   padded copy is made. Levels ≥ 1 are small fp32 buffers (a quarter, a sixteenth, …).
2. ``_stats_kernel`` for each level that needs them (a projection on cond, a frequency-space
   rescale): per (sample, chunk) rows of the count, means and centred co-moments of
   (Lc_i, Ld_i) and the raw sums ⟨Lc, Lc⟩, ⟨Ld, Lc⟩, with ``L_i = G_i − pyrup(G_{i+1})`` evaluated
   on the fly (pyrup as a 5×5 stencil from ``_spec.pyrup_table``).
3. ``_coef_kernel`` (one program per sample): every level's guided value ``a_i·Lc_i + b_i·Ld_i``
   and whether it is guided (a kept level, scale exactly 1 — 0 for the original formulation —
   is cond's and never reads uncond: the d terms at level i are taken only where level i or
   i − 1 is guided, as the anchor reads uncond).
4. ``_recon_kernel`` for i = L−1 … 1 when L ≥ 3: ``R_i = (a_i − a_{i−1}) G_i(c) + (b_i − b_{i−1})
   G_i(d) + pyrup(R_{i+1})``.
5. ``_final_kernel`` over the (H, W) crop: ``a_0·c + b_0·d + pyrup(R_1)`` (L = 2: R_1 from G_1
   directly), written in the output's layout. A data-space rescale adds ``_final_moments_kernel``
   before it (rows of the moments of (cond, out), out in fp32) and the final pass, which
   recomputes out, applies diffusers' rescale: out is never rounded to a 16-bit dtype first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _layout, _spec
from .._layout import split_branches
from .._library import FdgCombineArgs
from ._common import device_guard
from .guidance_combine import _centred, _max_nan, _rescaled, _scale_at

BLOCK = 256
NUM_WARPS = 4
NROW: tl.constexpr = tl.constexpr(8)  # n, mean_c, mean_d, M_cc, M_dd, M_cd, S_cc, S_cd
DOWN: tl.constexpr = tl.constexpr(_spec.PYR_DOWN)
NORMALIZE_EPS: tl.constexpr = tl.constexpr(_spec.NORMALIZE_EPS)


# --------------------------------------------------------------------------- stencils


@triton.jit
def _reflect(i, n):
    """F.pad(mode="reflect")'s source index (one reflection)."""
    i = tl.where(i < 0, -i, i)
    return tl.where(i >= n, 2 * (n - 1) - i, i)


@triton.jit
def _coords(idx, h, w):
    """(plane = b·C' + channel, y, x) of a flat index over (B, C', h, w) row-major."""
    x = idx % w
    rest = idx // w
    return rest // h, rest % h, x


@triton.jit
def _level0(ptr, plane, y, x, mask, channels, bs, cs, ys, xs, H, W):
    """The prediction at (plane, y, x) of kornia's padded level 0 (reflect beyond (H, W))."""
    y = tl.where(y >= H, 2 * (H - 1) - y, y)
    x = tl.where(x >= W, 2 * (W - 1) - x, x)
    off = (plane // channels) * bs + (plane % channels) * cs + y * ys + x * xs
    return tl.load(ptr + off, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _up(src, plane, y, x, mask, hs, ws, tab_y, tab_x):
    """pyrup of the (hs, ws) fp32 level ``src`` at (y, x) of the doubled grid: 5×5 taps with the
    per-axis weights of ``_spec.pyrup_table``. Zero-weight taps are skipped, not multiplied: a
    non-finite pixel outside kornia's footprint must not turn into NaN (0·inf)."""
    base = src + plane * (hs * ws)
    acc = tl.zeros(y.shape, dtype=tl.float32)
    for ty in tl.static_range(5):
        wy = tl.load(tab_y + y * 5 + ty, mask=mask, other=0.0)
        sy = tl.minimum(tl.maximum(y // 2 - 2 + ty, 0), hs - 1)
        row = tl.zeros(y.shape, dtype=tl.float32)
        for tx in tl.static_range(5):
            wx = tl.load(tab_x + x * 5 + tx, mask=mask, other=0.0)
            sx = tl.minimum(tl.maximum(x // 2 - 2 + tx, 0), ws - 1)
            tap = tl.load(base + sy * ws + sx, mask=mask & (wx != 0.0) & (wy != 0.0), other=0.0)
            row += tl.where(wx != 0.0, wx * tap, 0.0)
        acc += tl.where(wy != 0.0, wy * row, 0.0)
    return acc


# --------------------------------------------------------------------------- kernels


@triton.jit
def _down_kernel(dst_d, dst_c, src_d, src_c, c_ptr, u_ptr, total, hs, ws, hd, wd, channels,
                 cbs, ccs, cys, cxs, ubs, ucs, uys, uxs, H, W,
                 FIRST: tl.constexpr, WITH_C: tl.constexpr, BLOCK: tl.constexpr):
    """G_{i+1} = pyrdown(G_i) at (hd, wd) from the (hs, ws) level; FIRST: from the predictions."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    plane, y, x = _coords(idx, hd, wd)
    acc_d = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_c = tl.zeros((BLOCK,), dtype=tl.float32)
    for ty in tl.static_range(6):
        ry = _reflect(2 * y - 2 + ty, hs)
        row_d = tl.zeros((BLOCK,), dtype=tl.float32)
        row_c = tl.zeros((BLOCK,), dtype=tl.float32)
        for tx in tl.static_range(6):
            rx = _reflect(2 * x - 2 + tx, ws)
            if FIRST:
                c = _level0(c_ptr, plane, ry, rx, mask, channels, cbs, ccs, cys, cxs, H, W)
                d = c - _level0(u_ptr, plane, ry, rx, mask, channels, ubs, ucs, uys, uxs, H, W)
            else:
                at = plane * (hs * ws) + ry * ws + rx
                d = tl.load(src_d + at, mask=mask, other=0.0)
                if WITH_C:
                    c = tl.load(src_c + at, mask=mask, other=0.0)
            row_d += DOWN[tx] * d
            if WITH_C:
                row_c += DOWN[tx] * c
        acc_d += DOWN[ty] * row_d
        if WITH_C:
            acc_c += DOWN[ty] * row_c
    tl.store(dst_d + idx, acc_d, mask=mask)
    if WITH_C:
        tl.store(dst_c + idx, acc_c, mask=mask)


@triton.jit
def _laplacian(g_c, g_d, n_c, n_d, c_ptr, u_ptr, plane, y, x, mask, h, w, hn, wn, tab_y, tab_x, channels,
               cbs, ccs, cys, cxs, ubs, ucs, uys, uxs, H, W, LEVEL0: tl.constexpr, LAST: tl.constexpr):
    """(Lc, Ld) of the level at (plane, y, x): G − pyrup(G_next) (the coarsest level is G itself)."""
    if LEVEL0:
        c = _level0(c_ptr, plane, y, x, mask, channels, cbs, ccs, cys, cxs, H, W)
        d = c - _level0(u_ptr, plane, y, x, mask, channels, ubs, ucs, uys, uxs, H, W)
    else:
        at = plane * (h * w) + y * w + x
        c = tl.load(g_c + at, mask=mask, other=0.0)
        d = tl.load(g_d + at, mask=mask, other=0.0)
    if not LAST:
        c = c - _up(n_c, plane, y, x, mask, hn, wn, tab_y, tab_x)
        d = d - _up(n_d, plane, y, x, mask, hn, wn, tab_y, tab_x)
    return c, d


@triton.jit
def _stats_kernel(stats_ptr, g_c, g_d, n_c, n_d, c_ptr, u_ptr, inner, chunk_tiles, num_parts, h, w, hn, wn,
                  tab_y, tab_x, channels, cbs, ccs, cys, cxs, ubs, ucs, uys, uxs, H, W,
                  LEVEL0: tl.constexpr, LAST: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // num_parts).to(tl.int64)
    part = pid % num_parts
    lo = part.to(tl.int64) * (chunk_tiles * BLOCK)
    hi = tl.minimum(lo + chunk_tiles * BLOCK, inner)
    count = 0.0
    mean_c = 0.0
    mean_d = 0.0
    m_cc = 0.0
    m_dd = 0.0
    m_cd = 0.0
    s_cc = 0.0
    s_cd = 0.0
    for tile in range(0, chunk_tiles):
        local = lo + tile * BLOCK + tl.arange(0, BLOCK)
        mask = local < hi
        plane, y, x = _coords(b * inner + local, h, w)
        lc, ld = _laplacian(g_c, g_d, n_c, n_d, c_ptr, u_ptr, plane, y, x, mask, h, w, hn, wn, tab_y, tab_x,
                            channels, cbs, ccs, cys, cxs, ubs, ucs, uys, uxs, H, W, LEVEL0, LAST)
        lc = tl.where(mask, lc, 0.0)
        ld = tl.where(mask, ld, 0.0)
        n_t = tl.sum(mask.to(tl.float32), axis=0)
        t_c, e_c = _centred(lc, mask, n_t, BLOCK)
        t_d, e_d = _centred(ld, mask, n_t, BLOCK)
        total = count + n_t
        weight = n_t / tl.maximum(total, 1.0)
        cross = count * weight
        dc = t_c - mean_c
        dd = t_d - mean_d
        m_cc += tl.sum(e_c * e_c, axis=0) + dc * dc * cross
        m_dd += tl.sum(e_d * e_d, axis=0) + dd * dd * cross
        m_cd += tl.sum(e_c * e_d, axis=0) + dc * dd * cross
        mean_c += dc * weight
        mean_d += dd * weight
        s_cc += tl.sum(lc * lc, axis=0)
        s_cd += tl.sum(ld * lc, axis=0)
        count = total
    row = stats_ptr + pid * NROW
    tl.store(row + 0, count)
    tl.store(row + 1, mean_c)
    tl.store(row + 2, mean_d)
    tl.store(row + 3, m_cc)
    tl.store(row + 4, m_dd)
    tl.store(row + 5, m_cd)
    tl.store(row + 6, s_cc)
    tl.store(row + 7, s_cd)


@triton.jit
def _level_moments(row_ptr, num_parts, BLOCK_P: tl.constexpr):
    """Merge a sample's rows of one level: (n, M_cc, M_dd, M_cd, S_cc, S_cd) (means merged relative
    to row 0's, as the combine family does)."""
    p = tl.arange(0, BLOCK_P)
    valid = p < num_parts
    rows = row_ptr + p * NROW
    n_p = tl.load(rows, mask=valid, other=0.0)
    n = tl.sum(n_p, axis=0)
    a_p = tl.load(rows + 1, mask=valid, other=0.0)
    b_p = tl.load(rows + 2, mask=valid, other=0.0)
    a0 = tl.load(row_ptr + 1)
    b0 = tl.load(row_ptr + 2)
    mean_c = a0 + tl.sum(tl.where(valid, n_p * (a_p - a0), 0.0), axis=0) / n
    mean_d = b0 + tl.sum(tl.where(valid, n_p * (b_p - b0), 0.0), axis=0) / n
    dc = tl.where(valid, a_p - mean_c, 0.0)
    dd = tl.where(valid, b_p - mean_d, 0.0)
    m_cc = tl.sum(tl.load(rows + 3, mask=valid, other=0.0) + n_p * dc * dc, axis=0)
    m_dd = tl.sum(tl.load(rows + 4, mask=valid, other=0.0) + n_p * dd * dd, axis=0)
    m_cd = tl.sum(tl.load(rows + 5, mask=valid, other=0.0) + n_p * dc * dd, axis=0)
    s_cc = tl.sum(tl.load(rows + 6, mask=valid, other=0.0), axis=0)
    s_cd = tl.sum(tl.load(rows + 7, mask=valid, other=0.0), axis=0)
    return n, m_cc, m_dd, m_cd, s_cc, s_cd


@triton.jit
def _coef_kernel(coef_ptr, gs, gps, gss, weights, phis, pps, pss, stats, parts,
                 LEVELS: tl.constexpr, S_TENSOR: tl.constexpr, PHI_TENSOR: tl.constexpr, PROJECT: tl.constexpr,
                 RESCALE: tl.constexpr, ORIGINAL: tl.constexpr, BLOCK_P: tl.constexpr):
    """coef[b, i] = (a_i, b_i, guided): level i's value a_i·Lc_i + b_i·Ld_i."""
    b = tl.program_id(0).to(tl.int64)
    for i in tl.static_range(LEVELS):
        s = _scale_at(gs[i], gps[i], gss[i], b, S_TENSOR[i])
        if ORIGINAL:
            coef_b = s
            off = 0.0
        else:
            coef_b = s - 1.0
            off = 1.0
        coef_a = s * 0.0 + 1.0
        if PROJECT[i] or RESCALE[i]:
            n, m_cc, m_dd, m_cd, s_cc, s_cd = _level_moments(stats[i] + b * parts[i] * NROW, parts[i], BLOCK_P)
            if PROJECT[i]:
                norm = _max_nan(tl.sqrt(s_cc), NORMALIZE_EPS)  # F.normalize's clamp
                coef_a = 1.0 + s * (weights[i] - 1.0) * ((s_cd / norm) / norm)
            if RESCALE[i]:
                phi = _scale_at(phis[i], pps[i], pss[i], b, PHI_TENSOR[i])
                var = coef_a * coef_a * m_cc + 2.0 * coef_a * coef_b * m_cd + coef_b * coef_b * m_dd
                var = tl.where(var < 0.0, 0.0, var)
                ratio = tl.sqrt(m_cc / (n - 1.0)) / tl.sqrt(var / (n - 1.0))
                rho = phi * ratio + (1.0 - phi)
                coef_a = coef_a * rho
                coef_b = coef_b * rho
        keep = s == off  # diffusers' isclose(scale, 1 or 0): the level stays cond's
        tl.store(coef_ptr + (b * LEVELS + i) * 3, tl.where(keep, 1.0, coef_a))
        tl.store(coef_ptr + (b * LEVELS + i) * 3 + 1, tl.where(keep, 0.0, coef_b))
        tl.store(coef_ptr + (b * LEVELS + i) * 3 + 2, tl.where(keep, 0.0, 1.0))


@triton.jit
def _coef(coef_ptr, plane, channels, levels, i):
    """(a_i, b_i, active_i) of each element's sample (active 0: the level keeps cond's)."""
    at = ((plane // channels) * levels + i) * 3
    return tl.load(coef_ptr + at), tl.load(coef_ptr + at + 1), tl.load(coef_ptr + at + 2)


@triton.jit
def _recon_kernel(dst, g_c, g_d, nxt, coef_ptr, total, h, w, hn, wn, tab_y, tab_x, channels, levels, level,
                  WITH_C: tl.constexpr, HAS_UP: tl.constexpr, BLOCK: tl.constexpr):
    """R_i = (a_i − a_{i−1}) G_i(c) + (b_i − b_{i−1}) G_i(d) + pyrup(R_{i+1})."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    plane, y, x = _coords(idx, h, w)
    a_i, b_i, on_i = _coef(coef_ptr, plane, channels, levels, level)
    a_p, b_p, on_p = _coef(coef_ptr, plane, channels, levels, level - 1)
    # uncond enters G_i(d) only where the anchor reads it: level i or i − 1 guided
    value = tl.where(on_i + on_p > 0.0, (b_i - b_p) * tl.load(g_d + idx, mask=mask, other=0.0), 0.0)
    if WITH_C:
        value += (a_i - a_p) * tl.load(g_c + idx, mask=mask, other=0.0)
    if HAS_UP:
        value += _up(nxt, plane, y, x, mask, hn, wn, tab_y, tab_x)
    tl.store(dst + idx, value, mask=mask)


@triton.jit
def _final_value(c_ptr, u_ptr, g_c, g_d, coef_ptr, idx, mask, hn, wn, tab_y, tab_x, channels, levels,
                 cbs, ccs, cys, cxs, ubs, ucs, uys, uxs, H, W, MODE: tl.constexpr, WITH_C: tl.constexpr):
    """(plane, y, x, cond, out) at flat indices idx of the (B, C', H, W) crop: out = a_0·c + b_0·d +
    pyrup(R_1). MODE 0: one level; 1: two levels (R_1 from G_1(d) and G_1(c)); 2: more (R_1 in g_d)."""
    plane, y, x = _coords(idx, H, W)
    bb = plane // channels
    ch = plane % channels
    c = tl.load(c_ptr + bb * cbs + ch * ccs + y * cys + x * cxs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + bb * ubs + ch * ucs + y * uys + x * uxs, mask=mask, other=0.0).to(tl.float32)
    a0, b0, on0 = _coef(coef_ptr, plane, channels, levels, 0)
    out = a0 * c + tl.where(on0 > 0.0, b0 * (c - u), 0.0)
    if MODE == 1:
        a1, b1, on1 = _coef(coef_ptr, plane, channels, levels, 1)
        out += tl.where(on0 + on1 > 0.0, (b1 - b0) * _up(g_d, plane, y, x, mask, hn, wn, tab_y, tab_x), 0.0)
        if WITH_C:
            out += (a1 - a0) * _up(g_c, plane, y, x, mask, hn, wn, tab_y, tab_x)
    elif MODE == 2:
        out += _up(g_d, plane, y, x, mask, hn, wn, tab_y, tab_x)
    return plane, y, x, c, out


@triton.jit
def _final_moments_kernel(stats_ptr, c_ptr, u_ptr, g_c, g_d, coef_ptr, inner, chunk_tiles, num_parts, hn, wn,
                          tab_y, tab_x, channels, levels, cbs, ccs, cys, cxs, ubs, ucs, uys, uxs, H, W,
                          MODE: tl.constexpr, WITH_C: tl.constexpr, BLOCK: tl.constexpr):
    """Data-space rescale, pass 1: rows of the moments of (cond, out) over each sample's crop, out in
    fp32 (never rounded to the output dtype before the rescale)."""
    pid = tl.program_id(0)
    b = (pid // num_parts).to(tl.int64)
    part = pid % num_parts
    lo = part.to(tl.int64) * (chunk_tiles * BLOCK)
    hi = tl.minimum(lo + chunk_tiles * BLOCK, inner)
    count = 0.0
    mean_c = 0.0
    mean_o = 0.0
    m_cc = 0.0
    m_oo = 0.0
    m_co = 0.0
    for tile in range(0, chunk_tiles):
        local = lo + tile * BLOCK + tl.arange(0, BLOCK)
        mask = local < hi
        _p, _y, _x, c, out = _final_value(c_ptr, u_ptr, g_c, g_d, coef_ptr, b * inner + local, mask, hn, wn, tab_y,
                                          tab_x, channels, levels, cbs, ccs, cys, cxs, ubs, ucs, uys, uxs, H, W,
                                          MODE, WITH_C)
        c = tl.where(mask, c, 0.0)
        out = tl.where(mask, out, 0.0)
        n_t = tl.sum(mask.to(tl.float32), axis=0)
        t_c, e_c = _centred(c, mask, n_t, BLOCK)
        t_o, e_o = _centred(out, mask, n_t, BLOCK)
        total = count + n_t
        weight = n_t / tl.maximum(total, 1.0)
        cross = count * weight
        dc = t_c - mean_c
        do = t_o - mean_o
        m_cc += tl.sum(e_c * e_c, axis=0) + dc * dc * cross
        m_oo += tl.sum(e_o * e_o, axis=0) + do * do * cross
        m_co += tl.sum(e_c * e_o, axis=0) + dc * do * cross
        mean_c += dc * weight
        mean_o += do * weight
        count = total
    row = stats_ptr + pid * NROW
    tl.store(row + 0, count)
    tl.store(row + 1, mean_c)
    tl.store(row + 2, mean_o)
    tl.store(row + 3, m_cc)
    tl.store(row + 4, m_oo)
    tl.store(row + 5, m_co)
    tl.store(row + 6, 0.0)
    tl.store(row + 7, 0.0)


@triton.jit
def _final_kernel(out_ptr, c_ptr, u_ptr, g_c, g_d, coef_ptr, stats_ptr, phi, phi_ptr, phi_stride, inner, tiles,
                  num_parts, hn, wn, tab_y, tab_x, channels, levels, cbs, ccs, cys, cxs, ubs, ucs, uys, uxs,
                  obs, ocs, oys, oxs, H, W, MODE: tl.constexpr, WITH_C: tl.constexpr, RESCALE: tl.constexpr,
                  PHI_TENSOR: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """The output over the (H, W) crop, BLOCK elements of one sample per program; with RESCALE
    (data space) diffusers' rescale_noise_cfg against cond from the rows of _final_moments_kernel."""
    pid = tl.program_id(0)
    b = (pid // tiles).to(tl.int64)
    local = (pid % tiles).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = local < inner
    plane, y, x, _c, out = _final_value(c_ptr, u_ptr, g_c, g_d, coef_ptr, b * inner + local, mask, hn, wn, tab_y,
                                        tab_x, channels, levels, cbs, ccs, cys, cxs, ubs, ucs, uys, uxs, H, W,
                                        MODE, WITH_C)
    if RESCALE:
        n, m_cc, m_oo, _m_co, _s_cc, _s_cd = _level_moments(stats_ptr + b * num_parts * NROW, num_parts, BLOCK_P)
        phi = _scale_at(phi, phi_ptr, phi_stride, b, PHI_TENSOR)
        out = _rescaled(out, m_cc / (n - 1.0), m_oo / (n - 1.0), phi)
    ch = plane % channels
    tl.store(out_ptr + b * obs + ch * ocs + y * oys + x * oxs, out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launcher


def _table(size: int, device) -> torch.Tensor:
    return _layout.device_constant(_spec.pyrup_table(size), device, torch.float32)


def fdg_combine(a: FdgCombineArgs):
    branches = split_branches(a.preds, a.num_branches)
    out = _layout.output_like(branches[0])
    if out.numel() == 0:
        return out
    c4, u4 = _layout.image_view(branches[a.cond]), _layout.image_view(branches[a.uncond])
    batch, channels, height, width = c4.shape
    try:
        o4 = out.view(c4.shape)
        target = out
    except RuntimeError:  # a layout whose channel dims do not merge: compute contiguous, copy back
        target = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        o4 = target.view(c4.shape)
    levels = a.levels
    sizes = _spec.fdg_level_sizes(height, width, levels)
    need = a.needs_stats
    with_c = any(need)
    device = out.device
    geo = (channels, *c4.stride(), *u4.stride(), height, width)
    dummy = torch.empty(1, dtype=torch.float32, device=device)

    def buffers():
        return [dummy] + [torch.empty((batch, channels, h, w), dtype=torch.float32, device=device)
                          for h, w in sizes[1:]]

    with device_guard(out):
        g_d = buffers()
        g_c = buffers() if with_c else [dummy] * levels
        for i in range(1, levels):
            total = g_d[i].numel()
            _down_kernel[(triton.cdiv(total, BLOCK),)](
                g_d[i], g_c[i], g_d[i - 1], g_c[i - 1], c4, u4, total, *sizes[i - 1], *sizes[i], *geo,
                FIRST=i == 1, WITH_C=with_c, BLOCK=BLOCK, num_warps=NUM_WARPS)
        stats, parts = [], []
        for i in range(levels):
            if not need[i]:
                stats.append(dummy)
                parts.append(1)
                continue
            h, w = sizes[i]
            inner = channels * h * w
            p, chunk = _layout.partitions(batch, inner, BLOCK, _layout.target_programs(device))
            rows = torch.empty((batch, p, 8), dtype=torch.float32, device=device)
            last = i == levels - 1
            hn, wn = sizes[i + 1] if not last else (1, 1)
            tab_y, tab_x = (_table(hn, device), _table(wn, device)) if not last else (dummy, dummy)
            _stats_kernel[(batch * p,)](
                rows, g_c[i], g_d[i], g_c[i + 1] if not last else dummy, g_d[i + 1] if not last else dummy, c4, u4,
                inner, chunk // BLOCK, p, h, w, hn, wn, tab_y, tab_x, *geo,
                LEVEL0=i == 0, LAST=last, BLOCK=BLOCK, num_warps=NUM_WARPS)
            stats.append(rows)
            parts.append(p)
        coef = torch.empty((batch, levels, 3), dtype=torch.float32, device=device)
        phis = [phi for phi in a.level_rescale]
        _coef_kernel[(batch,)](
            coef, tuple(float(s) for s in a.scales), tuple(t if t is not None else dummy for t in a.scale_tensors),
            tuple(0 if t is None or t.numel() == 1 else 1 for t in a.scale_tensors),
            tuple(float(w) for w in a.parallel_weights), tuple(float(p) for p, _ in phis),
            tuple(t if t is not None else dummy for _, t in phis),
            tuple(0 if t is None or t.numel() == 1 else 1 for _, t in phis), tuple(stats), tuple(parts),
            LEVELS=levels, S_TENSOR=tuple(t is not None for t in a.scale_tensors),
            PHI_TENSOR=tuple(t is not None for _, t in phis), PROJECT=tuple(w != 1.0 for w in a.parallel_weights),
            RESCALE=tuple(_spec.rescale_on(*phi) for phi in phis), ORIGINAL=a.original_formulation,
            BLOCK_P=triton.next_power_of_2(max(parts)), num_warps=1)
        if levels >= 3:
            nxt = dummy
            for i in range(levels - 1, 0, -1):
                h, w = sizes[i]
                dst = torch.empty((batch, channels, h, w), dtype=torch.float32, device=device)
                has_up = i < levels - 1
                hn, wn = sizes[i + 1] if has_up else (1, 1)
                _recon_kernel[(triton.cdiv(dst.numel(), BLOCK),)](
                    dst, g_c[i], g_d[i], nxt, coef, dst.numel(), h, w, hn, wn,
                    _table(hn, device) if has_up else dummy, _table(wn, device) if has_up else dummy,
                    channels, levels, i, WITH_C=with_c, HAS_UP=has_up, BLOCK=BLOCK, num_warps=NUM_WARPS)
                nxt = dst
            first_c, first_d = dummy, nxt
        else:
            first_c, first_d = (g_c[1], g_d[1]) if levels == 2 else (dummy, dummy)
        hn, wn = sizes[1] if levels > 1 else (1, 1)
        tables = (_table(hn, device), _table(wn, device)) if levels > 1 else (dummy, dummy)
        inner = channels * height * width
        common = (c4, u4, first_c, first_d, coef)
        geometry = (hn, wn, *tables, channels, levels, *c4.stride(), *u4.stride())
        flags = dict(MODE=min(levels - 1, 2), WITH_C=with_c, BLOCK=BLOCK, num_warps=NUM_WARPS)
        rows, parts = dummy, 1
        rescale = a.data_rescaling
        if rescale:
            parts, chunk = _layout.partitions(batch, inner, BLOCK, _layout.target_programs(device))
            rows = torch.empty((batch, parts, 8), dtype=torch.float32, device=device)
            _final_moments_kernel[(batch * parts,)](rows, *common, inner, chunk // BLOCK, parts, *geometry, height,
                                                    width, **flags)
        phi, phi_t = a.rescale[0], a.rescale_tensors[0]
        tiles = triton.cdiv(inner, BLOCK)
        _final_kernel[(batch * tiles,)](
            o4, *common, rows, float(phi), phi_t if phi_t is not None else dummy,
            0 if phi_t is None or phi_t.numel() == 1 else 1, inner, tiles, parts, *geometry, *o4.stride(), height,
            width, RESCALE=rescale, PHI_TENSOR=phi_t is not None, BLOCK_P=triton.next_power_of_2(parts), **flags)
    if target is not out:
        out.copy_(target)
    return out
