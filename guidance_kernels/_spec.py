"""Rules that the ops and the references share: plain Python on shapes and numbers, no device work.

The public functions, every backend and :mod:`guidance_kernels.reference` (the test oracle) take
these from here, so that production code never imports the oracle and both agree bit for bit on
kernel sizes, blur weights, map grids and interpolation indices.
"""

from __future__ import annotations

import enum
import math
import struct
from functools import lru_cache

import torch

# --------------------------------------------------------------------------- limits

MAX_BRANCHES = 8  # branches one combine reads
MAX_TERMS = 8  # guidance terms of one combine
APG_FORMULATIONS = ("paper", "diffusers", "diffusers_original")
# AdaptiveProjectedMixGuidance's CFG phase (before its APG start step): plain CFG on base uncond
# ("cfg") or cond ("cfg_original") while the momentum buffer keeps accumulating cond − uncond.
APG_CFG_FORMULATIONS = ("cfg", "cfg_original")
# Formulation codes the kernels switch on (every backend reads them from here).
APG_FORMULATION_CODES = {"paper": 0, "diffusers": 1, "diffusers_original": 2, "cfg": 3, "cfg_original": 4}
MAX_SAG_KERNEL_SIZE = 15  # SAG blur taps the kernels support (odd sizes 1..15; k = 9 in both anchors)


def rescale_on(number: float, tensor: torch.Tensor | None) -> bool:
    """Whether a combine applies guidance rescale: a tensor φ always, a number when it is > 0 (as
    diffusers' ``if guidance_rescale > 0.0``; negative numbers are refused by the public functions).
    The one predicate every layer uses."""
    return tensor is not None or number > 0


# --------------------------------------------------------------------------- combine-family constants

CFG_ZERO_STAR_EPS = 1e-8  # diffusers / ComfyUI: ‖u‖² + 1e-8 in CFG-Zero*'s alpha
NORMALIZE_EPS = 1e-12  # F.normalize's eps (APG's projection on cond)
CFG_NORM_EPS = 1e-8  # ComfyUI CFGNorm: ‖out‖ + 1e-8
COSINE_EPS = 1e-8  # F.cosine_similarity's eps (Mahiro)


# --------------------------------------------------------------------------- Gaussian blur (SEG §5, SAG §6)

SEG_INF_SIGMA = 9999.0  # SEG-SDXL: sigma above this is "infinite" (every query := the grid mean)


def seg_kernel_size(sigma: float) -> int:
    """SEG-SDXL's kernel size rule: ``ceil(6σ) + 1 − ceil(6σ) % 2`` (always odd)."""
    k = math.ceil(6 * sigma)
    return k + 1 - k % 2


def blur_kernel_size(sigma: float, grid: tuple[int, int]) -> int:
    """SEG's kernel size for ``sigma`` on an ``(H, W)`` grid, 0 for σ > ``SEG_INF_SIGMA`` (the mean).

    ``ceil(6σ) + 1 − ceil(6σ) % 2`` capped at ``W − (W % 2 − 1)`` exactly as SEG-SDXL (its blur caps
    with the last dim), then at ``2H − 1`` — the largest odd size whose reflect padding ``k // 2`` is
    below ``H`` — where SEG-SDXL's padding would fail on a grid wider than tall. Always odd."""
    if sigma > SEG_INF_SIGMA:
        return 0
    h, w = grid
    k = min(seg_kernel_size(sigma), w - (w % 2 - 1))
    return min(k, 2 * h - 1)


def gaussian_kernel_1d(kernel_size: int, sigma: float) -> torch.Tensor:
    """The 1-D weights of the anchors' ``gaussian_blur_2d``, in float32 (cast to the tensor dtype
    by the caller): ``exp(−½ (x/σ)²)`` on ``linspace(−(k−1)/2, (k−1)/2, k)``, normalised to sum 1.

    A σ below float32's range (it rounds to 0, so the anchors' formula gives NaN weights) gets
    its limit σ → 0: the single centre tap, the identity."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    weights = pdf / pdf.sum()
    if not bool(torch.isfinite(weights).all()):
        weights = (x == 0).to(torch.float32)
    return weights


@lru_cache(maxsize=256)
def blur_weights(kernel_size: int, sigma: float) -> tuple[float, ...]:
    """:func:`gaussian_kernel_1d` as Python floats (exactly representable in float32, so kernel
    arguments keep them bit for bit). Computed on real tensors whatever tracing mode is active
    (fake tensors under torch.compile have no values)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return tuple(float(w) for w in gaussian_kernel_1d(kernel_size, sigma).tolist())


