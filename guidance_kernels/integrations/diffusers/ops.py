"""The tensor operations the integration runs, chosen once per denoiser: the fused ops or the
anchors' formulations (the no-kernels baseline of the example, the benchmark and the tests).

Both :data:`FUSED` and :data:`REFERENCE` take the same arguments, so processors and the denoiser
never branch on which one they hold:

=========================  ================================================  ==================================
member                     fused (``import guidance_kernels``)               reference (anchors)
=========================  ================================================  ==================================
``guided_attention``       one launch, per-row modes                         per-row SDPA, S×S identity mask
``attention_key_mass``     flash-style, mass of the wanted rows only         explicit (B·heads, N, N) map
``blur_tokens``            separable blur kernel over an (H, W) token grid   conv2d with SEG-SDXL's k×k kernel
``sag_degrade``            one kernel                                        diffusers' ``sag_masking`` steps
``guidance_combine``       fused combine (+ rescale, CFG-Norm or Mahiro)     eager ``u + s(c − u) + …``, ComfyUI's
                                                                             CFGNorm / Mahiro formulas
``apg_combine``            fused                                             diffusers' ``normalized_guidance``
``cfg_zero_star_combine``  fused                                             diffusers' guider formula
``tcfg_combine``           fused, closed form of the 2×2 Gram matrix         diffusers' guider (an SVD per sample)
``mag_combine``            fused                                             diffusers' ``mambo_guidance``
                                                                             (Frobenius norms)
``fdg_combine``            fused pyramid passes                              diffusers' guider on kornia's pyramid
=========================  ================================================  ==================================

Shapes: attention tensors are ``(B, heads, N, d)`` views (any strides); tokens ``(B, N, C)`` with
the ``H·W`` grid row-major; predictions ``(B, …)`` per branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import guidance_kernels as gk
from guidance_kernels import reference as ref


@dataclass(frozen=True)
class Ops:
    """One implementation of every operation the integration needs (see the module docstring)."""

    name: str
    guided_attention: Callable  # (q, k, v, modes, sigma, grid, text_tokens, text_position) -> (B, heads, N, d)
    attention_key_mass: Callable  # (q, k, v, heads, items) on (B, N, heads·d) -> (out, mass (len(items), N))
    blur_tokens: Callable  # (x (B, N, C), sigma, grid (H, W)) -> blurred x
    sag_degrade: Callable  # sag_degrade's signature
    guidance_combine: Callable  # (branches, guidance, rescale, rescale_ref, cfg_norm=None, mahiro=False) -> (B, …)
    apg_combine: Callable  # (cond, uncond, scale, rescale, **options) -> (B, …)
    cfg_zero_star_combine: Callable  # (cond, uncond, scale, rescale, **options) -> (B, …)
    tcfg_combine: Callable  # (cond, uncond, scale, rescale, **options) -> (B, …)
    mag_combine: Callable  # (cond, uncond, scale, rescale, **options) -> (B, …)
    fdg_combine: Callable  # (cond, uncond, per-level scales, rescale, **options) -> (B, …)


def _fused_attention(q, k, v, modes, sigma, grid, text_tokens, text_position):
    return gk.guided_attention(q, k, v, modes=modes, sigma=sigma, grid=grid, text_tokens=text_tokens,
                               text_position=text_position)


def _fused_key_mass(q, k, v, heads, items):
    return gk.attention_key_mass(q, k, v, layout="bnd", heads=heads, items=list(items))


def _fused_blur(x, sigma, grid):
    return gk.gaussian_blur_2d(x, sigma, grid=grid, layout="bnc")


def _fused_combine(branches, guidance, rescale, rescale_ref, cfg_norm=None, mahiro=False):
    return gk.guidance_combine(branches, guidance, rescale=rescale, rescale_ref=rescale_ref, cfg_norm=cfg_norm,
                               mahiro=mahiro)


def _fused_apg(cond, uncond, scale, rescale, **options):
    return gk.apg_combine([uncond, cond], scale, rescale=rescale, **options)


def _fused_zero_star(cond, uncond, scale, rescale, **options):
    return gk.cfg_zero_star_combine([uncond, cond], scale, rescale=rescale, **options)


def _fused_two_branch(fn):
    def combine(cond, uncond, scale, rescale, **options):
        return fn([uncond, cond], scale, rescale=rescale, **options)
    return combine


FUSED = Ops("fused", _fused_attention, _fused_key_mass, _fused_blur, gk.sag_degrade, _fused_combine, _fused_apg,
            _fused_zero_star, _fused_two_branch(gk.tcfg_combine), _fused_two_branch(gk.mag_combine),
            _fused_two_branch(gk.fdg_combine))


def _reference_attention(q, k, v, modes, sigma, grid, text_tokens, text_position):
    modes = ["none"] * q.shape[0] if modes is None else modes
    return ref.guided_attention(q, k, v, modes, sigma, grid, text_tokens=text_tokens, text_position=text_position)


def _reference_key_mass(q, k, v, heads, items):
    out, mass = ref.attention_key_mass(q, k, v, layout="bnd", heads=heads)
    return out, mass[list(items)]


def _reference_blur(x, sigma, grid):
    return ref.blur_tokens(x, sigma, grid, "bnc")


def _reference_combine(branches, guidance, rescale, rescale_ref, cfg_norm=None, mahiro=False):
    out = ref.guidance_combine(branches, guidance, rescale=rescale, rescale_ref=rescale_ref)
    if cfg_norm is not None:
        return ref.cfg_norm(out, branches[rescale_ref], cfg_norm)
    if mahiro:
        cfg = guidance.terms[0]
        return ref.mahiro(out, branches[cfg.pos], branches[cfg.neg], cfg.scale)
    return out


def _reference_apg(cond, uncond, scale, rescale, **options):
    return ref.apg_combine(cond, uncond, scale, rescale=rescale, **options)


def _reference_zero_star(cond, uncond, scale, rescale, **options):
    return ref.cfg_zero_star_combine(cond, uncond, scale, rescale=rescale, **options)


def _reference_two_branch(fn):
    def combine(cond, uncond, scale, rescale, **options):
        return fn(cond, uncond, scale, rescale=rescale, **options)
    return combine


REFERENCE = Ops("reference", _reference_attention, _reference_key_mass, _reference_blur, ref.sag_degrade,
                _reference_combine, _reference_apg, _reference_zero_star, _reference_two_branch(ref.tcfg_combine),
                _reference_two_branch(ref.mag_combine), _reference_two_branch(ref.fdg_combine))
