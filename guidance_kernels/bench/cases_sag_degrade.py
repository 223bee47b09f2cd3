"""Benchmark cases of sag_degrade at SD1.5 (4×64×64, 8×8 map) and SDXL (4×128×128, 32×32 map)
latents (tiny: an odd latent), DDPM re-noise with a per-sample ᾱ tensor.

Providers: the eager reference (diffusers' sag_masking operations), ``torch.compile`` of it with
``--full``, and our backends. Goal: ≥ 5× faster than eager. Bytes: x0 and ε read, the output written.
"""

from __future__ import annotations

import torch

import guidance_kernels as gk
from guidance_kernels import reference

from .harness import EAGER, Case, Goal, Setup, dtype_name, faster_than, our_providers, reference_providers

OPS = ["sag_degrade"]

# name -> (latent shape, attention map grid)
SHAPES = {
    "real": {"SD1.5 512px": ((1, 4, 64, 64), (8, 8)), "SDXL 1024px": ((1, 4, 128, 128), (32, 32))},
    "tiny": {"tiny 2x3x10x14": ((2, 3, 10, 14), (5, 7))},
}
SHAPES["small"] = SHAPES["real"]


def _case(setup: Setup, name: str, shape, grid) -> Case:
    dtype = torch.float16 if setup.gpu else torch.float32
    x0 = torch.randn(shape, device=setup.device, dtype=dtype)
    eps = torch.randn(shape, device=setup.device, dtype=dtype)
    mass = torch.rand(shape[0], grid[0] * grid[1], device=setup.device) * 2
    alpha = torch.full((shape[0],), 0.5, device=setup.device)
    providers = reference_providers(setup, lambda: reference.sag_degrade(x0, mass, grid=grid, eps=eps,
                                                                         alpha_cumprod=alpha))
    providers += our_providers("sag_degrade", x0, lambda backend: gk.sag_degrade(
        x0, mass, grid=grid, eps=eps, alpha_cumprod=alpha, backend=backend))
    return Case(op="sag_degrade", name=f"{name} ddpm", shape=str(tuple(shape)), dtype=dtype_name(dtype),
                providers=providers, bytes=3 * x0.numel() * x0.element_size(),
                goals=[Goal(f">= 5x faster than the {EAGER} (GPU time)", faster_than(EAGER, 5.0))])


def cases(setup: Setup) -> list[Case]:
    return [_case(setup, name, *spec) for name, spec in SHAPES[setup.shapes].items()]
