"""Benchmark cases of fdg_combine at the latent sizes of :mod:`.cases_tcfg_combine`: diffusers'
default two levels ([10, 5]) and three levels with parallel weights and a data-space rescale.
Providers: the eager anchor (diffusers' guider on kornia's pyramid, as the kornia-exact reference
computes it; a latent whose sides are not divisible is padded as kornia does), ``torch.compile``
of it where the setup wants it, and our backends."""

from __future__ import annotations

import guidance_kernels as gk
from guidance_kernels import _spec, reference

from .cases_tcfg_combine import latents, two_branch_case
from .harness import Case, Setup

OPS = ["fdg_combine"]

SPEEDUP_GOAL = 5.0
VARIANTS = {"2 levels": ([10.0, 5.0], {}),
            "3 levels + parallel + rescale": ([10.0, 5.0, 2.0], {"parallel_weights": 0.5, "rescale": 0.7})}


def cases(setup: Setup) -> list[Case]:
    out = []
    for name, shape in latents(setup).items():
        for variant, (scales, kw) in VARIANTS.items():
            if _spec.fdg_level_sizes(shape[-2], shape[-1], len(scales)) is None:
                continue  # too many levels for a tiny latent
            out.append(two_branch_case(
                setup, "fdg_combine", f"{name} fdg {variant}", shape,
                lambda pred, backend, s=scales, k=kw: gk.fdg_combine(pred, s, backend=backend, **k),
                lambda c, u, s=scales, k=kw: reference.fdg_combine(c, u, s, **k), SPEEDUP_GOAL))
    return out
