"""Naive PyTorch references, written to mirror the anchor implementations operation by operation.

They compute in the input dtype, exactly as the anchors do (diffusers pipelines and guiders),
and are the oracle every backend is tested against. They favour clarity over speed and
memory: SAG's reference materialises the full attention map, SEG's reference runs a 2-D
convolution — which is the point of having kernels.

Shapes: a branch is ``(B, …)``; ``branches`` is the list of the K branches (``pred.chunk(K)``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .terms import Guidance


def _per_sample(value, like: torch.Tensor):
    """A Python number stays a number; a () / (1,) / (B,) tensor becomes (B|1, 1, …, 1)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)
    return value


def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor, guidance_rescale) -> torch.Tensor:
    """diffusers' ``rescale_noise_cfg``: per-sample UNBIASED std over all non-batch dims."""
    dims = list(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    noise_pred_rescaled = noise_cfg * (std_text / std_cfg)
    guidance_rescale = _per_sample(guidance_rescale, noise_cfg)
    return guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_cfg


def guidance_combine(branches: Sequence[torch.Tensor], guidance: Guidance, *, rescale=0.0,
                     rescale_ref: int | None = None) -> torch.Tensor:
    """``D[base] + Σ g_t (D[pos_t] − D[neg_t])`` in the order diffusers' pipelines write it
    (``noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond) + …``), then
    ``rescale_noise_cfg`` against ``branches[rescale_ref]`` (default: the first term's positive)."""
    out = branches[guidance.base]
    for term in guidance.terms:
        out = out + _per_sample(term.scale, out) * (branches[term.pos] - branches[term.neg])
    if isinstance(rescale, torch.Tensor) or rescale > 0:
        ref = guidance.terms[0].pos if rescale_ref is None else rescale_ref
        out = rescale_noise_cfg(out, branches[ref], rescale)
    return out


def apg_combine(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, scale, *, eta: float = 1.0,
                norm_threshold: float = 0.0, momentum: float = 0.0,
                momentum_buffer: torch.Tensor | None = None, formulation: str = "paper",
                rescale=0.0) -> torch.Tensor:
    """APG (Sadat et al. 2024, Algorithm 1), mirroring diffusers' ``normalized_guidance``
    (projection in float64) and ``MomentumBuffer`` (``running = diff + momentum * running``,
    updated in place in ``momentum_buffer`` when one is given).

    ``formulation``: ``"paper"`` → ``cond + (w − 1)·update``; ``"diffusers"`` →
    ``uncond + w·update`` (diffusers' default); ``"diffusers_original"`` → ``cond + w·update``
    (diffusers' ``use_original_formulation=True``)."""
    diff = pred_cond - pred_uncond
    dim = [-i for i in range(1, len(diff.shape))]
    if momentum_buffer is not None:
        running = diff + momentum * momentum_buffer.to(diff.dtype)
        momentum_buffer.copy_(running)
        diff = running
    if norm_threshold > 0:
        ones = torch.ones_like(diff)
        diff_norm = diff.norm(p=2, dim=dim, keepdim=True)
        scale_factor = torch.minimum(ones, norm_threshold / diff_norm)
        diff = diff * scale_factor
    v0, v1 = diff.double(), pred_cond.double()
    v1 = torch.nn.functional.normalize(v1, dim=dim)
    v0_parallel = (v0 * v1).sum(dim=dim, keepdim=True) * v1
    v0_orthogonal = v0 - v0_parallel
    diff_parallel = v0_parallel.to(dtype=diff.dtype)
    diff_orthogonal = v0_orthogonal.to(dtype=diff.dtype)
    normalized_update = diff_orthogonal + eta * diff_parallel
    w = _per_sample(scale, pred_cond)
    if formulation == "paper":
        pred = pred_cond + (w - 1) * normalized_update
    elif formulation == "diffusers":
        pred = pred_uncond + w * normalized_update
    elif formulation == "diffusers_original":
        pred = pred_cond + w * normalized_update
    else:
        raise ValueError(f"apg_combine: formulation: unknown {formulation!r}")
    if isinstance(rescale, torch.Tensor) or rescale > 0:
        pred = rescale_noise_cfg(pred, pred_cond, rescale)
    return pred


def cfg_zero_star_combine(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, scale, *,
                          original_formulation: bool = False, zero_init: bool = False,
                          rescale=0.0) -> torch.Tensor:
    """diffusers' ``ClassifierFreeZeroStarGuidance.forward`` (alpha computed in fp32 and cast back
    to the input dtype, as ``cfg_zero_star_scale`` does; float64 inputs stay float64).

    Deliberate difference: with ``zero_init`` and a rescale, diffusers rescales the zeros and
    returns NaN (0·(std/0)); this returns the zeros."""
    if zero_init:
        return torch.zeros_like(pred_cond)
    # diffusers casts with .float(); promoting instead is identical for fp32/fp16/bf16 and keeps
    # float64 inputs exact (so the reference doubles as the float64 truth in tests).
    wide = torch.promote_types(pred_cond.dtype, torch.float32)
    cond = pred_cond.flatten(1).to(wide)
    uncond = pred_uncond.flatten(1).to(wide)
    dot_product = torch.sum(cond * uncond, dim=1, keepdim=True)
    squared_norm = torch.sum(uncond**2, dim=1, keepdim=True) + 1e-8
    alpha = (dot_product / squared_norm).to(pred_cond.dtype)
    alpha = alpha.view(-1, *(1,) * (pred_cond.dim() - 1))
    pred_uncond = pred_uncond * alpha
    shift = pred_cond - pred_uncond
    pred = pred_cond if original_formulation else pred_uncond
    pred = pred + _per_sample(scale, pred_cond) * shift
    if isinstance(rescale, torch.Tensor) or rescale > 0:
        pred = rescale_noise_cfg(pred, pred_cond, rescale)
    return pred


# --------------------------------------------------------------------------- Gaussian blur (SEG §5, SAG §6)

SEG_INF_SIGMA = 9999.0  # SEG-SDXL: sigma above this is "infinite" (every query := the grid mean)


def seg_kernel_size(sigma: float) -> int:
    """SEG-SDXL's kernel size rule: ``ceil(6σ) + 1 − ceil(6σ) % 2`` (always odd)."""
    k = math.ceil(6 * sigma)
    return k + 1 - k % 2


def gaussian_kernel_1d(kernel_size: int, sigma: float) -> torch.Tensor:
    """The 1-D weights of both anchors' ``gaussian_blur_2d``, in float32 (cast to the tensor dtype
    by the caller): ``exp(−½ (x/σ)²)`` on ``linspace(−(k−1)/2, (k−1)/2, k)``, normalised to sum 1."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


def gaussian_blur_2d(img: torch.Tensor, kernel_size: int, sigma: float, *, cap_to_grid: bool = True) -> torch.Tensor:
    """Depthwise Gaussian blur of ``(B, C, H, W)`` with reflect padding, as SEG-SDXL writes it: a
    k×k kernel ``outer(w, w)`` in the image dtype and one grouped ``conv2d``.

    ``cap_to_grid`` applies SEG-SDXL's cap ``k ≤ W − (W % 2 − 1)`` (its code uses the last dim);
    diffusers' SAG pipeline has the same function without the cap (``cap_to_grid=False``)."""
    if cap_to_grid:
        width = img.shape[-1]
        kernel_size = min(kernel_size, width - (width % 2 - 1))
    x_kernel = gaussian_kernel_1d(kernel_size, sigma).to(device=img.device, dtype=img.dtype)
    kernel2d = torch.mm(x_kernel[:, None], x_kernel[None, :])
    kernel2d = kernel2d.expand(img.shape[-3], 1, kernel2d.shape[0], kernel2d.shape[1])
    padding = [kernel_size // 2] * 4
    img = torch.nn.functional.pad(img, padding, mode="reflect")
    return torch.nn.functional.conv2d(img, kernel2d, groups=img.shape[-3])
