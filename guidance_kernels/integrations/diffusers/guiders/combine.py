"""The combine step of the guiders: the guided prediction from the branches of one step.

Predictions come as ONE stacked ``(K·B, …)`` tensor (the batched call) or as a list of K
``(B, …)`` tensors (``forward(pred_cond, pred_uncond, …)`` called directly); ``cond`` /
``uncond`` are branch positions. CFG, PAG/SEG/SLG terms, APG and CFG-Zero* are the fused ops of
the package. TCFG, MAG and FDG use the fused ops ``guidance_kernels.tcfg_combine``,
``guidance_kernels.mag_combine`` and ``guidance_kernels.fdg_combine`` when the installed package
has them, and otherwise the torch formulas below (fp32, the anchor's formula; the same results as
the fused ops, which the tests check whenever both exist):

* TCFG (diffusers' ``TangentialClassifierFreeGuidance``): per sample, uncond replaced by its
  projection on the first right-singular vector of the 2×D matrix ``[cond; uncond]``, then CFG.
* MAG (diffusers' ``MagnitudeAwareGuidance``): ``s' = 1 + (s − 1)·exp(−α‖c − u‖/‖u‖)``
  (original formulation ``s·exp(…)`` on cond) with Frobenius norms over all non-batch dims —
  diffusers' ``torch.norm(x, dim=[1, 2, 3])`` raises on 4-D latents; this is its meaning.
* FDG (diffusers' ``FrequencyDecoupledGuidance``): CFG per level of kornia's Laplacian pyramid
  (needs kornia without the fused op, as diffusers does), the result cropped to the latent's own
  ``(H, W)`` where kornia pads (diffusers returns the padded size, which no scheduler accepts).

Then guidance rescale (diffusers' ``rescale_noise_cfg``, unbiased std, against cond) where the
guider asks for it.
"""

from __future__ import annotations

import torch

import guidance_kernels as gk

FUSED_TCFG, FUSED_MAG, FUSED_FDG = "tcfg_combine", "mag_combine", "fdg_combine"


def _branches(pred, num_branches: int) -> list[torch.Tensor]:
    return list(pred) if isinstance(pred, (list, tuple)) else list(pred.chunk(num_branches))


def linear(pred, num_branches: int, base: int, terms, *, rescale: float, cond: int) -> torch.Tensor:
    """``D[base] + Σ s·(D[pos] − D[neg])`` over ``terms`` = ``[(pos, neg, s), …]``, then rescale."""
    guidance = gk.Guidance(base, tuple(gk.Term(pos, neg, s) for pos, neg, s in terms))
    return gk.guidance_combine(pred, guidance, num_branches=num_branches, rescale=rescale, rescale_ref=cond)


def rescale_noise(out: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """diffusers' ``rescale_noise_cfg`` (per-sample unbiased std over all non-batch dims)."""
    dims = list(range(1, out.dim()))
    return phi * out * (cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True)) + (1 - phi) * out


# --------------------------------------------------------------------------- TCFG


def tcfg(pred, num_branches: int, scale: float, *, cond: int, uncond: int, original_formulation: bool,
         rescale: float) -> torch.Tensor:
    if hasattr(gk, FUSED_TCFG):
        return gk.tcfg_combine(pred, scale, cond=cond, uncond=uncond, num_branches=num_branches,
                               original_formulation=original_formulation, rescale=rescale)
    return tcfg_torch(pred, num_branches, scale, cond=cond, uncond=uncond, original_formulation=original_formulation,
                      rescale=rescale)


def tcfg_torch(pred, num_branches: int, scale: float, *, cond: int, uncond: int, original_formulation: bool,
               rescale: float) -> torch.Tensor:
    preds = _branches(pred, num_branches)
    c, u = preds[cond], preds[uncond]
    c32, u32 = c.float().flatten(1), u.float().flatten(1)
    _, _, vh = torch.linalg.svd(torch.stack([c32, u32], dim=1), full_matrices=False)
    v1 = vh[:, 0]  # (B, D): the principal right-singular direction
    u_proj = ((u32 * v1).sum(dim=1, keepdim=True) * v1).reshape(u.shape)
    c32 = c.float()
    out = (c32 if original_formulation else u_proj) + scale * (c32 - u_proj)
    if rescale > 0:
        out = rescale_noise(out, c32, rescale)
    return out.to(c.dtype)


# --------------------------------------------------------------------------- MAG


