"""PyTorch backend of gaussian_blur_2d: a separable depthwise Gaussian blur with reflect padding.

``x`` in layout ``"nchw"`` ``(B, C, H, W)``, ``"bnc"`` ``(B, H·W, C)`` or ``"bhnd"``
``(B, heads, H·W, d)``; ``kernel_size`` odd, or 0 for σ = ∞ (every position := the spatial mean of
its channel). Two 1-D depthwise convolutions (``_common.separable_blur``) replace the reference's
``k×k`` kernel: ``2k`` instead of ``k²`` multiply-adds per element. Arithmetic is float32 (float64
for float64 inputs) with the float32 weights of ``_spec.gaussian_kernel_1d``.
"""

from __future__ import annotations

from .._layout import output_like
from .._library import GaussianBlur2dArgs
from .._spec import image_to_tokens, tokens_to_image
from ._common import compute_dtype, separable_blur


def _blurred(a: GaussianBlur2dArgs):
    img = tokens_to_image(a.x.to(compute_dtype(a.x)), (a.grid_h, a.grid_w), a.layout)
    return image_to_tokens(separable_blur(img, a.kernel_size, a.sigma), a.x, a.layout)


def gaussian_blur_2d(a: GaussianBlur2dArgs):
    out = output_like(a.x)
    if out.numel() == 0 or a.kernel_size == 1:
        return out.copy_(a.x)
    blurred = _blurred(a)
    if a.kernel_size > 1 and blurred.dtype == out.dtype and blurred.stride() == out.stride():
        return blurred  # the convolution's fresh output already has the output layout: no extra pass
    return out.copy_(blurred)


def differentiable(a: GaussianBlur2dArgs):
    """The same function in functional torch ops, for the op's autograd formula (the blur and the
    mean are linear maps; their vector-Jacobian product is taken through this)."""
    return _blurred(a).to(a.x.dtype)
