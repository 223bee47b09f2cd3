"""AOT-compile cases for gaussian_blur_2d's Triton launchers (see tests/triton_aot.py): the fused
separable blur (a SAG-size and a large kernel) and the σ = ∞ mean, across layouts and dtypes."""

import torch

from guidance_kernels._library import GaussianBlur2dArgs
from guidance_kernels.triton import gaussian_blur_2d as K

SHAPES = {"nchw": (2, 4, 64, 64), "bnc": (2, 32 * 32, 640), "bhnd": (2, 10, 32 * 32, 64)}


def _blur(dtype, layout, kernel_size, sigma):
    grid = (64, 64) if layout == "nchw" else (32, 32)

    def case():
        x = torch.zeros(SHAPES[layout], dtype=dtype)
        K.gaussian_blur_2d(GaussianBlur2dArgs(x, grid[0], grid[1], layout, kernel_size, sigma))
    return case


CASES = []
for _dtype, _name in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
    CASES.append((f"blur-k9-{_name}-nchw", _blur(_dtype, "nchw", 9, 1.0)))
    CASES.append((f"blur-k31-{_name}-bhnd", _blur(_dtype, "bhnd", 31, 5.0)))
    CASES.append((f"blur-k7-{_name}-bnc", _blur(_dtype, "bnc", 7, 1.0)))
    CASES.append((f"mean-{_name}-{'bnc' if _dtype == torch.float16 else 'nchw'}",
                  _blur(_dtype, "bnc" if _dtype == torch.float16 else "nchw", 0, 0.0)))
