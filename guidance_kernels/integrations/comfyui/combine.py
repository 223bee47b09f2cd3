"""The combines of the ComfyUI nodes, on this package's fused ops, in ComfyUI's spaces and order.

ComfyUI hands guidance functions x0 predictions ("denoised") and the noisy input ``x``; each
function below takes and returns those, and matches the stock node's formula (the docstrings give
it). Where the stock node computes something in another space (RescaleCFG in v, CFG-Zero* and TCFG
on ``x − denoised``) the function does too.

:func:`cfg_norm` and :func:`tangential_uncond` run this package's fused op (:data:`FUSED_OPS`) or,
with ``fused=False``, a PyTorch implementation of the same formula (tests compare the two).
:func:`mahiro` runs PyTorch: the fused Mahiro (``guidance_combine(..., mahiro=True)``) corrects the
CFG it computes itself, while ComfyUI's post-CFG hook hands over an already combined ``denoised``
(which another hook may have changed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import guidance_kernels as gk

# The fused op behind each combine that has a fused path (name -> attribute of gk).
FUSED_OPS = {"cfg_norm": "guidance_combine", "tcfg": "tcfg_combine"}


def add_term(denoised: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
    """``denoised + (pos − neg)·scale`` in one launch: the PAG/SEG/SLG term (pos = cond, neg = the
    perturbed prediction) and SAG's (pos = the degraded uncond, neg = its prediction)."""
    return gk.guidance_combine([denoised, pos, neg], gk.Guidance(0, (gk.Term(1, 2, scale),)))


def add_term_rescaled(denoised, pos, neg, scale: float, rescale: float) -> torch.Tensor:
    """SkipLayerGuidanceDiT's term and rescale: ``r = denoised + (pos − neg)·scale``, then
    ``r·(φ·std(pos)/std(r) + 1 − φ)`` with ONE std over the whole tensor (batch included), as the
    stock node. One fused call on the flattened tensors (a single "sample")."""
    flat = [t.reshape(1, -1) for t in (denoised, pos, neg)]
    out = gk.guidance_combine(flat, gk.Guidance(0, (gk.Term(1, 2, scale),)), rescale=rescale, rescale_ref=1)
    return out.reshape(denoised.shape)


def _per_sample_std(t: torch.Tensor) -> torch.Tensor:
    return t.std(dim=tuple(range(1, t.dim())), keepdim=True)


def add_term_seg_rescale(denoised, cond, perturbed, scale: float, rescale: float, mode: str) -> torch.Tensor:
    """The community SEG/PAG node's rescale of its term ``g = (cond − perturbed)·scale``:
    ``denoised + g·(φ·std(cond)/std(r) + 1 − φ)`` with ``r = denoised + g`` ("full") or
    ``cond + g`` ("partial"), per-sample unbiased std (PyTorch; the fused rescale acts on the
    whole output instead)."""
    term = (cond - perturbed) * scale
    reference = denoised + term if mode == "full" else cond + term
    factor = rescale * (_per_sample_std(cond) / _per_sample_std(reference)) + (1.0 - rescale)
    return denoised + term * factor


