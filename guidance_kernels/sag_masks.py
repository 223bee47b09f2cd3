"""The masks SAG blurs under, for the paper's masking ablation (Hong et al. 2023): each provider
returns a map :func:`~guidance_kernels.sag_degrade` takes in place of the attention key mass — a
ready mask ``(B|1, 1, h, w)`` of blend weights in [0, 1].

* :func:`attention_mask` — the thresholded key mass itself (to look at or combine);
* :func:`global_mask` — blur everything;
* :func:`random_patch_mask`, :func:`square_patch_mask` — random patches / one random square;
* :func:`high_frequency_mask` — where the latent has high-frequency content (FFT).
"""

from __future__ import annotations

import torch

from . import _checks


def attention_mask(mass: torch.Tensor, grid: tuple[int, int], *, threshold: float = 1.0) -> torch.Tensor:
    """The attention mask SAG blurs, to look at or combine: ``(mass > threshold)`` on ``grid`` as a
    float32 ``(B, 1, h, w)`` 0/1 map. (:func:`sag_degrade` takes the mass itself and thresholds it
    in the kernel; passing this mask instead gives the same result.)"""
    fn = "attention_mask"
    _checks.float_tensor(fn, "mass", mass)
    if mass.dim() != 2:
        _checks.fail(fn, "mass", f"expected (B, N), got shape {tuple(mass.shape)}")
    h, w = _checks.grid(fn, grid, names="(h, w)")
    if h * w != mass.shape[1]:
        _checks.fail(fn, "grid", f"{h}x{w} = {h * w} cells but the key mass has {mass.shape[1]} keys")
    threshold = _checks.finite_number(fn, "threshold", threshold)
    return (mass.float() > threshold).float().reshape(-1, 1, h, w)


def global_mask(batch: int = 1, *, device=None) -> torch.Tensor:
    """Blur everything (the paper's "global" ablation): a float32 ``(batch, 1, 1, 1)`` mask of ones."""
    return torch.ones((_checks.integer("global_mask", "batch", batch, minimum=1), 1, 1, 1), device=device)


def random_patch_mask(batch: int, grid: tuple[int, int], *, fraction: float = 0.5,
                      generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Random patches (the paper's "random" ablation): on a ``grid`` of patches, exactly
    ``round(fraction·h·w)`` cells per sample, drawn uniformly without replacement, are 1.
    Returns float32 ``(batch, 1, h, w)``; nearest upsampling in :func:`sag_degrade` turns each
    cell into a patch of the latent. ``generator`` lives on the CPU (masks are drawn there)."""
    fn = "random_patch_mask"
    batch = _checks.integer(fn, "batch", batch, minimum=1)
    h, w = _checks.grid(fn, grid, names="(h, w)")
    fraction = _checks.finite_number(fn, "fraction", fraction, minimum=0.0)
    if fraction > 1:
        _checks.fail(fn, "fraction", f"must be in [0, 1], got {fraction}")
    count = round(fraction * h * w)
    order = torch.rand((batch, h * w), generator=generator).argsort(dim=1)
    mask = (order < count).float()  # the rank of each cell in a random order: the first `count` are chosen
    return mask.reshape(batch, 1, h, w).to(device)


def square_patch_mask(batch: int, grid: tuple[int, int], *, size: int, generator: torch.Generator | None = None,
                      device=None) -> torch.Tensor:
    """One square per sample (the paper's "square" ablation): a ``size × size`` block of 1s at a
    uniformly random position inside ``grid`` (use the latent size as grid for pixel squares).
    Returns float32 ``(batch, 1, h, w)``; ``generator`` lives on the CPU."""
    fn = "square_patch_mask"
    batch = _checks.integer(fn, "batch", batch, minimum=1)
    h, w = _checks.grid(fn, grid, names="(h, w)")
    size = _checks.integer(fn, "size", size, minimum=1)
    if size > min(h, w):
        _checks.fail(fn, "size", f"{size} does not fit in the {h}x{w} grid")
    top = torch.randint(0, h - size + 1, (batch,), generator=generator)
    left = torch.randint(0, w - size + 1, (batch,), generator=generator)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < top.view(-1, 1, 1) + size)
              & (cols >= left.view(-1, 1, 1)) & (cols < left.view(-1, 1, 1) + size))
    return inside.float().unsqueeze(1).to(device)


def high_frequency_mask(x0: torch.Tensor, *, cutoff: float = 0.25, threshold: float = 1.0) -> torch.Tensor:
    """Where the latent has high-frequency content (the paper's "high-frequency" ablation).

    ``hp = ifft2(fft2(x0) · [|f| > cutoff · 0.5])`` removes the frequencies within ``cutoff`` of
    the Nyquist radius (``|f|`` in cycles per pixel, ``fftfreq`` per axis); the energy
    ``e = mean_channels |hp|²`` is thresholded relative to its per-sample mean:
    ``mask = e > threshold · mean(e)`` — the same "above average" rule as the attention mass.
    Returns float32 ``(B, 1, H, W)`` on x0's device (computed in float32)."""
    fn = "high_frequency_mask"
    _checks.float_tensor(fn, "x0", x0)
    if x0.dim() != 4:
        _checks.fail(fn, "x0", f"expected (B, C, H, W), got shape {tuple(x0.shape)}")
    cutoff = _checks.finite_number(fn, "cutoff", cutoff, minimum=0.0)
    threshold = _checks.finite_number(fn, "threshold", threshold)
    height, width = x0.shape[-2:]
    if height == 0 or width == 0:
        _checks.fail(fn, "x0", f"has an empty spatial grid {tuple(x0.shape[-2:])}")
    if x0.shape[0] == 0 or x0.shape[1] == 0:  # nothing to transform (torch's FFT rejects empty batches)
        return torch.zeros((x0.shape[0], 1, height, width), dtype=torch.float32, device=x0.device)
    x = x0.to(torch.float64 if x0.dtype == torch.float64 else torch.float32)
    fy = torch.fft.fftfreq(height, device=x.device, dtype=x.dtype).view(-1, 1)
    fx = torch.fft.fftfreq(width, device=x.device, dtype=x.dtype).view(1, -1)
    keep = (fy.square() + fx.square()).sqrt() > cutoff * 0.5
    high = torch.fft.ifft2(torch.fft.fft2(x) * keep).real
    energy = high.square().mean(dim=1, keepdim=True)
    mean = energy.mean(dim=(2, 3), keepdim=True)
    return (energy > threshold * mean).float()

