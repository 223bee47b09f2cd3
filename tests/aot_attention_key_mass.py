"""AOT-compile cases for attention_key_mass's Triton launchers (see tests/triton_aot.py): the kernels
for every tile config (padded head dim 64/128/256 × 16-bit/fp32), both layouts, progression and
indexed items."""

import torch

from guidance_kernels._library import AttentionKeyMassArgs
from guidance_kernels.triton import attention_key_mass as A


def _attention(dtype, head_dim, layout, items, heads=8, n=1024):
    def case():
        if layout == "bhnd":
            q = torch.zeros(2, heads, n, head_dim, dtype=dtype)
        else:
            q = torch.zeros(2, n, heads * head_dim, dtype=dtype)
        A.attention_key_mass(AttentionKeyMassArgs(q, q.clone(), q.clone(), heads, layout, head_dim**-0.5, items))
    return case


CASES = []
# Tile configs differ by padded head dim (64, 128, 256) and by fp32 vs 16-bit; d = 40 and 80 are
# the padded-and-masked head dims, 128 the unmasked one.
for _dtype, _dims in ((torch.float16, (40, 80, 128, 160)), (torch.float32, (40, 80, 160))):
    for _d in _dims:
        CASES.append((f"key-mass-{_dtype}-d{_d}", _attention(_dtype, _d, "bhnd", [0])))
CASES.append(("key-mass-bnd-torch.bfloat16-d64", _attention(torch.bfloat16, 64, "bnd", None)))
CASES.append(("key-mass-indexed-torch.bfloat16-d160", _attention(torch.bfloat16, 160, "bhnd", [1, 0, 1])))