def saliency_fusion(cfg_term: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """The community node's "snf" rescale mode (saliency-adaptive noise fusion): per element, the
    term whose 3-tap-blurred magnitude has the larger softmax over the image (per sample and channel)
    wins; ties keep ``cfg_term``."""
    b, c = cfg_term.shape[:2]

    def saliency(t):
        blurred = gk.gaussian_blur_2d(t.abs(), 1.0, kernel_size=min(3, t.shape[-1] - (t.shape[-1] % 2 - 1)))
        return torch.softmax(blurred.reshape(b * c, -1), dim=1).reshape(t.shape)

    return torch.where(saliency(term) > saliency(cfg_term), term, cfg_term)


# --------------------------------------------------------------------------- APG


def _last3(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed so that dim 0 indexes what ComfyUI's APG normalises over ``dims=[-1, -2, -3]``."""
    return t.reshape(-1, *t.shape[-3:]) if t.dim() > 4 else t


class ApgState:
    """ComfyUI's APG (``pre_cfg_function``): the guidance ``cond − uncond`` with an optional running
    average (reset when sigma rises: a new run), a norm threshold over the last three dims, the
    projection on cond, ``eta`` on its parallel part; cond is replaced by
    ``uncond + update + (cond − uncond)/cond_scale`` so that ComfyUI's CFG yields
    ``cond + cond_scale·update``. Two fused calls: ``apg_combine`` (update, momentum buffer in place)
    and ``guidance_combine`` (the 1/cond_scale term)."""

    def __init__(self, eta: float, norm_threshold: float, momentum: float):
        self.eta, self.norm_threshold, self.momentum = eta, norm_threshold, momentum
        self.buffer: torch.Tensor | None = None
        self.prev_sigma: float | None = None

    def modified_cond(self, cond: torch.Tensor, uncond: torch.Tensor, cond_scale: float, sigma: float):
        c, u = _last3(cond), _last3(uncond)
        if self.prev_sigma is not None and sigma > self.prev_sigma:
            self.buffer = None
        self.prev_sigma = sigma
        buffer = None
        if self.momentum != 0:
            if self.buffer is None or self.buffer.shape != c.shape or self.buffer.device != c.device:
                self.buffer = gk.apg_momentum_buffer([c, u])
            buffer = self.buffer
        update = gk.apg_combine([c, u], 1.0, cond=0, uncond=1, eta=self.eta, norm_threshold=self.norm_threshold,
                                momentum=self.momentum, momentum_buffer=buffer, formulation="diffusers")
        inverse = 1.0 / cond_scale if cond_scale != 0 else math.copysign(math.inf, cond_scale)
        out = gk.guidance_combine([update, c, u], gk.Guidance(0, (gk.Term(1, 2, inverse),)))
        return out.reshape(cond.shape)


# --------------------------------------------------------------------------- CFG-Zero*, RescaleCFG


def cfg_zero_star(denoised, cond, uncond, x, cond_scale: float) -> torch.Tensor:
    """ComfyUI's CFGZeroStar: ``α = ⟨x − cond, x − uncond⟩ / (‖x − uncond‖² + 1e-8)`` per sample,
    then ``denoised + (α − 1)(1 − cond_scale)·uncond`` — i.e. ``α·u + s(c − α·u)`` on plain CFG —
    as one multiply-add after the two reductions (α in float32)."""
    b = x.shape[0]
    e_cond = (x - cond).reshape(b, -1).float()
    e_uncond = (x - uncond).reshape(b, -1).float()
    alpha = (e_cond * e_uncond).sum(1) / ((e_uncond * e_uncond).sum(1) + 1e-8)
    weight = ((alpha - 1.0) * (1.0 - cond_scale)).to(denoised.dtype).view(b, *([1] * (denoised.dim() - 1)))
    return torch.addcmul(denoised, uncond, weight)


def rescale_cfg(x, cond, uncond, sigma: torch.Tensor, cond_scale: float, multiplier: float) -> torch.Tensor:
    """ComfyUI's RescaleCFG, returned as the denoised prediction. In v space
    ``v = (a − x0)·√(σ²+1)/σ`` with ``a = x/(σ²+1)``; CFG, then diffusers' rescale against cond's
    per-sample std. The v scaling cancels in the std ratio and in the way back, so the fused combine
    (one call, rescale included) runs on ``a − x0`` and the result is ``a − combined``."""
    s2 = sigma.reshape(sigma.shape[:1] + (1,) * (x.dim() - 1)) ** 2 + 1.0
    a = x / s2
    combined = gk.guidance_combine([a - uncond, a - cond], gk.cfg(cond_scale), rescale=multiplier)
    return a - combined


# --------------------------------------------------------------------------- CFGNorm, Mahiro, TCFG


def cfg_norm(denoised, cond, strength: float, *, fused: bool = True) -> torch.Tensor:
    """ComfyUI's CFGNorm: ``denoised · clamp(‖cond‖ / (‖denoised‖ + 1e-8), 0, 1) · strength`` with
    norms over the channel dim (one ratio per pixel). Fused: one guidance_combine call with no
    terms (its output is ``denoised``) and CFG-Norm against cond."""
    if fused:
        return gk.guidance_combine([denoised, cond], gk.Guidance(0), rescale_ref=1, cfg_norm=strength)
    ratio = torch.linalg.vector_norm(cond, dim=1, keepdim=True) / (
        torch.linalg.vector_norm(denoised, dim=1, keepdim=True) + 1e-8)
    return denoised * ratio.clamp(0.0, 1.0) * strength


def _signed_sqrt(t: torch.Tensor) -> torch.Tensor:
    return t.abs().sqrt() * t.sign()


def mahiro(denoised, cond, uncond, cond_scale: float) -> torch.Tensor:
    """ComfyUI's Mahiro: ``leap = s·cond``; the cosine similarity (over channels, averaged over
    everything, the batch included) of the signed square roots of ``s·uncond`` and
    ``(leap + denoised)/2`` gives ``w = 2(sim + 1)``; the result is ``(w·denoised + (4 − w)·leap)/4``."""
    leap = cond * cond_scale
    merged = (leap + denoised) / 2
    weight = 2 * (F.cosine_similarity(_signed_sqrt(uncond * cond_scale), _signed_sqrt(merged)).mean() + 1)
    return (weight * denoised + (4 - weight) * leap) / 4


def _tangential_projection(e_cond: torch.Tensor, e_uncond: torch.Tensor) -> torch.Tensor:
    """``e_uncond`` projected on the principal right-singular vector of the per-sample 2×D matrix
    ``[e_uncond; e_cond]``, in closed form from its 2×2 Gram matrix ``[[uu, uc], [uc, cc]]``: with
    ``h = (uu − cc)/2`` and ``r = √(h² + uc²)`` the projection is ``α·e_uncond + β·e_cond``,
    ``α = (r + h)/(2r)``, ``β = uc/(2r)``. ``r = 0`` (equal, orthogonal rows — every unit vector of
    their span is principal — or zero rows) keeps ``e_uncond``."""
    b = e_uncond.shape[0]
    u = e_uncond.reshape(b, -1).float()
    c = e_cond.reshape(b, -1).float()
    uu, cc, uc = ((u * u).sum(1).double(), (c * c).sum(1).double(), (u * c).sum(1).double())
    h = (uu - cc) / 2
    r = torch.sqrt(h * h + uc * uc)
    safe = torch.where(r > 0, r, torch.ones_like(r))
    # α without cancellation: (r + h)/(2r) for h ≥ 0, uc²/(2r(r − h)) for h < 0 (the same number).
    alpha = torch.where(h >= 0, (safe + h) / (2 * safe), uc * uc / (2 * safe * (safe - h)))
    alpha = torch.where(r > 0, alpha, torch.ones_like(alpha))
    beta = torch.where(r > 0, uc / (2 * safe), torch.zeros_like(uc))
    out = alpha.float().unsqueeze(1) * u + beta.float().unsqueeze(1) * c
    return out.reshape(e_uncond.shape).to(e_uncond.dtype)


def tangential_uncond(x, cond, uncond, *, fused: bool = True) -> torch.Tensor:
    """ComfyUI's TCFG (``pre_cfg_function``): the uncond prediction whose ``x − uncond`` is
    projected on the principal right-singular direction of ``[x − uncond; x − cond]`` (per sample;
    the stock node runs ``torch.linalg.svd``, this the closed form of the 2×2 Gram matrix)."""
    e_cond, e_uncond = x - cond, x - uncond
    if fused:
        # The fused TCFG combine is CFG on the damped uncond: at scale 0 it is the damped uncond.
        return x - gk.tcfg_combine([e_cond, e_uncond], 0.0, cond=0, uncond=1)
    return x - _tangential_projection(e_cond, e_uncond)
