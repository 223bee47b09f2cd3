"""CUDA backend of sag_degrade: allocates the outputs (laid out like x0, ``_layout.output_like``) and
calls ``guidance_kernels._C.sag_degrade`` (csrc/sag_degrade.cu → csrc/include/guidance_kernels/
sag_degrade.cuh): one launch on the current stream, no host synchronisation.

The launcher takes the float32 blur weights of ``reference.gaussian_kernel_1d`` and indexes the map
with ATen's nearest rule itself; see the header for the formula and the work split.
"""

from __future__ import annotations

from .. import _extension, _layout
from .._sag_plan import RENOISE, blur_weights, map_for_kernel


def _ext():
    module = _extension.load()
    if module is None:  # backends.select never picks "cuda" then; a direct call says why
        raise RuntimeError(f"guidance_kernels cuda backend: {_extension.unavailable_reason()}")
    return module


def sag_degrade(x0, mask_map, thresholded, threshold, kernel_size, sigma, renoise, alpha, alpha_tensor, other,
                return_degraded):
    ext = _ext()
    out = _layout.output_like(x0)
    degraded = _layout.output_like(x0) if return_degraded else None
    ext.sag_degrade(out, degraded, x0, map_for_kernel(mask_map), bool(thresholded), float(threshold),
                    list(blur_weights(kernel_size, sigma)), RENOISE[renoise], other, alpha_tensor, float(alpha))
    return out, degraded if degraded is not None else x0.new_empty((0,))
