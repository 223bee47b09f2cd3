"""Benchmark cases of guided_attention.

GPU (bf16): the issue's shapes — SDXL (10 heads at N = 4096, 20 heads at N = 1024, d = 64) and
Flux-like (24 heads, 4096 image + 512 text tokens, d = 128) — each case side by side with:

* every torch SDPA backend (``sdpa[flash|efficient|cudnn|math]`` through
  ``torch.nn.attention.sdpa_kernel``; a backend that cannot run the shape shows its error) — the
  goals compare against the fastest of them;
* the eager reference (SEG-SDXL's blur + SDPA, diffusers' PAG processors: dense S×S mask for joint
  attention) and, with ``--full``, ``torch.compile`` of it;
* our backends: ``triton`` — blur / mean pre-passes and ONE flash-attention launch for the whole
  mixed batch —, ``triton_sdpa`` — the same pre-passes feeding torch's SDPA, the kernel only for
  identity / σ = ∞ items — and ``torch``. The faster Triton route should come first in the op's
  priority; goals count the Triton routes only (the torch backend is SDPA itself).

CPU (fp32, small shapes): the algorithmic wins of the torch backend — σ = ∞ as one attention row
per (item, head), identity and joint PAG without the quadratic work. Tiny: odd token counts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import guidance_kernels as gk
from guidance_kernels import reference

from .._spec import blur_kernel_size
from .harness import (
    EAGER,
    Case,
    Goal,
    Provider,
    Result,
    Setup,
    dtype_name,
    faster_than,
    our_providers,
    reference_providers,
    within,
)

OPS = ["guided_attention"]
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
CPU_SDPA_BACKENDS = ("flash", "math")  # the others are CUDA-only
COPY_OF_V = "copy of V (v.clone())"

# (batch, heads, grid, head dim) of the SDXL-like self-attention cases; (heads, grid, text tokens,
# head dim) of the joint (Flux-like) case
SHAPES = {
    "real": ([(2, 10, (64, 64), 64), (4, 20, (32, 32), 64)], (24, (64, 64), 512, 128)),
    "small": ([(2, 10, (32, 32), 64)], (4, (32, 32), 77, 64)),
    "tiny": ([(2, 2, (5, 7), 40)], (2, (5, 7), 3, 32)),
}


def _sdpa_providers(q, k, v) -> list[Provider]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}

    def run(kind):
        with sdpa_kernel([kinds[kind]]):
            return F.scaled_dot_product_attention(q, k, v)

    available = SDPA_BACKENDS if q.is_cuda else CPU_SDPA_BACKENDS
    return [Provider(f"sdpa[{kind}]", (lambda kind=kind: run(kind))) for kind in available]


def _ours(q, k, v, kw) -> list[Provider]:
    """Each of our backends that can serve the call (``kernel_items``: taken as True so that
    triton_sdpa is timed wherever it can run its kernel)."""
    return our_providers("guided_attention", q, lambda backend: gk.guided_attention(q, k, v, backend=backend, **kw),
                         (("head_dim", q.shape[-1]), ("kernel_items", True)))


def _triton(row: Result) -> bool:
    """What automatic selection runs on a GPU: the faster Triton route once the priority puts it first
    (the torch backend, itself SDPA for plain items, does not count)."""
    return row.ours and row.provider.startswith("triton")


def _goal(text: str, limit) -> list[Goal]:
    return [Goal(text + " (GPU, bf16)", limit, counts=_triton)]


def _vs_sdpa(factor: float):
    return within(tuple(f"sdpa[{k}]" for k in SDPA_BACKENDS), factor)


def _qkv(setup: Setup, batch, heads, n, d):
    # (B, N, heads·d) projections viewed as (B, heads, N, d), as diffusers' processors hold them
    return [torch.randn(batch, n, heads * d, device=setup.device, dtype=setup.dtype).view(batch, n, heads, d)
            .transpose(1, 2) for _ in range(3)]


def _flops(items: int, heads: int, n: int, d: int) -> int:
    return 4 * items * heads * n * n * d


def _case(name: str, shape: str, q, providers, **kw) -> Case:
    return Case(op="guided_attention", name=name, shape=shape, dtype=dtype_name(q.dtype), providers=providers, **kw)


def _normal_items(setup: Setup, batch, heads, grid, d) -> Case:
    """[uncond, cond] of CFG, no perturbation: against every SDPA backend."""
    n = grid[0] * grid[1]
    q, k, v = _qkv(setup, batch, heads, n, d)
    providers = reference_providers(setup, lambda: reference.guided_attention(q, k, v, ["none"] * batch))
    providers += _sdpa_providers(q, k, v) + _ours(q, k, v, {})
    return _case("normal items", f"B={batch} h={heads} N={n} d={d}", q, providers, flops=_flops(batch, heads, n, d),
                 goals=_goal(">= 0.9x the fastest SDPA backend's throughput", _vs_sdpa(1 / 0.9)))


def _seg_and_pag_batches(setup: Setup, batch, heads, grid, d) -> list[Case]:
    """[uncond, cond, perturbed]: SEG with finite σ (vs SDPA without blur), and CFG + PAG in one call."""
    n = grid[0] * grid[1]
    shape = f"B={batch}+1 h={heads} N={n} d={d}"
    q, k, v = _qkv(setup, batch + 1, heads, n, d)
    modes = ["none"] * batch + ["blur"]
    out = []
    for sigma in (2.0, 10.0):
        size = blur_kernel_size(sigma, grid)
        providers = reference_providers(setup, lambda s=sigma, z=size: reference.guided_attention(
            q, k, v, modes, s, grid, kernel_size=z))
        providers += _sdpa_providers(q, k, v) + _ours(q, k, v, dict(modes=modes, sigma=sigma, grid=grid))
        goals = _goal("<= 1.15x the fastest SDPA backend without blur (N = 4096)", _vs_sdpa(1.15)) if n == 4096 else []
        out.append(_case(f"SEG σ={sigma:g} (k={size})", shape, q, providers,
                         flops=_flops(batch + 1, heads, n, d), goals=goals))
    pag_modes = ["none"] * batch + ["identity"]
    providers = reference_providers(setup, lambda: reference.guided_attention(q, k, v, pag_modes))
    providers += _ours(q, k, v, dict(modes=pag_modes))
    out.append(_case("CFG+PAG batch", shape, q, providers, flops=_flops(batch, heads, n, d)))
    return out


def _perturbed_items(setup: Setup, batch, heads, grid, d) -> list[Case]:
    """The perturbed branch alone: σ = ∞ items (one attention row each), PAG identity items (a copy)."""
    n = grid[0] * grid[1]
    shape = f"B={batch} h={heads} N={n} d={d}"
    q, k, v = _qkv(setup, batch, heads, n, d)
    inf_modes, id_modes = ["blur"] * batch, ["identity"] * batch
    providers = reference_providers(setup, lambda: reference.guided_attention(q, k, v, inf_modes, math.inf, grid))
    providers += _ours(q, k, v, dict(modes=inf_modes, sigma=math.inf, grid=grid))
    goals = _goal(f">= 5x faster than the {EAGER} (N = 4096)", faster_than(EAGER, 5.0)) if n == 4096 else []
    inf = _case("SEG σ=∞ items", shape, q, providers, bytes=4 * q.numel() * q.element_size(), goals=goals)
    providers = reference_providers(setup, lambda: reference.guided_attention(q, k, v, id_modes))
    providers.append(Provider(COPY_OF_V, v.clone))
    providers += _ours(q, k, v, dict(modes=id_modes))
    identity = _case("PAG identity items", shape, q, providers, bytes=2 * v.numel() * v.element_size(),
                     goals=_goal("<= 1.1x a copy of V", within((COPY_OF_V,), 1.1)))
    return [inf, identity]


def _joint_cases(setup: Setup, heads, grid, text, d) -> list[Case]:
    """Joint attention (Flux-like: text before the image tokens): PAG against diffusers' dense mask,
    and SEG σ = 2 in the batch [uncond, cond, perturbed] against plain SDPA of that shape."""
    n = grid[0] * grid[1] + text
    joint = dict(grid=grid, text_tokens=text, text_position="before")
    q, k, v = _qkv(setup, 1, heads, n, d)
    providers = reference_providers(setup, lambda: reference.guided_attention(
        q, k, v, ["identity"], text_tokens=text, text_position="before"))
    providers += _ours(q, k, v, dict(modes=["identity"], **joint))
    pag = _case("joint PAG item", f"B=1 h={heads} N={grid[0] * grid[1]}+{text} text d={d}", q, providers,
                goals=_goal(">= 5x faster than diffusers' dense-mask SDPA path", faster_than(EAGER, 5.0)))
    q, k, v = _qkv(setup, 3, heads, n, d)
    modes, size = ["none", "none", "blur"], blur_kernel_size(2.0, grid)
    providers = reference_providers(setup, lambda: reference.guided_attention(
        q, k, v, modes, 2.0, grid, text_tokens=text, text_position="before", kernel_size=size))
    providers += _sdpa_providers(q, k, v) + _ours(q, k, v, dict(modes=modes, sigma=2.0, **joint))
    seg = _case("joint SEG σ=2 batch", f"B=3 h={heads} N={grid[0] * grid[1]}+{text} text d={d}", q, providers,
                flops=_flops(3, heads, n, d),
                goals=_goal("<= 1.15x the fastest SDPA backend without blur", _vs_sdpa(1.15)))
    return [pag, seg]


def cases(setup: Setup) -> list[Case]:
    self_attention, joint = SHAPES[setup.shapes]
    out = []
    for shape in self_attention:
        out.append(_normal_items(setup, *shape))
        out += _seg_and_pag_batches(setup, *shape)
        out += _perturbed_items(setup, *shape)
    return out + _joint_cases(setup, *joint)
