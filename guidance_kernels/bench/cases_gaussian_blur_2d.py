"""Benchmark cases of gaussian_blur_2d: SAG's latent blur (k = 9, diffusers' SAG) and SEG's query
blur at σ = 2, 10 and ∞ (the grid mean), in the layouts the attention processors hold.

GPU (bf16): SDXL's latent and mid-block queries (10 heads × 4096 tokens × d 64). CPU (fp32): half
the sizes plus the (B, N, C) token layout. Tiny: odd grids. Providers: the reference (SEG-SDXL's
k×k convolution, or the mean), ``torch.compile`` of it with ``--full``, and our backends. Bytes:
one read and one write of the tensor.
"""

from __future__ import annotations

import math

import torch

import guidance_kernels as gk
from guidance_kernels import reference

from .._spec import blur_kernel_size
from .harness import Case, Setup, dtype_name, our_providers, reference_providers

OPS = ["gaussian_blur_2d"]

# (name, shape, layout, grid, sigma, kernel size: None = SEG's rule for sigma)
SHAPES = {
    "real": [("SAG latent k=9", (1, 4, 128, 128), "nchw", (128, 128), 1.0, 9),
             ("SEG queries σ=2", (1, 10, 4096, 64), "bhnd", (64, 64), 2.0, None),
             ("SEG queries σ=10", (1, 10, 4096, 64), "bhnd", (64, 64), 10.0, None),
             ("SEG queries σ=∞", (1, 10, 4096, 64), "bhnd", (64, 64), math.inf, None)],
    "small": [("SAG latent k=9", (1, 4, 64, 64), "nchw", (64, 64), 1.0, 9),
              ("SEG tokens σ=2", (1, 1024, 640), "bnc", (32, 32), 2.0, None),
              ("SEG tokens σ=10", (1, 1024, 640), "bnc", (32, 32), 10.0, None),
              ("SEG queries σ=10", (1, 10, 1024, 64), "bhnd", (32, 32), 10.0, None),
              ("SEG tokens σ=∞", (1, 1024, 640), "bnc", (32, 32), math.inf, None)],
    "tiny": [("SAG latent k=5", (2, 3, 7, 9), "nchw", (7, 9), 1.0, 5),
             ("SEG tokens σ=2", (1, 35, 6), "bnc", (5, 7), 2.0, None),
             ("SEG queries σ=∞", (1, 2, 35, 8), "bhnd", (5, 7), math.inf, None)],
}


def _case(setup: Setup, name: str, shape, layout: str, grid, sigma: float, size: int | None) -> Case:
    x = torch.randn(shape, device=setup.device, dtype=setup.dtype)
    if size is None:
        size = blur_kernel_size(sigma, grid) or None  # SEG's rule; 0 means σ = ∞: the mean

    def ref():
        # SAG's blur (diffusers) has no cap; SEG's size is already capped, its mean is not a blur
        return reference.blur_tokens(x, sigma, grid, layout, size, cap_to_grid=size is None)

    providers = reference_providers(setup, ref)
    providers += our_providers("gaussian_blur_2d", x, lambda backend: gk.gaussian_blur_2d(
        x, sigma, kernel_size=size, grid=grid, layout=layout, backend=backend))
    k = "∞" if size is None else size
    return Case(op="gaussian_blur_2d", name=name, shape=f"{tuple(shape)} {layout} k={k}",
                dtype=dtype_name(x.dtype), providers=providers, bytes=2 * x.numel() * x.element_size())


def cases(setup: Setup) -> list[Case]:
    return [_case(setup, *spec) for spec in SHAPES[setup.shapes]]
