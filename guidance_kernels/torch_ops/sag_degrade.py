"""PyTorch backend of sag_degrade: the SAG degrade step in fp32 (fp64 for fp64 latents).

    m        = (map > threshold) if thresholded else map          (B|1, h, w) → nearest to (H, W)
    blurred  = separable Gaussian blur of x0, reflect padding     (same float32 weights as the anchors)
    degraded = blurred·m + x0·(1 − m)
    out      = sqrt(ᾱ)·degraded + sqrt(1 − ᾱ)·eps   ("ddpm")
             | (degraded + x_t) − x0                ("kdiff", ComfyUI's operation order)
             | degraded                             ("none")

Outputs are laid out like x0 (``_layout.output_like``), in x0's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._layout import output_like
from .gaussian_blur_2d import separable_blur


def sag_degrade(x0, mask_map, thresholded, threshold, kernel_size, sigma, renoise, alpha, alpha_tensor, other,
                return_degraded):
    if x0.numel() == 0:
        return output_like(x0), output_like(x0) if return_degraded else x0.new_empty((0,))
    dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    x = x0.to(dtype)
    batch, _, height, width = x.shape
    # The threshold is compared in the compute dtype (float32 like the kernels), whatever the map's.
    m = mask_map.to(dtype)
    m = (m > threshold).to(dtype) if thresholded else m
    m = F.interpolate(m.unsqueeze(1), (height, width), mode="nearest")
    degraded = separable_blur(x, kernel_size, sigma) * m + x * (1 - m)
    if renoise == "ddpm":
        a = alpha_tensor.to(dtype) if alpha_tensor is not None else torch.tensor([alpha], dtype=torch.float32,
                                                                                device=x.device).to(dtype)
        a = a.reshape(-1, 1, 1, 1)
        result = a.sqrt() * degraded + (1 - a).sqrt() * other.to(dtype)
    elif renoise == "kdiff":
        result = (degraded + other.to(dtype)) - x
    else:
        result = degraded
    out = output_like(x0).copy_(result)
    extra = output_like(x0).copy_(degraded) if return_degraded else x0.new_empty((0,))
    return out, extra
