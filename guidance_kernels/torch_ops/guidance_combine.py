"""PyTorch backend of the combine family: guidance_combine, apg_combine, cfg_zero_star_combine.

Inputs are the op arguments (see ``guidance_kernels._library``). Arithmetic is fp32 (fp64 for
fp64 inputs) whatever the input dtype; the output is a new (B, …) tensor in the input dtype, laid out
by ``_layout.output_like``. The formulas are those of :mod:`guidance_kernels.reference`, with the same operation order.
"""

from __future__ import annotations

import torch

from .._checks import split_branches
from .._layout import output_like


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _scale(number: float, tensor: torch.Tensor | None, ndim: int, dtype: torch.dtype):
    if tensor is None:
        return number
    return tensor.to(dtype).reshape(-1, *([1] * (ndim - 1)))


def _finish(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The result in the input dtype and the layout every backend uses (never an input alias)."""
    return output_like(like).copy_(result)


def _rescale(out: torch.Tensor, ref: torch.Tensor, phi) -> torch.Tensor:
    dims = list(range(1, out.dim()))
    ratio = ref.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True)
    return phi * (out * ratio) + (1 - phi) * out


def _wants_rescale(rescale: float, rescale_tensor) -> bool:
    return rescale_tensor is not None or rescale > 0


def guidance_combine(preds, num_branches, base, pos, neg, scales, scale_tensors, rescale, rescale_tensor,
                     rescale_ref):
    branches = split_branches(preds, num_branches)
    like = branches[0]
    dtype = _compute_dtype(like)
    rescaling = _wants_rescale(rescale, rescale_tensor)
    out = output_like(like)
    acc = branches[base].to(dtype)
    for i, (p, n, g, g_tensor) in enumerate(zip(pos, neg, scales, scale_tensors)):
        diff = branches[p].to(dtype) - branches[n].to(dtype)
        # The last term goes straight into the output when no rescale or dtype change follows.
        target = out if (i == len(pos) - 1 and not rescaling and out.dtype == dtype) else None
        if g_tensor is None:
            acc = torch.add(acc, diff, alpha=g, out=target)
        else:
            acc = torch.addcmul(acc, _scale(g, g_tensor, acc.dim(), dtype), diff, out=target)
    if rescaling:
        phi = _scale(rescale, rescale_tensor, acc.dim(), dtype)
        acc = _rescale(acc, branches[rescale_ref].to(dtype), phi)
    return acc if acc is out else out.copy_(acc)


def _pair(preds, num_branches, cond, uncond):
    """(first branch, compute dtype, cond, uncond in the compute dtype, non-batch dims)."""
    branches = split_branches(preds, num_branches)
    dtype = _compute_dtype(branches[0])
    c, u = branches[cond].to(dtype), branches[uncond].to(dtype)
    return branches[0], dtype, c, u, list(range(1, c.dim()))


def apg_combine(preds, num_branches, cond, uncond, scale, scale_tensor, eta, norm_threshold, momentum,
                momentum_buffer, formulation, rescale, rescale_tensor):
    like, dtype, c, u, dims = _pair(preds, num_branches, cond, uncond)
    diff = c - u
    if momentum_buffer is not None:
        diff = diff + momentum * momentum_buffer.to(dtype)
        momentum_buffer.copy_(diff)
    if norm_threshold > 0:
        diff = diff * torch.minimum(torch.ones((), dtype=dtype, device=diff.device),
                                    norm_threshold / diff.norm(p=2, dim=dims, keepdim=True))
    v1 = torch.nn.functional.normalize(c, dim=dims)
    parallel = (diff * v1).sum(dim=dims, keepdim=True) * v1
    update = (diff - parallel) + eta * parallel
    w = _scale(scale, scale_tensor, c.dim(), dtype)
    if formulation == "paper":
        out = c + (w - 1) * update
    elif formulation == "diffusers":
        out = u + w * update
    else:  # "diffusers_original"
        out = c + w * update
    if _wants_rescale(rescale, rescale_tensor):
        out = _rescale(out, c, _scale(rescale, rescale_tensor, c.dim(), dtype))
    return _finish(out, like)


def cfg_zero_star_combine(preds, num_branches, cond, uncond, scale, scale_tensor, original_formulation, rescale,
                          rescale_tensor):
    like, dtype, c, u, dims = _pair(preds, num_branches, cond, uncond)
    alpha = (c * u).sum(dim=dims, keepdim=True) / ((u * u).sum(dim=dims, keepdim=True) + 1e-8)
    u_alpha = u * alpha
    s = _scale(scale, scale_tensor, c.dim(), dtype)
    out = (c if original_formulation else u_alpha) + s * (c - u_alpha)
    if _wants_rescale(rescale, rescale_tensor):
        out = _rescale(out, c, _scale(rescale, rescale_tensor, c.dim(), dtype))
    return _finish(out, like)
