"""Benchmark cases of the combine family: plain / +rescale / +APG / CFG-Zero* at SDXL, Flux and
video latent sizes (GPU, bf16) or small latents (CPU, fp32).

Providers: the eager reference (diffusers' formulas on ``pred.chunk(K)``), ``torch.compile`` of the
same reference, and each of our backends usable here. Bytes are those of an ideal single pass:
every referenced branch read once and the output written once.
"""

from __future__ import annotations

import torch

from .. import backends, reference
from .. import apg_combine, cfg_zero_star_combine, guidance_combine
from ..terms import cfg, pag
from .harness import Case, Provider

# The op stems these cases time (bench --ops filters on them).
OPS = ['guidance_combine', 'apg_combine', 'cfg_zero_star_combine']

GOALS = {"plain": 2.5, "rescale": 4.0, "apg": 6.0}


def _our_backends(op: str, x: torch.Tensor) -> list[str]:
    return [b for b in backends.op_backends(op) if not backends.unsupported_reasons(
        op, b, backends.Request(x.device.type, x.device.index, x.dtype))]


def _goal(kind: str, device: torch.device):
    target = GOALS.get(kind)

    def check(rows) -> bool | None:
        if device.type != "cuda" or target is None:
            return None
        ours = [r for r in rows.values() if r.ours and r.ms]
        compiled = rows.get("torch.compile(reference)")
        if not ours:
            return False
        best = min(ours, key=lambda r: r.ms)
        return bool(best.speedup and best.speedup >= target and (compiled is None or not compiled.ms
                                                                   or best.ms <= compiled.ms))

    text = f">= {target}x eager and <= torch.compile(reference) time (H100, bf16)" if target else ""
    return text, check


def _copy_goal(device: torch.device):
    def check(rows) -> bool | None:
        if device.type != "cuda":
            return None
        ours = [r for r in rows.values() if r.ours and r.pct_of_ceiling]
        return bool(ours) and max(r.pct_of_ceiling for r in ours) >= 85.0

    return ">= 85% of the copy_ bandwidth measured in this run (H100, bf16)", check


def _providers(op: str, pred: torch.Tensor, ours, ref):
    providers = [Provider("eager reference", ref)]
    compiled = torch.compile(ref, fullgraph=True, dynamic=False)
    providers.append(Provider("torch.compile(reference)", compiled))
    for backend in _our_backends(op, pred):
        providers.append(Provider(backend, (lambda b=backend: ours(b)), ours=True))
    return providers


def cases(device: torch.device, quick: bool) -> list[Case]:
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    elem = torch.finfo(dtype).bits // 8
    if gpu:
        latents = {"SDXL 1024px": (1, 4, 128, 128), "Flux 1024px": (1, 16, 128, 128)}
        video = ("video 16x21x90x160", (1, 16, 21, 90, 160))
    else:
        latents = {"SD1.5 512px": (1, 4, 64, 64), "SDXL 1024px": (1, 4, 128, 128)}
        video = ("video (small) 16x5x30x40", (1, 16, 5, 30, 40))
    out = []
    g3 = cfg(7.5) + pag(3.0)

    def add(kind, name, shape, pred, k, ours, ref, op="guidance_combine", goal=None):
        numel = pred.numel() // k
        text, check = goal if goal is not None else _goal(kind, device)
        out.append(Case(op=op, name=f"{name} {kind}", shape=f"{k}x{tuple(shape)}", dtype=str(dtype).replace(
            "torch.", ""), providers=_providers(op, pred, ours, ref), bytes=(k + 1) * numel * elem, goal=text,
            goal_check=check))

    vname, vshape = video
    pred = torch.randn(3 * vshape[0], *vshape[1:], device=device, dtype=dtype)
    add("plain", vname, vshape, pred, 3, lambda b, p=pred: guidance_combine(p, g3, backend=b),
        lambda p=pred: reference.guidance_combine(p.chunk(3), g3), goal=_copy_goal(device))

    for name, shape in latents.items():
        pred = torch.randn(3 * shape[0], *shape[1:], device=device, dtype=dtype)
        add("plain", name, shape, pred, 3, lambda b, p=pred: guidance_combine(p, g3, backend=b),
            lambda p=pred: reference.guidance_combine(p.chunk(3), g3))
        add("rescale", name, shape, pred, 3, lambda b, p=pred: guidance_combine(p, g3, rescale=0.7, backend=b),
            lambda p=pred: reference.guidance_combine(p.chunk(3), g3, rescale=0.7))
        pred2 = pred[: 2 * shape[0]]
        add("apg", name, shape, pred2, 2, lambda b, p=pred2: apg_combine(p, 7.5, norm_threshold=15.0, eta=0.5,
                                                                          backend=b),
            lambda p=pred2: reference.apg_combine(p[shape[0]:], p[: shape[0]], 7.5, norm_threshold=15.0, eta=0.5),
            op="apg_combine")
        add("cfg-zero*", name, shape, pred2, 2, lambda b, p=pred2: cfg_zero_star_combine(p, 5.0, backend=b),
            lambda p=pred2: reference.cfg_zero_star_combine(p[shape[0]:], p[: shape[0]], 5.0),
            op="cfg_zero_star_combine")
    return out
