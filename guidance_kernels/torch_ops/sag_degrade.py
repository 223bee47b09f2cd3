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
from .._library import SagDegradeArgs
from ._common import compute_dtype, separable_blur


def _alpha(a: SagDegradeArgs, dtype: torch.dtype, device) -> torch.Tensor:
    if a.alpha_tensor is not None:
        return a.alpha_tensor.to(dtype).reshape(-1, 1, 1, 1)
    return torch.tensor([a.alpha], dtype=torch.float32, device=device).to(dtype).reshape(-1, 1, 1, 1)


def sag_degrade(a: SagDegradeArgs):
    x0 = a.x0
    if x0.numel() == 0:
        return output_like(x0), output_like(x0) if a.return_degraded else x0.new_empty((0,))
    dtype = compute_dtype(x0)
    x = x0.to(dtype)
    _, _, height, width = x.shape
    # The threshold is compared in the compute dtype (float32 like the kernels), whatever the map's.
    m = a.mask_map.to(dtype)
    m = (m > a.threshold).to(dtype) if a.thresholded else m
    m = F.interpolate(m.unsqueeze(1), (height, width), mode="nearest")
    degraded = separable_blur(x, a.kernel_size, a.sigma) * m + x * (1 - m)
    if a.renoise == "ddpm":
        alpha = _alpha(a, dtype, x.device)
        result = alpha.sqrt() * degraded + (1 - alpha).sqrt() * a.other.to(dtype)
    elif a.renoise == "kdiff":
        result = (degraded + a.other.to(dtype)) - x
    else:
        result = degraded
    out = output_like(x0).copy_(result)
    extra = output_like(x0).copy_(degraded) if a.return_degraded else x0.new_empty((0,))
    return out, extra