def mag(pred, num_branches: int, scale: float, *, cond: int, uncond: int, alpha: float, original_formulation: bool,
        rescale: float) -> torch.Tensor:
    if hasattr(gk, FUSED_MAG):
        return gk.mag_combine(pred, scale, cond=cond, uncond=uncond, num_branches=num_branches, alpha=alpha,
                              original_formulation=original_formulation, rescale=rescale)
    return mag_torch(pred, num_branches, scale, cond=cond, uncond=uncond, alpha=alpha,
                     original_formulation=original_formulation, rescale=rescale)


def mag_torch(pred, num_branches: int, scale: float, *, cond: int, uncond: int, alpha: float,
              original_formulation: bool, rescale: float) -> torch.Tensor:
    preds = _branches(pred, num_branches)
    c, u = preds[cond].float(), preds[uncond].float()
    dims = list(range(1, c.dim()))
    diff = c - u
    ratio = torch.linalg.vector_norm(diff, dim=dims, keepdim=True) / torch.linalg.vector_norm(u, dim=dims,
                                                                                             keepdim=True)
    damp = torch.exp(-alpha * ratio)
    s = scale * damp if original_formulation else 1.0 + (scale - 1.0) * damp
    out = (c if original_formulation else u) + s * diff
    if rescale > 0:
        out = rescale_noise(out, c, rescale)
    return out.to(preds[cond].dtype)


# --------------------------------------------------------------------------- FDG


def fdg(pred, num_branches: int, scales: list, *, cond: int, uncond: int, parallel_weights: list, rescale,
        rescale_space: str, original_formulation: bool, upcast: bool) -> torch.Tensor:
    """``scales``: one per level, highest frequency first; a level with its guidance off (outside
    its interval) has scale 1 (0 for the original formulation): it keeps the cond level.
    ``rescale``: one φ (``rescale_space="data"``) or one per level (``"freq"``)."""
    if hasattr(gk, FUSED_FDG):
        return gk.fdg_combine(pred, list(scales), cond=cond, uncond=uncond, num_branches=num_branches,
                              parallel_weights=list(parallel_weights), rescale=rescale, rescale_space=rescale_space,
                              original_formulation=original_formulation)
    return fdg_torch(pred, num_branches, scales, cond=cond, uncond=uncond, parallel_weights=parallel_weights,
                     rescale=rescale, rescale_space=rescale_space, original_formulation=original_formulation,
                     upcast=upcast)


def _project(v0: torch.Tensor, v1: torch.Tensor, upcast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel and orthogonal parts of v0 relative to v1, per sample (the FDG paper's Algorithm 2)."""
    dims = list(range(1, v0.dim()))
    dtype = v0.dtype
    if upcast:
        v0, v1 = v0.double(), v1.double()
    v1 = torch.nn.functional.normalize(v1, dim=dims)
    parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
    return parallel.to(dtype), (v0 - parallel).to(dtype)


def fdg_torch(pred, num_branches: int, scales: list, *, cond: int, uncond: int, parallel_weights: list, rescale,
              rescale_space: str, original_formulation: bool, upcast: bool) -> torch.Tensor:
    try:
        from kornia.geometry import pyrup
        from kornia.geometry.transform import build_laplacian_pyramid
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("FrequencyDecoupledGuidance: needs kornia (pip install kornia) or a guidance_kernels with "
                          "fdg_combine") from None
    preds = _branches(pred, num_branches)
    c, u = preds[cond], preds[uncond]
    shape = c.shape
    # kornia takes (B, C, H, W): every dim between the batch and (H, W) is a channel (video: per frame)
    c32, u32 = c.float().reshape(shape[0], -1, *shape[-2:]), u.float().reshape(shape[0], -1, *shape[-2:])
    levels = len(scales)
    pc, pu = build_laplacian_pyramid(c32, levels), build_laplacian_pyramid(u32, levels)
    per_level = rescale if isinstance(rescale, (list, tuple)) else [rescale] * levels
    guided = []
    for i, s in enumerate(scales):
        if s == (0.0 if original_formulation else 1.0):
            guided.append(pc[i])
            continue
        shift = pc[i] - pu[i]
        if parallel_weights[i] != 1.0:
            parallel, orthogonal = _project(shift, pc[i], upcast)
            shift = parallel_weights[i] * parallel + orthogonal
        level = (pc[i] if original_formulation else pu[i]) + s * shift
        if rescale_space == "freq" and per_level[i] > 0:
            level = rescale_noise(level, pc[i], per_level[i])
        guided.append(level)
    out = guided[-1]
    for level in reversed(guided[:-1]):
        out = pyrup(out) + level
    out = out[..., :shape[-2], :shape[-1]].reshape(shape)
    if rescale_space == "data" and per_level[0] > 0:
        out = rescale_noise(out, c.float(), per_level[0])
    return out.to(c.dtype)
