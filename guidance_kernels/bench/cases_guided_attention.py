"""Benchmark cases of guided_attention and gaussian_blur_2d.

GPU (bf16): the issue's shapes — SDXL (10 heads at N = 4096, 20 heads at N = 1024, d = 64) and
Flux-like (24 heads, 4096 image + 512 text tokens, d = 128) — each case side by side with:

* every torch SDPA backend (``sdpa[flash|efficient|cudnn|math]`` through
  ``torch.nn.attention.sdpa_kernel``; a backend that cannot run the shape shows its error) — the
  goals compare against the fastest of them;
* the eager reference (SEG-SDXL's blur + SDPA, diffusers' PAG processors: dense S×S mask for joint
  attention) and ``torch.compile`` of it;
* our backends: ``triton`` — blur / mean pre-passes and ONE flash-attention launch for the
  whole mixed batch —, ``triton_sdpa`` — the same pre-passes feeding torch's SDPA, the
  kernel only for identity / σ = ∞ items — and ``torch``. The faster triton backend should come
  first in guided_attention's backend priority.

CPU (fp32, small shapes): the algorithmic wins of the torch backend — separable blur against the
reference's k×k convolution, σ = ∞ as one attention row per (item, head), identity and joint PAG
without the quadratic work. ``torch.compile(reference)`` is left out there (it would spend the
run compiling).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import backends, reference
from .. import gaussian_blur_2d, guided_attention
from .._spec import blur_kernel_size
from .harness import Case, Provider

OPS = ["guided_attention", "gaussian_blur_2d"]
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
CPU_SDPA_BACKENDS = ("flash", "math")  # the others are CUDA-only


def _sdpa_providers(q, k, v) -> list[Provider]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}

    def run(kind):
        with sdpa_kernel([kinds[kind]]):
            return F.scaled_dot_product_attention(q, k, v)

    available = SDPA_BACKENDS if q.is_cuda else CPU_SDPA_BACKENDS
    return [Provider(f"sdpa[{kind}]", (lambda kind=kind: run(kind))) for kind in available]


def _usable(op: str, x: torch.Tensor, facts: tuple = ()) -> list[str]:
    return [b for b in backends.op_backends(op) if not backends.unsupported_reasons(
        op, b, backends.Request(x.device.type, x.device.index, x.dtype, facts))]


def _ours_attention(q, k, v, kw) -> list[Provider]:
    facts = (("head_dim", q.shape[-1]), ("kernel_items", True))
    return [Provider(backend, (lambda b=backend: guided_attention(q, k, v, backend=b, **kw)), ours=True)
            for backend in _usable("guided_attention", q, facts)]


def _reference(ref, gpu: bool) -> list[Provider]:
    providers = [Provider("eager reference", ref)]
    if gpu:
        providers.append(Provider("torch.compile(reference)", torch.compile(ref, fullgraph=True, dynamic=False)))
    return providers


def _best(rows: dict, names) -> float | None:
    times = [rows[n].ms for n in names if n in rows and rows[n].ms]
    return min(times) if times else None


def _ours_best(rows: dict) -> float | None:
    """The faster triton backend: what automatic selection runs on a GPU once the priority puts
    it first (the torch backend, itself SDPA for plain items, does not count)."""
    times = [r.ms for r in rows.values() if r.ours and r.ms and r.provider.startswith("triton")]
    return min(times) if times else None


def _goal(text: str, gpu: bool, test):
    """(goal text, check): ``test(best triton ms, rows)`` on a GPU run, None elsewhere."""
    def check(rows) -> bool | None:
        ours = _ours_best(rows)
        if not gpu:
            return None
        return bool(ours and test(ours, rows))
    return text + " (H100, bf16)", check


def _vs_sdpa(factor: float):
    def test(ours, rows):
        best = _best(rows, [f"sdpa[{k}]" for k in SDPA_BACKENDS])
        return best is not None and ours <= factor * best
    return test


def _vs_eager(speedup: float):
    def test(ours, rows):
        eager = rows.get("eager reference")
        return eager is not None and bool(eager.ms) and eager.ms / ours >= speedup
    return test


def _vs(provider: str, factor: float):
    def test(ours, rows):
        base = rows.get(provider)
        return base is not None and bool(base.ms) and ours <= factor * base.ms
    return test


def _qkv(batch, heads, n, d, dtype, device):
    # (B, N, heads·d) projections viewed as (B, heads, N, d), as diffusers' processors hold them
    return [torch.randn(batch, n, heads * d, device=device, dtype=dtype).view(batch, n, heads, d).transpose(1, 2)
            for _ in range(3)]


def _attention_flops(items: int, heads: int, nq: int, nk: int, d: int) -> int:
    return 4 * items * heads * nq * nk * d


def cases(device: torch.device, quick: bool) -> list[Case]:
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    dname = str(dtype).replace("torch.", "")
    elem = torch.finfo(dtype).bits // 8
    out: list[Case] = []

    def add(op, name, shape, providers, *, goal=None, flops=None, nbytes=None):
        text, check = goal if goal is not None else ("", None)
        out.append(Case(op=op, name=name, shape=shape, dtype=dname, providers=providers, flops=flops, bytes=nbytes,
                        goal=text, goal_check=check))

    # ----------------------------------------------------------------- gaussian_blur_2d
    if gpu:
        blurs = [("SAG latent k=9", (1, 4, 128, 128), "nchw", (128, 128), 1.0),
                 ("SEG queries σ=2", (1, 10, 4096, 64), "bhnd", (64, 64), 2.0),
                 ("SEG queries σ=10", (1, 10, 4096, 64), "bhnd", (64, 64), 10.0),
                 ("SEG queries σ=∞", (1, 10, 4096, 64), "bhnd", (64, 64), math.inf)]
    else:
        blurs = [("SAG latent k=9", (1, 4, 64, 64), "nchw", (64, 64), 1.0),
                 ("SEG tokens σ=2", (1, 1024, 640), "bnc", (32, 32), 2.0),
                 ("SEG tokens σ=10", (1, 1024, 640), "bnc", (32, 32), 10.0),
                 ("SEG queries σ=10", (1, 10, 1024, 64), "bhnd", (32, 32), 10.0),
                 ("SEG tokens σ=∞", (1, 1024, 640), "bnc", (32, 32), math.inf)]
    for name, shape, layout, grid, sigma in blurs:
        x = torch.randn(shape, device=device, dtype=dtype)
        size = 9 if name.startswith("SAG") else (None if sigma > reference.SEG_INF_SIGMA
                                                 else blur_kernel_size(sigma, grid))

        def ref(x=x, sigma=sigma, grid=grid, layout=layout, size=size):
            return reference.blur_tokens(x, sigma, grid, layout, size, cap_to_grid=size is None)

        providers = _reference(ref, gpu)
        for backend in _usable("gaussian_blur_2d", x):
            providers.append(Provider(backend, (lambda b=backend, x=x, sigma=sigma, grid=grid, layout=layout, size=size:
                                                gaussian_blur_2d(x, sigma, kernel_size=size, grid=grid, layout=layout,
                                                                 backend=b)), ours=True))
        k = "∞" if size is None else size
        add("gaussian_blur_2d", name, f"{tuple(shape)} {layout} k={k}", providers, nbytes=2 * x.numel() * elem)

    # ----------------------------------------------------------------- guided_attention
    if gpu:
        sdxl = [(2, 10, (64, 64), 64), (4, 20, (32, 32), 64)]
        flux = (24, (64, 64), 512, 128)
    else:
        sdxl = [(2, 10, (32, 32), 64)]
        flux = (4, (32, 32), 77, 64)

    for batch, heads, grid, d in sdxl:
        n = grid[0] * grid[1]
        shape = f"B={batch}+1 h={heads} N={n} d={d}"
        # normal items only ([uncond, cond] of CFG): against every SDPA backend
        q, k, v = _qkv(batch, heads, n, d, dtype, device)
        providers = _reference(lambda q=q, k=k, v=v, b=batch: reference.guided_attention(q, k, v, ["none"] * b), gpu)
        providers += _sdpa_providers(q, k, v) + _ours_attention(q, k, v, {})
        add("guided_attention", "normal items", f"B={batch} h={heads} N={n} d={d}", providers,
            flops=_attention_flops(batch, heads, n, n, d),
            goal=_goal(">= 0.9x the fastest SDPA backend's throughput", gpu, _vs_sdpa(1 / 0.9)))

        # SEG with finite σ: [uncond, cond, perturbed] vs SDPA on the same shape without blur
        q, k, v = _qkv(batch + 1, heads, n, d, dtype, device)
        modes = ["none"] * batch + ["blur"]
        for sigma in (2.0, 10.0):
            kw = dict(modes=modes, sigma=sigma, grid=grid)
            size = blur_kernel_size(sigma, grid)
            providers = _reference(lambda q=q, k=k, v=v, m=modes, s=sigma, g=grid, z=size: reference.guided_attention(
                q, k, v, m, s, g, kernel_size=z), gpu)
            providers += _sdpa_providers(q, k, v) + _ours_attention(q, k, v, kw)
            add("guided_attention", f"SEG σ={sigma:g} (k={size})", shape, providers,
                flops=_attention_flops(batch + 1, heads, n, n, d),
                goal=_goal("<= 1.15x the fastest SDPA backend without blur (N = 4096)", gpu and n == 4096,
                           _vs_sdpa(1.15)))

        # CFG + PAG in one call: [uncond, cond, identity]
        pag_modes = ["none"] * batch + ["identity"]
        providers = _reference(lambda q=q, k=k, v=v, m=pag_modes: reference.guided_attention(q, k, v, m), gpu)
        providers += _ours_attention(q, k, v, dict(modes=pag_modes))
        add("guided_attention", "CFG+PAG batch", shape, providers, flops=_attention_flops(batch, heads, n, n, d))

        # the perturbed branch alone: σ = ∞ rows, identity copies
        q, k, v = _qkv(batch, heads, n, d, dtype, device)
        inf_modes = ["blur"] * batch
        providers = _reference(lambda q=q, k=k, v=v, m=inf_modes, g=grid: reference.guided_attention(
            q, k, v, m, math.inf, g), gpu)
        providers += _ours_attention(q, k, v, dict(modes=inf_modes, sigma=math.inf, grid=grid))
        add("guided_attention", "SEG σ=∞ items", f"B={batch} h={heads} N={n} d={d}", providers,
            nbytes=4 * q.numel() * elem,
            goal=_goal(">= 5x faster than the reference (N = 4096)", gpu and n == 4096, _vs_eager(5.0)))

        id_modes = ["identity"] * batch
        providers = _reference(lambda q=q, k=k, v=v, m=id_modes: reference.guided_attention(q, k, v, m), gpu)
        providers.append(Provider("copy of V (v.clone())", lambda v=v: v.clone()))
        providers += _ours_attention(q, k, v, dict(modes=id_modes))
        add("guided_attention", "PAG identity items", f"B={batch} h={heads} N={n} d={d}", providers,
            nbytes=2 * v.numel() * elem, goal=_goal("<= 1.1x a copy of V", gpu, _vs("copy of V (v.clone())", 1.1)))

    # joint attention (Flux-like: text before the image tokens): PAG against diffusers' dense mask
    heads, grid, text, d = flux
    n = grid[0] * grid[1] + text
    q, k, v = _qkv(1, heads, n, d, dtype, device)
    kw = dict(modes=["identity"], grid=grid, text_tokens=text, text_position="before")
    providers = _reference(lambda q=q, k=k, v=v: reference.guided_attention(
        q, k, v, ["identity"], text_tokens=text, text_position="before"), gpu)
    providers += _ours_attention(q, k, v, kw)
    add("guided_attention", "joint PAG item", f"B=1 h={heads} N={grid[0] * grid[1]}+{text} text d={d}", providers,
        goal=_goal(">= 5x faster than diffusers' dense-mask SDPA path", gpu, _vs_eager(5.0)))
    # joint SEG σ=2, batch [uncond, cond, perturbed], and the plain attention of that shape
    q, k, v = _qkv(3, heads, n, d, dtype, device)
    kw = dict(modes=["none", "none", "blur"], sigma=2.0, grid=grid, text_tokens=text, text_position="before")
    size = blur_kernel_size(2.0, grid)
    providers = _reference(lambda q=q, k=k, v=v, m=kw["modes"], z=size: reference.guided_attention(
        q, k, v, m, 2.0, grid, text_tokens=text, text_position="before", kernel_size=z), gpu)
    providers += _sdpa_providers(q, k, v) + _ours_attention(q, k, v, kw)
    add("guided_attention", "joint SEG σ=2 batch", f"B=3 h={heads} N={grid[0] * grid[1]}+{text} text d={d}",
        providers, flops=_attention_flops(3, heads, n, n, d),
        goal=_goal("<= 1.15x the fastest SDPA backend without blur", gpu, _vs_sdpa(1.15)))
    return out
