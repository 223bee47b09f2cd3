"""CUDA backend of sag_degrade: allocates the outputs (laid out like x0, ``_layout.output_like``) and
calls ``guidance_kernels._C.sag_degrade`` (csrc/sag_degrade.cu → csrc/include/guidance_kernels/
sag_degrade.cuh): one launch on the current stream, no host synchronisation.

The launcher takes the float32 blur weights of ``_spec.gaussian_kernel_1d`` and indexes the map
with ATen's nearest rule itself; see the header for the formula and the work split.
"""

from __future__ import annotations

from .. import _layout
from .._library import SagDegradeArgs
from .._spec import RENOISE, blur_taps
from ._common import ext


def sag_degrade(a: SagDegradeArgs):
    module = ext()
    x0 = a.x0
    out = _layout.output_like(x0)
    degraded = _layout.output_like(x0) if a.return_degraded else None
    module.sag_degrade(out, degraded, x0, _layout.map_for_kernel(a.mask_map), bool(a.thresholded), float(a.threshold),
                       list(blur_taps(a.kernel_size, a.sigma)), RENOISE[a.renoise], a.other, a.alpha_tensor,
                       float(a.alpha))
    return out, degraded if degraded is not None else x0.new_empty((0,))
