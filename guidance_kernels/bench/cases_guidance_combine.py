"""Benchmark cases of the combine family (guidance_combine, apg_combine, cfg_zero_star_combine):
plain / +rescale / +APG / CFG-Zero* at SDXL, Flux and video latent sizes (GPU, bf16), small latents
(CPU, fp32) or tiny odd ones (smoke).

Providers: the eager reference (diffusers' formulas on ``pred.chunk(K)``), ``torch.compile`` of the
same reference (a goal compares against it), and each of our backends usable here. Bytes are those
of an ideal single pass: every referenced branch read once and the output written once.
"""

from __future__ import annotations

import torch

import guidance_kernels as gk
from guidance_kernels import reference

from .harness import (
    COMPILED,
    EAGER,
    Case,
    Goal,
    Setup,
    at_bandwidth,
    both,
    dtype_name,
    faster_than,
    our_providers,
    reference_providers,
)

# The op stems these cases time (bench --ops filters on them).
OPS = ["guidance_combine", "apg_combine", "cfg_zero_star_combine"]

SPEEDUP_GOALS = {"plain": 2.5, "rescale": 4.0, "apg": 6.0}
COPY_FRACTION = 0.85
GUIDANCE = gk.cfg(7.5) + gk.pag(3.0)


def _shapes(setup: Setup) -> tuple[dict, tuple]:
    """(latents by name, (video name, video shape)) for the setup's size."""
    if setup.shapes == "real":
        return ({"SDXL 1024px": (1, 4, 128, 128), "Flux 1024px": (1, 16, 128, 128)},
                ("video 16x21x90x160", (1, 16, 21, 90, 160)))
    if setup.shapes == "small":
        return ({"SD1.5 512px": (1, 4, 64, 64), "SDXL 1024px": (1, 4, 128, 128)},
                ("video (small) 16x5x30x40", (1, 16, 5, 30, 40)))
    return {"tiny 2x3x5x7": (2, 3, 5, 7)}, ("video (tiny) 3x2x3x5", (1, 3, 2, 3, 5))


def _case(setup: Setup, op: str, name: str, shape, pred: torch.Tensor, k: int, ours, ref,
          goal: Goal | None, *, goal_uses_compile: bool = False) -> Case:
    numel = pred.numel() // k
    providers = reference_providers(setup, ref, goal_uses_compile=goal_uses_compile)
    providers += our_providers(op, pred, ours)
    return Case(op=op, name=name, shape=f"{k}x{tuple(shape)}", dtype=dtype_name(pred.dtype), providers=providers,
                bytes=(k + 1) * numel * pred.element_size(), goals=[goal] if goal else [])


def _speedup_goal(kind: str) -> Goal:
    target = SPEEDUP_GOALS[kind]
    return Goal(f">= {target}x {EAGER} and <= {COMPILED} time (GPU, bf16)",
                both(faster_than(EAGER, target), faster_than(COMPILED, 1.0)))


def _latent_cases(setup: Setup, name: str, shape) -> list[Case]:
    pred = torch.randn(3 * shape[0], *shape[1:], device=setup.device, dtype=setup.dtype)
    pair = pred[: 2 * shape[0]]
    b = shape[0]
    return [
        _case(setup, "guidance_combine", f"{name} plain", shape, pred, 3,
              lambda backend: gk.guidance_combine(pred, GUIDANCE, backend=backend),
              lambda: reference.guidance_combine(pred.chunk(3), GUIDANCE), _speedup_goal("plain"),
              goal_uses_compile=True),
        _case(setup, "guidance_combine", f"{name} rescale", shape, pred, 3,
              lambda backend: gk.guidance_combine(pred, GUIDANCE, rescale=0.7, backend=backend),
              lambda: reference.guidance_combine(pred.chunk(3), GUIDANCE, rescale=0.7), _speedup_goal("rescale"),
              goal_uses_compile=True),
        _case(setup, "apg_combine", f"{name} apg", shape, pair, 2,
              lambda backend: gk.apg_combine(pair, 7.5, norm_threshold=15.0, eta=0.5, backend=backend),
              lambda: reference.apg_combine(pair[b:], pair[:b], 7.5, norm_threshold=15.0, eta=0.5),
              _speedup_goal("apg"), goal_uses_compile=True),
        _case(setup, "cfg_zero_star_combine", f"{name} cfg-zero*", shape, pair, 2,
              lambda backend: gk.cfg_zero_star_combine(pair, 5.0, backend=backend),
              lambda: reference.cfg_zero_star_combine(pair[b:], pair[:b], 5.0), None),
    ]


def _video_case(setup: Setup, name: str, shape) -> Case:
    pred = torch.randn(3 * shape[0], *shape[1:], device=setup.device, dtype=setup.dtype)
    nbytes = 4 * pred.numel() // 3 * pred.element_size()
    goal = Goal(f">= {COPY_FRACTION:.0%} of the copy_ bandwidth measured in this run (GPU, bf16)",
                at_bandwidth(nbytes, COPY_FRACTION))
    return _case(setup, "guidance_combine", f"{name} plain", shape, pred, 3,
                 lambda backend: gk.guidance_combine(pred, GUIDANCE, backend=backend),
                 lambda: reference.guidance_combine(pred.chunk(3), GUIDANCE), goal)


def cases(setup: Setup) -> list[Case]:
    latents, (video_name, video_shape) = _shapes(setup)
    out = [_video_case(setup, video_name, video_shape)]
    for name, shape in latents.items():
        out += _latent_cases(setup, name, shape)
    return out
