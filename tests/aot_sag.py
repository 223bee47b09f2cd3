"""AOT-compile cases for the SAG launchers (attention_key_mass, sag_degrade); see tests/triton_aot.py.

The key-mass kernels for every tile config (padded head dim 64/128/256 × 16-bit/fp32), both
layouts, progression and indexed items; the degrade kernel in every dtype, re-noise mode and map
kind. The launchers see CPU tensors here, so the degrade launch uses the GPU tiles only when told:
``aot_gpu_tiles`` patches the launcher's device test."""

import torch

from guidance_kernels.triton import attention_key_mass as A
from guidance_kernels.triton import sag_degrade as D

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _attention(dtype, head_dim, layout, items, heads=8, n=1024):
    def case():
        if layout == "bhnd":
            q = torch.zeros(2, heads, n, head_dim, dtype=dtype)
        else:
            q = torch.zeros(2, n, heads * head_dim, dtype=dtype)
        A.attention_key_mass(q, q.clone(), q.clone(), heads, layout, head_dim**-0.5, items)
    return case


def _degrade(dtype, renoise, map_kind, kernel_size=9, channels_last=False):
    def case():
        x0 = torch.zeros(2, 4, 64, 64, dtype=dtype)
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
        D.sag_degrade(x0, mask_map, thresholded, 1.0, kernel_size, 1.0, renoise, 0.5, alpha_tensor, other,
                      renoise == "kdiff")
    return case


CASES = []
# Tile configs differ by padded head dim (64, 128, 256) and by fp32 vs 16-bit; d = 40 and 80 are
# the padded-and-masked head dims, 128 the unmasked one.
for _dtype, _dims in ((torch.float16, (40, 80, 128, 160)), (torch.float32, (40, 80, 160))):
    for _d in _dims:
        CASES.append((f"key-mass-{_dtype}-d{_d}", _attention(_dtype, _d, "bhnd", [0])))
CASES.append(("key-mass-bnd-torch.bfloat16-d64", _attention(torch.bfloat16, 64, "bnd", None)))
CASES.append(("key-mass-indexed-torch.bfloat16-d160", _attention(torch.bfloat16, 160, "bhnd", [1, 0, 1])))
for _dtype in DTYPES:
    CASES.append((f"degrade-{_dtype}-ddpm", _degrade(_dtype, "ddpm", "mass")))
CASES.append(("degrade-torch.float16-kdiff-bool-mask", _degrade(torch.float16, "kdiff", "bool")))
CASES.append(("degrade-torch.bfloat16-none-float-mask-k15-channels-last",
              _degrade(torch.bfloat16, "none", "float", 15, True)))
