"""PyTorch backend of the combine family: guidance_combine, apg_combine, cfg_zero_star_combine.

Arithmetic is fp32 (fp64 for fp64 inputs) whatever the input dtype; the output is a new (B, …)
tensor in the input dtype, laid out by ``_layout.output_like``. The formulas are those of
:mod:`guidance_kernels.reference`, with the same operation order.
"""

from __future__ import annotations

import torch

from .._layout import output_like, split_branches
from .._library import ApgCombineArgs, CfgZeroStarCombineArgs, GuidanceCombineArgs
from ._common import compute_dtype, per_sample


def _finish(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The result in the input dtype and the layout every backend uses (never an input alias)."""
    return output_like(like).copy_(result)


def _rescale(out: torch.Tensor, ref: torch.Tensor, phi) -> torch.Tensor:
    dims = list(range(1, out.dim()))
    ratio = ref.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True)
    return phi * (out * ratio) + (1 - phi) * out


def guidance_combine(a: GuidanceCombineArgs):
    branches = split_branches(a.preds, a.num_branches)
    like = branches[0]
    dtype = compute_dtype(like)
    rescaling = a.rescaling
    out = output_like(like)
    acc = branches[a.base].to(dtype)
    for i, (p, n, g, g_tensor) in enumerate(zip(a.pos, a.neg, a.scales, a.scale_tensors)):
        diff = branches[p].to(dtype) - branches[n].to(dtype)
        # The last term goes straight into the output when no rescale or dtype change follows.
        target = out if (i == len(a.pos) - 1 and not rescaling and out.dtype == dtype) else None
        if g_tensor is None:
            acc = torch.add(acc, diff, alpha=g, out=target)
        else:
            acc = torch.addcmul(acc, per_sample(g, g_tensor, acc.dim(), dtype), diff, out=target)
    if rescaling:
        phi = per_sample(a.rescale, a.rescale_tensor, acc.dim(), dtype)
        acc = _rescale(acc, branches[a.rescale_ref].to(dtype), phi)
    return acc if acc is out else out.copy_(acc)


def _pair(a):
    """(first branch, compute dtype, cond, uncond in the compute dtype, non-batch dims)."""
    branches = split_branches(a.preds, a.num_branches)
    dtype = compute_dtype(branches[0])
    c, u = branches[a.cond].to(dtype), branches[a.uncond].to(dtype)
    return branches[0], dtype, c, u, list(range(1, c.dim()))


def apg_combine(a: ApgCombineArgs):
    like, dtype, c, u, dims = _pair(a)
    diff = c - u
    if a.momentum_buffer is not None:
        diff = diff + a.momentum * a.momentum_buffer.to(dtype)
        a.momentum_buffer.copy_(diff)
    if a.norm_threshold > 0:
        diff = diff * torch.minimum(torch.ones((), dtype=dtype, device=diff.device),
                                    a.norm_threshold / diff.norm(p=2, dim=dims, keepdim=True))
    v1 = torch.nn.functional.normalize(c, dim=dims)
    parallel = (diff * v1).sum(dim=dims, keepdim=True) * v1
    update = (diff - parallel) + a.eta * parallel
    w = per_sample(a.scale, a.scale_tensor, c.dim(), dtype)
    if a.formulation == "paper":
        out = c + (w - 1) * update
    elif a.formulation == "diffusers":
        out = u + w * update
    else:  # "diffusers_original"
        out = c + w * update
    if a.rescaling:
        out = _rescale(out, c, per_sample(a.rescale, a.rescale_tensor, c.dim(), dtype))
    return _finish(out, like)


apg_combine_momentum = apg_combine  # the same function: the record carries the buffer


def cfg_zero_star_combine(a: CfgZeroStarCombineArgs):
    like, dtype, c, u, dims = _pair(a)
    alpha = (c * u).sum(dim=dims, keepdim=True) / ((u * u).sum(dim=dims, keepdim=True) + 1e-8)
    u_alpha = u * alpha
    s = per_sample(a.scale, a.scale_tensor, c.dim(), dtype)
    out = (c if a.original_formulation else u_alpha) + s * (c - u_alpha)
    if a.rescaling:
        out = _rescale(out, c, per_sample(a.rescale, a.rescale_tensor, c.dim(), dtype))
    return _finish(out, like)
