"""The combine step of the guiders' CFG-shaped terms.

Predictions come as ONE stacked ``(K·B, …)`` tensor (the batched call) or as a list of K
``(B, …)`` tensors (``forward(pred_cond, pred_uncond, …)`` called directly); ``cond`` /
``uncond`` are branch positions. CFG and the PAG / SEG / SLG terms are one
:func:`guidance_kernels.guidance_combine`; the other guiders call their fused op directly
(``apg_combine``, ``cfg_zero_star_combine``, ``tcfg_combine``, ``mag_combine``, ``fdg_combine``).
"""

from __future__ import annotations

import guidance_kernels as gk


def linear(pred, num_branches: int, base: int, terms, *, rescale: float, cond: int):
    """``D[base] + Σ s·(D[pos] − D[neg])`` over ``terms`` = ``[(pos, neg, s), …]``, then guidance
    rescale (diffusers' ``rescale_noise_cfg``) against ``D[cond]``."""
    guidance = gk.Guidance(base, tuple(gk.Term(pos, neg, s) for pos, neg, s in terms))
    return gk.guidance_combine(pred, guidance, num_branches=num_branches, rescale=rescale, rescale_ref=cond)
