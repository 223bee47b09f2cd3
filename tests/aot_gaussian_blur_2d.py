"""AOT-compile cases for gaussian_blur_2d's Triton launchers (see tests/triton_aot.py): the blur at
SEG and SAG sizes — fused (small kernels) and in two passes (σ = 10 on a 64×64 grid: rows into a
float32 scratch, then columns) — and the σ = ∞ mean, across layouts and dtypes."""

import torch

from guidance_kernels._library import GaussianBlur2dArgs
from guidance_kernels.triton import gaussian_blur_2d as K

SHAPES = {"nchw": (2, 4, 64, 64), "bnc": (2, 32 * 32, 640), "bhnd": (2, 10, 64 * 64, 64)}
GRIDS = {"nchw": (64, 64), "bnc": (32, 32), "bhnd": (64, 64)}


def _blur(dtype, layout, kernel_size, sigma, head_dim=64, heads=10):
    def case():
        x = torch.zeros(SHAPES[layout], dtype=dtype)
        if layout == "bhnd":  # diffusers' (B, N, heads, d) memory
            x = torch.zeros(2, 64 * 64, heads, head_dim, dtype=dtype).transpose(1, 2)
        h, w = GRIDS[layout]
        K.gaussian_blur_2d(GaussianBlur2dArgs(x, h, w, layout, kernel_size, sigma))
    return case


CASES = []
for _dtype, _name in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
    CASES.append((f"blur-k9-{_name}-nchw", _blur(_dtype, "nchw", 9, 1.0)))
    CASES.append((f"blur-k7-{_name}-bnc", _blur(_dtype, "bnc", 7, 1.0)))
    CASES.append((f"mean-{_name}-{'bnc' if _dtype == torch.float16 else 'nchw'}",
                  _blur(_dtype, "bnc" if _dtype == torch.float16 else "nchw", 0, 0.0)))
CASES.append(("blur-k13-bf16-bhnd", _blur(torch.bfloat16, "bhnd", 13, 2.0)))
CASES.append(("blur-k61-bf16-bhnd", _blur(torch.bfloat16, "bhnd", 61, 10.0)))
CASES.append(("blur-k61-fp32-bhnd", _blur(torch.float32, "bhnd", 61, 10.0)))
CASES.append(("blur-k7-bf16-bhnd-d40", _blur(torch.bfloat16, "bhnd", 7, 1.0, head_dim=40, heads=8)))  # SD1.5
