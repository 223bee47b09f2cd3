"""Launch planning shared by the SAG backends (attention_key_mass, sag_degrade).

Plain Python on shapes and floats: no kernel, no device work. The Triton and CUDA launchers and
the torch backend use the same rules so that they agree bit for bit on indices and weights.
"""

from __future__ import annotations

import struct

import torch

from .reference import gaussian_kernel_1d

RENOISE = {"none": 0, "ddpm": 1, "kdiff": 2}
MAX_KERNEL_SIZE = 15  # blur taps the kernels support (odd sizes 1..15; k = 9 in both anchors)


def heads_view(t: torch.Tensor, heads: int, layout: str) -> torch.Tensor:
    """``(B, heads, N, d)`` view of a ``"bhnd"`` tensor (itself) or a ``"bnd"`` one ``(B, N, heads·d)``
    (diffusers' head split: channel ``h·d + i`` is head ``h``, feature ``i``). Never copies."""
    if layout == "bnd":
        return t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(1, 2)
    return t


def fp32(value: float) -> float:
    """``value`` rounded to the nearest float32 (as a Python float)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def nearest_scale(in_size: int, out_size: int) -> float:
    """The source-index scale of ``F.interpolate(mode="nearest")`` (ATen ``nearest_idx``):
    ``src = min(floor(dst · scale), in − 1)`` computed in float32 with ``scale = float(in) / out``.
    ATen special-cases ``out == in`` (copy) and ``out == 2·in`` (``dst >> 1``); the scales 1 and
    0.5 give exactly those indices. float32 division equals the double quotient rounded to float32
    (53 ≥ 2·24 + 2 bits, so the double rounding is innocuous)."""
    if out_size == in_size:
        return 1.0
    if out_size == 2 * in_size:
        return 0.5
    return fp32(in_size / out_size)


def blur_weights(kernel_size: int, sigma: float) -> tuple[float, ...]:
    """The float32 1-D Gaussian weights of ``reference.gaussian_kernel_1d`` as Python floats
    (exactly representable in float32: kernel arguments keep them bit for bit)."""
    return tuple(float(w) for w in gaussian_kernel_1d(kernel_size, sigma).tolist())


def map_for_kernel(mask_map: torch.Tensor) -> torch.Tensor:
    """A ``(B|1, h, w)`` map the kernels can load: bool viewed as uint8 (no copy)."""
    return mask_map.view(torch.uint8) if mask_map.dtype == torch.bool else mask_map
