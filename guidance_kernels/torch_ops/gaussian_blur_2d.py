"""PyTorch backend of gaussian_blur_2d: a separable depthwise Gaussian blur with reflect padding.

Inputs are the op arguments (see ``guidance_kernels._library``): ``x`` in layout ``"nchw"``
``(B, C, H, W)``, ``"bnc"`` ``(B, H·W, C)`` or ``"bhnd"`` ``(B, heads, H·W, d)``; ``kernel_size``
odd, or 0 for σ = ∞ (every position := the spatial mean of its channel).

Two 1-D depthwise convolutions (a ``1×k`` then a ``k×1`` kernel, each after its own reflect
padding) replace the reference's ``k×k`` kernel: ``2k`` instead of ``k²`` multiply-adds per
element. With reflect padding the two orders are the same linear map, since reflection acts on
each axis independently. Arithmetic is float32 (float64 for float64 inputs) with the float32
weights of ``reference.gaussian_kernel_1d``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from .._layout import output_like
from ..reference import gaussian_kernel_1d, image_to_tokens, tokens_to_image


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@lru_cache(maxsize=64)
def weights(kernel_size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The float32 1-D weights on ``device`` (cached: no host-to-device copy per call)."""
    return gaussian_kernel_1d(kernel_size, sigma).to(device=device, dtype=dtype)


def _weights_for(img: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    # Real tensors use the cache; fake ones (the autograd formula traced by torch.compile, possibly
    # wrapped by torch.func) build the weights in the tracing mode, which must never be cached.
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(img):
        return gaussian_kernel_1d(kernel_size, sigma).to(device=img.device, dtype=img.dtype)
    return weights(kernel_size, sigma, img.device, img.dtype)


def separable_blur(img: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Blur ``(B, C, H, W)`` (already in the compute dtype). ``kernel_size`` 0: the spatial mean,
    broadcast (a view); 1: ``img`` itself (the single weight is exactly 1)."""
    if kernel_size == 0:
        return img.mean(dim=(-2, -1), keepdim=True).expand(img.shape)
    if kernel_size == 1:
        return img
    c = img.shape[1]
    w = _weights_for(img, kernel_size, sigma)
    pad = kernel_size // 2
    x = F.pad(img, (pad, pad, 0, 0), mode="reflect")
    x = F.conv2d(x, w.view(1, 1, 1, kernel_size).expand(c, 1, 1, kernel_size), groups=c)
    x = F.pad(x, (0, 0, pad, pad), mode="reflect")
    return F.conv2d(x, w.view(1, 1, kernel_size, 1).expand(c, 1, kernel_size, 1), groups=c)


def gaussian_blur_2d(x, grid_h, grid_w, layout, kernel_size, sigma):
    out = output_like(x)
    if out.numel() == 0 or kernel_size == 1:
        return out.copy_(x)
    img = tokens_to_image(x.to(compute_dtype(x)), (grid_h, grid_w), layout)
    blurred = image_to_tokens(separable_blur(img, kernel_size, sigma), x, layout)
    if kernel_size > 1 and blurred.dtype == out.dtype and blurred.stride() == out.stride():
        return blurred  # the convolution's fresh output already has the output layout: no extra pass
    return out.copy_(blurred)


def differentiable(x, grid_h, grid_w, layout, kernel_size, sigma):
    """The same function in functional torch ops, for the op's autograd formula (the blur and the
    mean are linear maps; their vector-Jacobian product is taken through this)."""
    img = tokens_to_image(x.to(compute_dtype(x)), (grid_h, grid_w), layout)
    return image_to_tokens(separable_blur(img, kernel_size, sigma), x, layout).to(x.dtype)
