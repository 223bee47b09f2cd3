"""Benchmark cases of tcfg_combine at SDXL, Flux and video latent sizes (GPU, bf16), small latents
(CPU, fp32) or tiny odd ones (smoke): the eager anchor (diffusers' normalized_guidance: an SVD per
sample), ``torch.compile`` of it where the setup wants it, and each of our backends usable here
(the torch backend is the closed form of the 2×2 Gram matrix, so the CPU table shows the algorithmic
win too). Bytes: both branches read once, the output written once. Also :func:`latents` and
:func:`two_branch_case`, which the cases of mag_combine and fdg_combine share."""

from __future__ import annotations

import torch

import guidance_kernels as gk
from guidance_kernels import reference

from .harness import EAGER, Case, Goal, Setup, dtype_name, faster_than, our_providers, reference_providers

OPS = ["tcfg_combine"]

SPEEDUP_GOAL = 20.0


def latents(setup: Setup) -> dict[str, tuple[int, ...]]:
    """{name: one branch's shape} for the setup's size (4-D images and a 5-D video latent)."""
    if setup.shapes == "real":
        return {"SDXL 1024px": (1, 4, 128, 128), "Flux 1024px": (1, 16, 128, 128),
                "video 16x21x90x160": (1, 16, 21, 90, 160)}
    if setup.shapes == "small":
        return {"SD1.5 512px": (1, 4, 64, 64), "SDXL 1024px": (1, 4, 128, 128),
                "video (small) 16x5x30x40": (1, 16, 5, 30, 40)}
    return {"tiny 2x3x6x10": (2, 3, 6, 10), "video (tiny) 3x2x4x6": (1, 3, 2, 4, 6)}


def two_branch_case(setup: Setup, op: str, name: str, shape, ours, anchor, target: float) -> Case:
    """A case on a stacked (uncond, cond) pred: ``ours(pred, backend)`` against ``anchor(cond, uncond)``,
    with the goal ``target`` × the eager anchor on a GPU."""
    pred = torch.randn(2 * shape[0], *shape[1:], device=setup.device, dtype=setup.dtype)
    u, c = pred[: shape[0]], pred[shape[0]:]
    goal = Goal(f">= {target:g}x {EAGER} (GPU, bf16)", faster_than(EAGER, target))
    providers = reference_providers(setup, lambda: anchor(c, u))
    providers += our_providers(op, pred, lambda backend: ours(pred, backend))
    return Case(op=op, name=name, shape=f"2x{tuple(shape)}", dtype=dtype_name(pred.dtype), providers=providers,
                bytes=3 * u.numel() * pred.element_size(), goals=[goal])


def cases(setup: Setup) -> list[Case]:
    return [two_branch_case(setup, "tcfg_combine", f"{name} tcfg", shape,
                            lambda pred, backend: gk.tcfg_combine(pred, 7.5, backend=backend),
                            lambda c, u: reference.tcfg_combine(c, u, 7.5), SPEEDUP_GOAL)
            for name, shape in latents(setup).items()]
