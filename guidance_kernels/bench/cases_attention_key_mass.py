"""Benchmark cases of attention_key_mass at the self-attention reads SAG makes.

GPU (fp16): SDXL's mid block at 1024 px (1024 tokens × 20 heads × d 64) and 4096 tokens × 10 heads
× d 64 (SD1.5's first block at 512 px / SDXL's mid block at 2048 px); CPU: small shapes; tiny: odd
token counts. A CFG batch of 2 with the mass of the uncond item. Providers: the reference (the
explicit (B·heads, N, N) map, as diffusers' CrossAttnStoreProcessor), plain
``F.scaled_dot_product_attention`` on the same q/k/v (output only: the bar), and our backends.
Goal: ≤ 1.3× the SDPA time. On a GPU each provider's peak extra memory is recorded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import guidance_kernels as gk
from guidance_kernels import reference

from .harness import EAGER, Case, Goal, Provider, Setup, dtype_name, our_providers, within

OPS = ["attention_key_mass"]
SDPA = "sdpa (no mass)"

# name -> (tokens, heads, head dim)
SHAPES = {
    "real": {"SDXL mid 1024px": (1024, 20, 64), "4096 tokens": (4096, 10, 64)},
    "small": {"256 tokens": (256, 8, 40), "1024 tokens": (1024, 4, 64)},
    "tiny": {"37 tokens": (37, 2, 40)},
}


def _case(setup: Setup, name: str, tokens: int, heads: int, head_dim: int) -> Case:
    dtype = torch.float16 if setup.gpu else torch.float32
    q, k, v = (torch.randn(2, heads, tokens, head_dim, device=setup.device, dtype=dtype) for _ in range(3))
    providers = [Provider(EAGER, lambda: reference.attention_key_mass(q, k, v)),
                 Provider(SDPA, lambda: F.scaled_dot_product_attention(q, k, v))]
    providers += our_providers("attention_key_mass", q, lambda backend: gk.attention_key_mass(
        q, k, v, items=[0], backend=backend), (("head_dim", head_dim),))
    # FLOPs: QKᵀ and PV for both items, one more QKᵀ for the mass of item 0
    flops = 2 * 2 * 2 * heads * tokens * tokens * head_dim + 2 * heads * tokens * tokens * head_dim
    return Case(op="attention_key_mass", name=f"{name} uncond mass", shape=f"2x{heads}x{tokens}x{head_dim}",
                dtype=dtype_name(dtype), providers=providers, flops=flops, bytes=4 * q.numel() * q.element_size(),
                compare_to=SDPA, goals=[Goal("<= 1.3x the time of plain SDPA on the same q/k/v (GPU)",
                                             within((SDPA,), 1.3))])


def cases(setup: Setup) -> list[Case]:
    return [_case(setup, name, *shape) for name, shape in SHAPES[setup.shapes].items()]
