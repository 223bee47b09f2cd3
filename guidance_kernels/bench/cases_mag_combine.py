"""Benchmark cases of mag_combine (magnitude-aware guidance) at the latent sizes of
:mod:`.cases_tcfg_combine`: the eager anchor (diffusers' mambo_guidance with its norms read as the
Frobenius norm), torch.compile of it, and our backends."""

from __future__ import annotations

import torch

from .. import mag_combine, reference
from .cases_tcfg_combine import latents, providers, speedup_goal
from .harness import Case

OPS = ["mag_combine"]


def cases(device: torch.device, quick: bool) -> list[Case]:
    dtype, shapes = latents(device)
    elem = torch.finfo(dtype).bits // 8
    out = []
    for name, shape in shapes.items():
        pred = torch.randn(2 * shape[0], *shape[1:], device=device, dtype=dtype)
        u, c = pred[: shape[0]], pred[shape[0]:]
        text, check = speedup_goal(3.0, device)
        out.append(Case(op="mag_combine", name=f"{name} mag", shape=f"2x{tuple(shape)}",
                        dtype=str(dtype).replace("torch.", ""),
                        providers=providers("mag_combine", pred, lambda b, p=pred: mag_combine(p, 10.0, backend=b),
                                            lambda c=c, u=u: reference.mag_combine(c, u, 10.0)),
                        bytes=3 * u.numel() * elem, goal=text, goal_check=check))
    return out
