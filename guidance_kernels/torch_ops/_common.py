"""Helpers every torch-backend module uses: the compute dtype and the separable blur."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._layout import blur_weights_like


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (fp16/bf16 compute in fp32)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def per_sample(number: float, tensor: torch.Tensor | None, ndim: int, dtype: torch.dtype):
    """A scale as the Python ``number`` or the (1,) / (B,) ``tensor`` shaped (B|1, 1, …, 1)."""
    if tensor is None:
        return number
    return tensor.to(dtype).reshape(-1, *([1] * (ndim - 1)))


def separable_blur(img: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Blur ``(B, C, H, W)`` (already in the compute dtype) with reflect padding: a ``1×k`` then a
    ``k×1`` depthwise convolution, each after its own padding — with reflect padding the two orders
    are the same linear map as the anchors' ``k×k`` kernel, since reflection acts on each axis
    independently. ``kernel_size`` 0: the spatial mean, broadcast (a view); 1: ``img`` itself (the
    single weight is exactly 1)."""
    if kernel_size == 0:
        return img.mean(dim=(-2, -1), keepdim=True).expand(img.shape)
    if kernel_size == 1:
        return img
    c = img.shape[1]
    w = blur_weights_like(img, kernel_size, sigma, img.dtype)
    pad = kernel_size // 2
    x = F.pad(img, (pad, pad, 0, 0), mode="reflect")
    x = F.conv2d(x, w.view(1, 1, 1, kernel_size).expand(c, 1, 1, kernel_size), groups=c)
    x = F.pad(x, (0, 0, pad, pad), mode="reflect")
    return F.conv2d(x, w.view(1, 1, kernel_size, 1).expand(c, 1, kernel_size, 1), groups=c)
