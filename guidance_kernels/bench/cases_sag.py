"""Benchmark cases of the SAG family: attention_key_mass and sag_degrade.

* attention_key_mass at the self-attention SAG reads (GPU: SDXL's mid block at 1024 px, 1024 tokens ×
  20 heads × d 64, and 4096 tokens × 10 heads × d 64 — SD1.5's first block at 512 px / SDXL's mid
  block at 2048 px; CPU: small shapes), CFG batch of 2 with the mass of the uncond item. Providers:
  the reference (explicit (B·heads, N, N) map, as diffusers' CrossAttnStoreProcessor), plain
  ``F.scaled_dot_product_attention`` on the same q/k/v (output only: the bar), and our backends.
  Goal: ≤ 1.3× the SDPA time on an H100.
* sag_degrade at SD1.5 (4×64×64, 8×8 map) and SDXL (4×128×128, 32×32 map) latents, DDPM re-noise
  with a per-sample ᾱ tensor. Providers: the eager reference (diffusers' sag_masking operations),
  ``torch.compile`` of it, and our backends. Goal: ≥ 5× faster than eager on an H100.

On a GPU the harness records each provider's peak extra memory next to the reference's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends, reference
from .. import attention_key_mass, sag_degrade
from .harness import Case, Provider


def _our_backends(op: str, x: torch.Tensor, facts: tuple = ()) -> list[str]:
    return [b for b in backends.op_backends(op) if not backends.unsupported_reasons(
        op, b, backends.Request(x.device.type, x.device.index, x.dtype, facts))]


def _attention_goal(device: torch.device):
    def check(rows) -> bool | None:
        sdpa = rows.get("sdpa (no mass)")
        ours = [r for r in rows.values() if r.ours and r.ms]
        if device.type != "cuda" or sdpa is None or not sdpa.ms:
            return None
        return bool(ours) and min(r.ms for r in ours) <= 1.3 * sdpa.ms

    return "<= 1.3x the time of plain SDPA on the same q/k/v (H100)", check


def _degrade_goal(device: torch.device):
    def check(rows) -> bool | None:
        if device.type != "cuda":
            return None
        ours = [r for r in rows.values() if r.ours and r.speedup]
        return bool(ours) and max(r.speedup for r in ours) >= 5.0

    return ">= 5x faster than the eager reference (H100 GPU time)", check


def _attention_cases(device: torch.device, dtype: torch.dtype) -> list[Case]:
    gpu = device.type == "cuda"
    shapes = ({"SDXL mid 1024px": (1024, 20, 64), "4096 tokens": (4096, 10, 64)} if gpu
              else {"256 tokens": (256, 8, 40), "1024 tokens": (1024, 4, 64)})
    elem = torch.finfo(dtype).bits // 8
    out = []
    for name, (tokens, heads, head_dim) in shapes.items():
        q, k, v = (torch.randn(2, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
        providers = [Provider("eager reference", lambda q=q, k=k, v=v: reference.attention_key_mass(q, k, v)),
                     Provider("sdpa (no mass)", lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))]
        for backend in _our_backends("attention_key_mass", q, (("head_dim", head_dim),)):
            providers.append(Provider(backend, (lambda b=backend, q=q, k=k, v=v: attention_key_mass(
                q, k, v, items=[0], backend=b)), ours=True))
        text, check = _attention_goal(device)
        # FLOPs: QKᵀ and PV for both items, one more QKᵀ for the mass of item 0.
        flops = 2 * 2 * 2 * heads * tokens * tokens * head_dim + 2 * heads * tokens * tokens * head_dim
        out.append(Case(op="attention_key_mass", name=f"{name} uncond mass", shape=f"2x{heads}x{tokens}x{head_dim}",
                        dtype=str(dtype).replace("torch.", ""), providers=providers, flops=flops,
                        bytes=4 * q.numel() * elem, compare_to="sdpa (no mass)", goal=text, goal_check=check))
    return out


def _degrade_cases(device: torch.device, dtype: torch.dtype) -> list[Case]:
    latents = {"SD1.5 512px": ((1, 4, 64, 64), (8, 8)), "SDXL 1024px": ((1, 4, 128, 128), (32, 32))}
    elem = torch.finfo(dtype).bits // 8
    out = []
    for name, (shape, grid) in latents.items():
        x0 = torch.randn(shape, device=device, dtype=dtype)
        eps = torch.randn(shape, device=device, dtype=dtype)
        mass = torch.rand(shape[0], grid[0] * grid[1], device=device) * 2
        alpha = torch.full((shape[0],), 0.5, device=device)

        def ref(x0=x0, mass=mass, eps=eps, alpha=alpha, grid=grid):
            return reference.sag_degrade(x0, mass, grid=grid, eps=eps, alpha_cumprod=alpha)

        providers = [Provider("eager reference", ref),
                     Provider("torch.compile(reference)", torch.compile(ref, fullgraph=True, dynamic=False))]
        for backend in _our_backends("sag_degrade", x0):
            providers.append(Provider(backend, (lambda b=backend, x0=x0, mass=mass, eps=eps, alpha=alpha, grid=grid:
                                                sag_degrade(x0, mass, grid=grid, eps=eps, alpha_cumprod=alpha,
                                                            backend=b)), ours=True))
        text, check = _degrade_goal(device)
        out.append(Case(op="sag_degrade", name=f"{name} ddpm", shape=str(tuple(shape)),
                        dtype=str(dtype).replace("torch.", ""), providers=providers, bytes=3 * x0.numel() * elem,
                        goal=text, goal_check=check))
    return out


# The op stems these cases time (bench --ops filters on them).
OPS = ['attention_key_mass', 'sag_degrade']

def cases(device: torch.device, quick: bool) -> list[Case]:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return _attention_cases(device, dtype) + _degrade_cases(device, dtype)
