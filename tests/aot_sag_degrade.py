"""AOT-compile cases for sag_degrade's Triton launcher (see tests/triton_aot.py): the degrade kernel
in every dtype, re-noise mode and map kind. The AOT lane runs without ``TRITON_INTERPRET``, so the
launcher picks the GPU tiles (the interpreter's larger tiles are a test-speed setting)."""

import torch

from guidance_kernels._library import SagDegradeArgs
from guidance_kernels.triton import sag_degrade as D

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _degrade(dtype, renoise, map_kind, kernel_size=9, channels_last=False, channels=4):
    def case():
        x0 = torch.zeros(2, channels, 64, 64, dtype=dtype)
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        if map_kind == "mass":
            mask_map, thresholded = torch.zeros(2, 8, 8), True
        elif map_kind == "bool":
            mask_map, thresholded = torch.zeros(1, 8, 8, dtype=torch.bool), False
        else:
            mask_map, thresholded = torch.zeros(2, 64, 64, dtype=dtype), False
        other = torch.zeros_like(x0) if renoise != "none" else None
        alpha_tensor = torch.ones(2) if renoise == "ddpm" else None
        D.sag_degrade(SagDegradeArgs(x0, mask_map, thresholded, 1.0, kernel_size, 1.0, renoise, 0.5, alpha_tensor,
                                     other, renoise == "kdiff"))
    return case


CASES = []
for _dtype in DTYPES:
    CASES.append((f"degrade-{_dtype}-ddpm", _degrade(_dtype, "ddpm", "mass")))
CASES.append(("degrade-torch.float16-kdiff-bool-mask", _degrade(torch.float16, "kdiff", "bool")))
CASES.append(("degrade-torch.bfloat16-none-float-mask-k15-channels-last",
              _degrade(torch.bfloat16, "none", "float", 15, True)))
CASES.append(("degrade-torch.bfloat16-ddpm-channels-last-c16",  # SD3 / Flux latents
              _degrade(torch.bfloat16, "ddpm", "mass", 9, True, channels=16)))