@lru_cache(maxsize=256)
def blur_taps(kernel_size: int, sigma: float) -> tuple[float, ...]:
    """The weights a ``kernel_size``-tap blur applies: :func:`blur_weights` without the outer taps
    whose float32 weight is exactly 0 (σ small against the kernel). Dropping them changes no blur
    of finite data (adding 0·x changes no sum) and keeps a zero weight from turning an inf or NaN
    outside the blur's footprint into NaN. Every backend and the reference blur with these taps
    (reflect padding ``len(taps) // 2``); ops carry the requested size, backends call this."""
    weights = blur_weights(kernel_size, sigma)
    zeros = next((i for i, w in enumerate(weights) if w != 0.0), kernel_size // 2)
    return weights[zeros:kernel_size - zeros]


# --------------------------------------------------------------------------- perturbed-attention modes


class Mode(enum.IntEnum):
    """What a batch item's attention does (``guided_attention``). The public spellings are the
    lower-case names of the first three; ``MEAN`` is a blur with σ = ∞, produced by lowering."""

    NONE = 0  # softmax(scale·q kᵀ) v
    IDENTITY = 1  # PAG: v (joint attention: image query i sees key i and the text keys)
    BLUR = 2  # SEG: image queries blurred over the grid (finite σ, kernel size > 1)
    MEAN = 3  # SEG σ = ∞: every image query := the grid mean


PUBLIC_MODES = tuple(m.name.lower() for m in (Mode.NONE, Mode.IDENTITY, Mode.BLUR))


# --------------------------------------------------------------------------- token layouts


def heads_view(t: torch.Tensor, heads: int, layout: str) -> torch.Tensor:
    """``(B, heads, N, d)`` view of a ``"bhnd"`` tensor (itself) or a ``"bnd"`` one ``(B, N, heads·d)``
    (diffusers' head split: channel ``h·d + i`` is head ``h``, feature ``i``). Never copies."""
    if layout == "bnd":
        return t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(1, 2)
    return t


def tokens_to_image(x: torch.Tensor, grid: tuple[int, int], layout: str) -> torch.Tensor:
    """``(B, N, C)`` ["bnc"] or ``(B, heads, N, d)`` ["bhnd"] image tokens (row-major over the
    ``(H, W)`` grid) as ``(B, C, H, W)`` with channel ``head·d + j`` — SEG-SDXL's
    ``permute(0, 1, 3, 2).view(B, heads·d, H, W)``. ``"nchw"`` is returned as is."""
    h, w = grid
    if layout == "nchw":
        return x
    if layout == "bnc":
        return x.permute(0, 2, 1).reshape(x.shape[0], x.shape[2], h, w)
    if layout == "bhnd":
        return x.permute(0, 1, 3, 2).reshape(x.shape[0], x.shape[1] * x.shape[3], h, w)
    raise ValueError(f"tokens_to_image: layout: unknown {layout!r}")


def image_to_tokens(img: torch.Tensor, like: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of :func:`tokens_to_image` (shape of ``like``)."""
    if layout == "nchw":
        return img
    if layout == "bnc":
        return img.reshape(img.shape[0], img.shape[1], -1).permute(0, 2, 1)
    if layout == "bhnd":
        b, heads, n, d = like.shape
        return img.reshape(b, heads, d, n).permute(0, 1, 3, 2)
    raise ValueError(f"image_to_tokens: layout: unknown {layout!r}")


# --------------------------------------------------------------------------- SAG (§6)

RENOISE = {"none": 0, "ddpm": 1, "kdiff": 2}


def sag_map_grid(latent_h: int, latent_w: int, tokens: int) -> tuple[int, int]:
    """ComfyUI's map grid for a latent that need not be divisible by the attention map:
    ``ratio = 2**(ceil(sqrt(lh·lw/N)) − 1).bit_length()``, grid ``(ceil(lh/ratio), ceil(lw/ratio))``."""
    ratio = 2 ** (math.ceil(math.sqrt(latent_h * latent_w / tokens)) - 1).bit_length()
    return math.ceil(latent_h / ratio), math.ceil(latent_w / ratio)


def fp32(value: float) -> float:
    """``value`` rounded to the nearest float32 (as a Python float)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def nearest_scale(in_size: int, out_size: int) -> float:
    """The source-index scale of ``F.interpolate(mode="nearest")`` (ATen ``nearest_idx``):
    ``src = min(floor(dst · scale), in − 1)`` computed in float32 with ``scale = float(in) / out``.
    ATen special-cases ``out == in`` (copy) and ``out == 2·in`` (``dst >> 1``); the scales 1 and
    0.5 give exactly those indices. float32 division equals the double quotient rounded to float32
    (53 ≥ 2·24 + 2 bits, so the double rounding is innocuous)."""
    if out_size == in_size:
        return 1.0
    if out_size == 2 * in_size:
        return 0.5
    return fp32(in_size / out_size)



# --------------------------------------------------------------------------- FDG: kornia's Laplacian pyramid

FDG_MAX_LEVELS = 8
FDG_RESCALE_SPACES = ("data", "freq")
# kornia's pyramid kernel [1, 4, 6, 4, 1] ⊗ [1, 4, 6, 4, 1] / 256 (reflect border), per axis.
PYR_BLUR = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)
# pyrdown = that blur, then bilinear halving (align_corners=False: the mean of pixels 2i and 2i+1):
# per axis six taps on the reflected input at 2i − 2 … 2i + 3. Exact in float32.
PYR_DOWN = (1 / 32, 5 / 32, 10 / 32, 10 / 32, 5 / 32, 1 / 32)


def reflect_index(i: int, n: int) -> int:
    """``F.pad(mode="reflect")``'s source index for position ``i`` of a padded axis of length ``n``
    (``−1 → 1``, ``n → n − 2``; one reflection suffices for the pads used here)."""
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


def fdg_padded_size(height: int, width: int, levels: int) -> tuple[int, int]:
    """The size kornia's ``build_laplacian_pyramid`` pads a latent to (reflect, right and bottom):
    the next power of two per side when neither side is a power of two, or when ``levels > 1``
    and a side is not divisible by ``2**(levels − 1)``; the input size otherwise."""
    def pow2(x: int) -> bool:
        return x > 0 and not x & (x - 1)

    need = not (pow2(width) or pow2(height))
    if levels > 1:
        stride = 1 << (levels - 1)
        need = need or height % stride != 0 or width % stride != 0
    if not need:
        return height, width
    return 1 << (height - 1).bit_length(), 1 << (width - 1).bit_length()


def fdg_level_sizes(height: int, width: int, levels: int) -> list[tuple[int, int]] | None:
    """The (H, W) of every pyramid level (level 0 the padded latent), or None when kornia's pyramid
    cannot be built: each level is halved exactly and the coarsest is at least 2×2 (its 2× upsample
    must take kornia's 5×5 reflect blur), unless there is a single level."""
    h, w = fdg_padded_size(height, width, levels)
    if levels > 1:
        stride = 1 << (levels - 1)
        if h % stride or w % stride or h // stride < 2 or w // stride < 2:
            return None
    return [(h >> i, w >> i) for i in range(levels)]


@lru_cache(maxsize=256)
def pyrup_table(size: int) -> tuple[float, ...]:
    """kornia's ``pyrup`` along one axis of a level of ``size`` pixels as a 5-tap stencil: output
    pixel ``j`` of ``2·size`` is ``Σ_t table[5j + t] · x[clamp(j // 2 − 2 + t)]`` — bilinear 2×
    upsampling (align_corners=False: source ``j/2 − 1/4`` clamped at 0 and at ``size − 1``), then the
    5-tap blur with reflect padding on the upsampled axis. Weights are exact in float32 (sums of
    multiples of 1/64); slots whose index falls outside ``[0, size)`` have weight 0."""
    out: list[float] = []
    for j in range(2 * size):
        slots = [0.0] * 5
        base = j // 2 - 2
        for t, b in enumerate(PYR_BLUR):
            m = reflect_index(j + t - 2, 2 * size)
            src = max((m + 0.5) / 2 - 0.5, 0.0)
            i0 = int(src)
            lam = src - i0
            i1 = min(i0 + 1, size - 1)
            for index, weight in ((i0, 1.0 - lam), (i1, lam)):
                if weight:
                    slots[index - base] += b * weight
        out.extend(slots)
    return tuple(out)
