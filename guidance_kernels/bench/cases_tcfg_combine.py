"""Benchmark cases of tcfg_combine at SDXL, Flux and video latent sizes (GPU, bf16) or small latents
(CPU, fp32): the eager anchor (diffusers' normalized_guidance: an SVD per sample), torch.compile of
it, and each of our backends usable here (the torch backend is the closed form of the 2×2 Gram
matrix, so the CPU table shows the algorithmic win too). Also :func:`providers` and
:func:`latents`, which the other cases of the methods added with it share."""

from __future__ import annotations

import torch

from .. import backends, reference
from .. import tcfg_combine
from .harness import Case, Provider

OPS = ["tcfg_combine"]


def latents(device: torch.device) -> tuple[torch.dtype, dict[str, tuple[int, ...]]]:
    """(dtype, {name: one branch's shape}) for this device's cases."""
    if device.type == "cuda":
        return torch.bfloat16, {"SDXL 1024px": (1, 4, 128, 128), "Flux 1024px": (1, 16, 128, 128),
                                "video 16x21x90x160": (1, 16, 21, 90, 160)}
    return torch.float32, {"SD1.5 512px": (1, 4, 64, 64), "SDXL 1024px": (1, 4, 128, 128),
                           "video (small) 16x5x30x40": (1, 16, 5, 30, 40)}


def providers(op: str, sample: torch.Tensor, ours, eager) -> list[Provider]:
    """The eager anchor, torch.compile of it, and every backend of ``op`` that serves ``sample``."""
    out = [Provider("eager reference", eager), Provider("torch.compile(reference)",
                                                        torch.compile(eager, fullgraph=True, dynamic=False))]
    request = backends.Request(sample.device.type, sample.device.index, sample.dtype)
    for backend in backends.op_backends(op):
        if not backends.unsupported_reasons(op, backend, request):
            out.append(Provider(backend, (lambda b=backend: ours(b)), ours=True))
    return out


def speedup_goal(target: float, device: torch.device, against: str = "eager reference"):
    """(text, check): the best of our backends at least ``target`` times faster than ``against`` on a GPU."""
    def check(rows) -> bool | None:
        if device.type != "cuda":
            return None
        ours = [r for r in rows.values() if r.ours and r.ms]
        base = rows.get(against)
        if not ours or base is None or not base.ms:
            return False
        return base.ms / min(r.ms for r in ours) >= target

    return f">= {target:g}x {against} (GPU, bf16)", check


def cases(device: torch.device, quick: bool) -> list[Case]:
    dtype, shapes = latents(device)
    elem = torch.finfo(dtype).bits // 8
    out = []
    for name, shape in shapes.items():
        pred = torch.randn(2 * shape[0], *shape[1:], device=device, dtype=dtype)
        u, c = pred[: shape[0]], pred[shape[0]:]
        text, check = speedup_goal(20.0, device)
        out.append(Case(op="tcfg_combine", name=f"{name} tcfg", shape=f"2x{tuple(shape)}",
                        dtype=str(dtype).replace("torch.", ""),
                        providers=providers("tcfg_combine", pred, lambda b, p=pred: tcfg_combine(p, 7.5, backend=b),
                                            lambda c=c, u=u: reference.tcfg_combine(c, u, 7.5)),
                        bytes=3 * u.numel() * elem, goal=text, goal_check=check))
    return out
