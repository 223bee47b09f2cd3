"""Benchmark cases of fdg_combine at the latent sizes of :mod:`.cases_tcfg_combine`: diffusers'
default two levels ([10, 5]) and three levels with parallel weights and a data-space rescale.
Providers: the eager anchor (diffusers' guider on kornia's pyramid, as the kornia-exact reference
computes it; the video latent is padded to powers of two as kornia does), torch.compile of it,
and our backends."""

from __future__ import annotations

import torch

from .. import fdg_combine, reference
from .cases_tcfg_combine import latents, providers, speedup_goal
from .harness import Case

OPS = ["fdg_combine"]

VARIANTS = {"2 levels": ([10.0, 5.0], {}),
            "3 levels + parallel + rescale": ([10.0, 5.0, 2.0], {"parallel_weights": 0.5, "rescale": 0.7})}


def cases(device: torch.device, quick: bool) -> list[Case]:
    dtype, shapes = latents(device)
    elem = torch.finfo(dtype).bits // 8
    out = []
    for name, shape in shapes.items():
        pred = torch.randn(2 * shape[0], *shape[1:], device=device, dtype=dtype)
        u, c = pred[: shape[0]], pred[shape[0]:]
        for variant, (scales, kw) in VARIANTS.items():
            text, check = speedup_goal(5.0, device)
            out.append(Case(op="fdg_combine", name=f"{name} fdg {variant}", shape=f"2x{tuple(shape)}",
                            dtype=str(dtype).replace("torch.", ""),
                            providers=providers("fdg_combine", pred,
                                                lambda b, p=pred, s=scales, k=kw: fdg_combine(p, s, backend=b, **k),
                                                lambda c=c, u=u, s=scales, k=kw: reference.fdg_combine(c, u, s, **k)),
                            bytes=3 * u.numel() * elem, goal=text, goal_check=check))
    return out
