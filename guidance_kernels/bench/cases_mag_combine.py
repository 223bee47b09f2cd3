"""Benchmark cases of mag_combine (magnitude-aware guidance) at the latent sizes of
:mod:`.cases_tcfg_combine`: the eager anchor (diffusers' mambo_guidance with its norms read as the
Frobenius norm), ``torch.compile`` of it where the setup wants it, and our backends."""

from __future__ import annotations

import guidance_kernels as gk
from guidance_kernels import reference

from .cases_tcfg_combine import latents, two_branch_case
from .harness import Case, Setup

OPS = ["mag_combine"]

SPEEDUP_GOAL = 3.0


def cases(setup: Setup) -> list[Case]:
    return [two_branch_case(setup, "mag_combine", f"{name} mag", shape,
                            lambda pred, backend: gk.mag_combine(pred, 10.0, backend=backend),
                            lambda c, u: reference.mag_combine(c, u, 10.0), SPEEDUP_GOAL)
            for name, shape in latents(setup).items()]
