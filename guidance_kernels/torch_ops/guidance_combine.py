"""PyTorch backend of the combine family: guidance_combine (with rescale, CFG-Norm or Mahiro),
apg_combine, cfg_zero_star_combine, tcfg_combine, mag_combine.

Arithmetic is fp32 (fp64 for fp64 inputs) whatever the input dtype; the output is a new (B, …)
tensor in the input dtype, laid out by ``_layout.output_like``. The formulas are those of
:mod:`guidance_kernels.reference`, with the same operation order (separate multiply and add, so
the fp32 plain combine rounds exactly like the anchors' ``u + s * (c - u)``), except TCFG, whose
SVD is replaced by the closed form of the 2×2 Gram matrix (see ``tcfg_coefficients``).
"""

from __future__ import annotations

import torch

from .. import _spec
from .._layout import output_like, split_branches
from .._library import (ApgCombineArgs, CfgNormCombineArgs, CfgZeroStarCombineArgs, GuidanceCombineArgs,
                        MagCombineArgs, MahiroCombineArgs, TcfgCombineArgs)
from ._common import as_dtype, compute_dtype, per_sample


def _finish(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The result in the input dtype and the layout every backend uses (never an input alias)."""
    return output_like(like).copy_(result)


def _rescale(out: torch.Tensor, ref: torch.Tensor, phi) -> torch.Tensor:
    dims = list(range(1, out.dim()))
    ratio = ref.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True)
    return phi * (out * ratio) + (1 - phi) * out


def _linear(a, branches, dtype, out=None) -> torch.Tensor:
    """D[base] + Σ g_t (D[pos_t] − D[neg_t]) in ``dtype``; the last term is written into ``out``
    when given (no copy when nothing follows)."""
    acc = as_dtype(branches[a.base], dtype)
    for i, (p, n, g, g_tensor) in enumerate(zip(a.pos, a.neg, a.scales, a.scale_tensors)):
        diff = as_dtype(branches[p], dtype) - as_dtype(branches[n], dtype)
        target = out if i == len(a.pos) - 1 else None
        # Multiply, then add (torch.add(alpha=) and addcmul fuse them into one rounding on the CPU).
        acc = torch.add(acc, diff * per_sample(g, g_tensor, acc.dim(), dtype), out=target)
    return acc


def guidance_combine(a: GuidanceCombineArgs):
    branches = split_branches(a.preds, a.num_branches)
    like = branches[0]
    dtype = compute_dtype(like)
    rescaling = a.rescaling
    out = output_like(like)
    acc = _linear(a, branches, dtype, out if not rescaling and out.dtype == dtype else None)
    if rescaling:
        phi = per_sample(a.rescale, a.rescale_tensor, acc.dim(), dtype)
        acc = _rescale(acc, as_dtype(branches[a.rescale_ref], dtype), phi)
    return acc if acc is out else out.copy_(acc)


def guidance_combine_cfg_norm(a: CfgNormCombineArgs):
    branches = split_branches(a.preds, a.num_branches)
    dtype = compute_dtype(branches[0])
    acc = _linear(a, branches, dtype)
    norm_ref = torch.linalg.vector_norm(as_dtype(branches[a.ref], dtype), dim=1, keepdim=True)
    norm_out = torch.linalg.vector_norm(acc, dim=1, keepdim=True)
    # clamp(x, 0, 1) keeps a NaN (torch.clamp), as ComfyUI's does
    scale = (norm_ref / (norm_out + _spec.CFG_NORM_EPS)).clamp(min=0.0, max=1.0)
    return _finish(acc * scale * per_sample(a.strength, a.strength_tensor, acc.dim(), dtype), branches[0])


def guidance_combine_mahiro(a: MahiroCombineArgs):
    branches = split_branches(a.preds, a.num_branches)
    dtype = compute_dtype(branches[0])
    acc = _linear(a, branches, dtype)
    s = per_sample(a.scales[0], a.scale_tensors[0], acc.dim(), dtype)
    leap = as_dtype(branches[a.pos[0]], dtype) * s
    u_leap = as_dtype(branches[a.neg[0]], dtype) * s
    merge = (leap + acc) / 2
    normu = torch.sqrt(u_leap.abs()) * u_leap.sign()
    normm = torch.sqrt(merge.abs()) * merge.sign()
    dot = (normu * normm).sum(dim=1)
    eps = _spec.COSINE_EPS
    cos = dot / (torch.linalg.vector_norm(normu, dim=1).clamp_min(eps) * torch.linalg.vector_norm(normm, dim=1)
                 .clamp_min(eps))
    sim = cos.reshape(cos.shape[0], -1).mean(dim=1).reshape(-1, *([1] * (acc.dim() - 1)))
    simsc = 2 * (sim + 1)
    return _finish((simsc * acc + (4 - simsc) * leap) / 4, branches[0])


def _pair(a):
    """(first branch, compute dtype, cond, uncond in the compute dtype, non-batch dims)."""
    branches = split_branches(a.preds, a.num_branches)
    dtype = compute_dtype(branches[0])
    c, u = as_dtype(branches[a.cond], dtype), as_dtype(branches[a.uncond], dtype)
    return branches[0], dtype, c, u, list(range(1, c.dim()))


def _dot(x: torch.Tensor, y: torch.Tensor, dims) -> torch.Tensor:
    return (x * y).sum(dim=dims, keepdim=True)


def apg_combine(a: ApgCombineArgs):
    like, dtype, c, u, dims = _pair(a)
    code = _spec.APG_FORMULATION_CODES[a.formulation]
    diff = c - u
    if a.momentum_buffer is not None:
        running = diff + a.momentum * as_dtype(a.momentum_buffer, dtype)
        a.momentum_buffer.copy_(running)
        if code < 3:  # the CFG formulations only feed the buffer
            diff = running
    w = per_sample(a.scale, a.scale_tensor, c.dim(), dtype)
    if code >= 3:
        out = (u if code == 3 else c) + w * diff
    else:
        if a.norm_threshold > 0:
            diff = diff * torch.minimum(torch.ones((), dtype=dtype, device=diff.device),
                                        a.norm_threshold / diff.norm(p=2, dim=dims, keepdim=True))
        v1 = torch.nn.functional.normalize(c, dim=dims, eps=_spec.NORMALIZE_EPS)
        parallel = _dot(diff, v1, dims) * v1
        update = (diff - parallel) + a.eta * parallel
        if code == 0:
            out = c + (w - 1) * update
        elif code == 1:
            out = u + w * update
        else:
            out = c + w * update
    if a.rescaling:
        out = _rescale(out, c, per_sample(a.rescale, a.rescale_tensor, c.dim(), dtype))
    return _finish(out, like)


apg_combine_momentum = apg_combine  # the same function: the record carries the buffer


def cfg_zero_star_combine(a: CfgZeroStarCombineArgs):
    like, dtype, c, u, dims = _pair(a)
    alpha = _dot(c, u, dims) / (_dot(u, u, dims) + _spec.CFG_ZERO_STAR_EPS)
    u_alpha = u * alpha
    s = per_sample(a.scale, a.scale_tensor, c.dim(), dtype)
    out = (c if a.original_formulation else u_alpha) + s * (c - u_alpha)
    if a.rescaling:
        out = _rescale(out, c, per_sample(a.rescale, a.rescale_tensor, c.dim(), dtype))
    return _finish(out, like)


def tcfg_coefficients(s_cu: torch.Tensor, s_cd: torch.Tensor, s_dd: torch.Tensor,
                      poison: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e_c·e_u, e_u²)`` of the principal unit eigenvector of the Gram matrix from the sums
    ⟨c,u⟩, ⟨c,c−u⟩, ‖c−u‖²; ``poison`` is ‖c‖² + ‖u‖² (non-finite when the sample is: its
    coefficients are then NaN). See tcfg_combine for the formulas and the ``r = 0`` rule."""
    delta = 2 * s_cd - s_dd
    r = torch.hypot(delta, 2 * s_cu) + (poison - poison)
    degenerate = r == 0
    safe = torch.where(degenerate, torch.ones_like(r), r)
    pq = s_cu / safe
    q = torch.where(delta >= 0, 2 * pq * (s_cu / (safe + delta)), (safe - delta) / (2 * safe))
    zero = torch.zeros_like(r)
    return torch.where(degenerate, zero, pq), torch.where(degenerate, zero, q)


def tcfg_combine(a: TcfgCombineArgs):
    like, dtype, c, u, dims = _pair(a)
    d = c - u
    pq, q = tcfg_coefficients(_dot(c, u, dims), _dot(c, d, dims), _dot(d, d, dims),
                              _dot(c, c, dims) + _dot(u, u, dims))
    u_t = pq * c + q * u
    s = per_sample(a.scale, a.scale_tensor, c.dim(), dtype)
    out = (c if a.original_formulation else u_t) + s * (c - u_t)
    if a.rescaling:
        out = _rescale(out, c, per_sample(a.rescale, a.rescale_tensor, c.dim(), dtype))
    return _finish(out, like)


def mag_combine(a: MagCombineArgs):
    like, dtype, c, u, dims = _pair(a)
    d = c - u
    ratio = _dot(d, d, dims).sqrt() / _dot(u, u, dims).sqrt()
    damp = torch.exp(-a.alpha * ratio)
    s = per_sample(a.scale, a.scale_tensor, c.dim(), dtype)
    if a.original_formulation:
        out = c + (s * damp) * d
    else:
        out = u + (1.0 + (s - 1.0) * damp) * d
    if a.rescaling:
        out = _rescale(out, c, per_sample(a.rescale, a.rescale_tensor, c.dim(), dtype))
    return _finish(out, like)
