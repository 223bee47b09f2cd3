"""PyTorch backend of fdg_combine: the kernels' algorithm (see guidance_kernels.ops.fdg_combine) in
torch ops, fp32 (fp64 for fp64 inputs).

Only the cond − uncond Gaussian pyramid is built unless a level needs its projection on cond or
a frequency-space rescale; each level's guided value is ``a_i·Lc_i + b_i·Ld_i`` with per-sample
coefficients, and the rebuild runs over the Gaussian levels (``a_0·c + b_0·d + up(R_1)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _spec
from .._layout import output_like, split_branches
from .._library import FdgCombineArgs
from ._common import compute_dtype, per_sample


def _blur(img: torch.Tensor) -> torch.Tensor:
    """kornia's pyramid blur as two 1-D passes, each after its own reflect padding (reflection acts
    on each axis independently, so this is the same linear map as its 5×5 kernel)."""
    c = img.shape[1]
    w = torch.tensor(_spec.PYR_BLUR, dtype=img.dtype, device=img.device)
    x = F.conv2d(F.pad(img, (2, 2, 0, 0), mode="reflect"), w.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="reflect"), w.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def _down(img: torch.Tensor) -> torch.Tensor:
    h, w = img.shape[-2:]
    return F.interpolate(_blur(img), size=(h // 2, w // 2), mode="bilinear", align_corners=False)


def _up(img: torch.Tensor) -> torch.Tensor:
    h, w = img.shape[-2:]
    return _blur(F.interpolate(img, size=(2 * h, 2 * w), mode="bilinear", align_corners=False))


def _pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    out = [x]
    for _ in range(levels - 1):
        out.append(_down(out[-1]))
    return out


def fdg_combine(a: FdgCombineArgs):
    branches = split_branches(a.preds, a.num_branches)
    like = branches[0]
    dtype = compute_dtype(like)
    shape = like.shape
    h, w = shape[-2:]
    levels = len(a.scales)
    c = branches[a.cond].to(dtype).reshape(shape[0], -1, h, w)
    d = c - branches[a.uncond].to(dtype).reshape(shape[0], -1, h, w)
    ph, pw = _spec.fdg_padded_size(h, w, levels)
    if (ph, pw) != (h, w):
        c, d = (F.pad(x, (0, pw - w, 0, ph - h), mode="reflect") for x in (c, d))
    stats = a.needs_stats
    g_d = _pyramid(d, levels)
    g_c = _pyramid(c, levels) if any(stats) else None
    dims = [1, 2, 3]
    coef_a, coef_b, guided = [], [], []
    for i in range(levels):
        s = per_sample(a.scales[i], a.scale_tensors[i], 4, dtype)
        coef_b_i = s if a.original_formulation else s - 1.0
        coef_a_i = 1.0
        if stats[i]:
            lc = g_c[i] - _up(g_c[i + 1]) if i < levels - 1 else g_c[i]
            ld = g_d[i] - _up(g_d[i + 1]) if i < levels - 1 else g_d[i]
            if a.parallel_weights[i] != 1.0:
                norm = torch.linalg.vector_norm(lc, dim=dims, keepdim=True).clamp_min(_spec.NORMALIZE_EPS)
                k = (ld * lc).sum(dim=dims, keepdim=True) / norm / norm
                coef_a_i = 1.0 + s * (a.parallel_weights[i] - 1.0) * k
            if _spec.rescale_on(*a.level_rescale[i]):
                phi = per_sample(*a.level_rescale[i], 4, dtype)
                level = coef_a_i * lc + coef_b_i * ld
                ratio = lc.std(dim=dims, keepdim=True) / level.std(dim=dims, keepdim=True)
                rho = phi * ratio + (1.0 - phi)
                coef_a_i, coef_b_i = coef_a_i * rho, coef_b_i * rho
        off = 0.0 if a.original_formulation else 1.0
        if isinstance(s, torch.Tensor):
            keep = s == off
            coef_a_i = torch.where(keep, torch.ones_like(s), torch.as_tensor(coef_a_i, dtype=dtype, device=s.device))
            coef_b_i = torch.where(keep, torch.zeros_like(s), coef_b_i)
            guided_i = ~keep
        else:
            guided_i = s != off
            if s == off:
                coef_a_i, coef_b_i = 1.0, 0.0
        coef_a.append(coef_a_i)
        coef_b.append(coef_b_i)
        guided.append(guided_i)

    def d_term(coefficient, reads, value):
        # uncond enters a level only where the anchor reads it (that level or the finer one guided)
        if not isinstance(reads, torch.Tensor):
            return coefficient * value if reads else torch.zeros((), dtype=dtype, device=value.device)
        return torch.where(reads, coefficient * value, torch.zeros((), dtype=dtype, device=value.device))

    rebuilt = None
    for i in range(levels - 1, 0, -1):
        term = d_term(coef_b[i] - coef_b[i - 1], guided[i] | guided[i - 1], g_d[i])
        if g_c is not None:
            term = term + (coef_a[i] - coef_a[i - 1]) * g_c[i]
        rebuilt = term if rebuilt is None else term + _up(rebuilt)
    out = coef_a[0] * c + d_term(coef_b[0], guided[0], d)
    if rebuilt is not None:
        out = out + _up(rebuilt)
    out = out[..., :h, :w].reshape(shape)
    if a.data_rescaling:
        ref = branches[a.cond].to(dtype)
        flat = list(range(1, out.dim()))
        phi = per_sample(a.rescale[0], a.rescale_tensors[0], out.dim(), dtype)
        out = phi * (out * (ref.std(dim=flat, keepdim=True) / out.std(dim=flat, keepdim=True))) + (1 - phi) * out
    return output_like(like).copy_(out)

