"""Self-attention guidance (SAG, Hong et al. 2023): the attention key mass, the fused degrade step
and the masking strategies of the paper's ablation, all feeding ONE degrade kernel.

A SAG step (diffusers ``StableDiffusionSAGPipeline``, ComfyUI ``SelfAttentionGuidance``)::

    out, mass = attention_key_mass(q, k, v, items=uncond_items)   # in the mid-block self-attention
    degraded = sag_degrade(x0_uncond, mass, grid=map_size, eps=eps_uncond, alpha_cumprod=a_t)
    eps_degraded = unet(degraded, ...)                              # one extra uncond forward
    noise_pred += sag_scale * (eps_uncond - eps_degraded)           # or combine with terms.sag()

* :func:`attention_key_mass` — attention output plus ``mass[i, j] = mean_heads Σ_queries P[·, j]``,
  flash-style (never the (B·heads, N, M) probabilities; extra memory O(B·heads·(N + M))).
* :func:`sag_degrade` — threshold ``mass > threshold``, nearest upsampling of the map to the
  latent, 9-tap Gaussian blur (reflect padding), blend and re-noise, in one kernel launch.
* Mask providers (each returns something :func:`sag_degrade` takes): the attention mass itself
  (:func:`attention_mask` to look at it), :func:`global_mask`, :func:`random_patch_mask`,
  :func:`square_patch_mask`, :func:`high_frequency_mask`, and any user map — a ready mask
  ``(B|1, h, w)`` / ``(B|1, 1, h, w)`` of blend weights in [0, 1] (bool or float, e.g. from an
  external ViT's attention), or per-token scores ``(B|1, N)`` with ``grid=`` and ``threshold=``.

The blur acts in the space the caller hands over (x0 for diffusers and ComfyUI). These are
inference ops: no autograd formula.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

from . import _checks, _extension, _library, backends
from ._sag_plan import MAX_KERNEL_SIZE
from .reference import sag_map_grid_comfy

MAX_TRITON_HEAD_DIM = 256
LAYOUTS = ("bhnd", "bnd")


def _attention_triton_reasons(req: backends.Request) -> list[str]:
    head_dim = req.fact("head_dim")
    if head_dim is not None and head_dim > MAX_TRITON_HEAD_DIM:
        return [f"head dim {head_dim} > {MAX_TRITON_HEAD_DIM}"]
    return []


def _degrade_cuda_reasons(req: backends.Request) -> list[str]:
    module = _extension.load()
    if module is not None and not hasattr(module, "sag_degrade"):
        return ["_C was built without sag_degrade (csrc/_C.cpp must call register_sag_degrade)"]
    return []


backends.register_op("attention_key_mass", ("triton", "torch"), triton=_attention_triton_reasons)
backends.register_op("sag_degrade", ("cuda", "triton", "torch"), cuda=_degrade_cuda_reasons)


# --------------------------------------------------------------------------- small checks


def _int(fn: str, arg: str, value, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _checks.fail(fn, arg, f"expected an int, got {type(value).__name__}", TypeError)
    if minimum is not None and value < minimum:
        _checks.fail(fn, arg, f"must be >= {minimum}, got {value}")
    return int(value)


def _like(fn: str, arg: str, t, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """``t`` must be a tensor with the shape, device and dtype of ``like``."""
    if not isinstance(t, torch.Tensor):
        _checks.fail(fn, arg, f"expected a torch.Tensor, got {type(t).__name__}", TypeError)
    _checks.same_device_dtype(fn, arg, t, like, like_name)
    if t.shape != like.shape:
        _checks.fail(fn, arg, f"shape {tuple(t.shape)} differs from {like_name} {tuple(like.shape)}")
    return t


def _grid(fn: str, grid) -> tuple[int, int]:
    if not isinstance(grid, Sequence) or isinstance(grid, (str, bytes)) or len(grid) != 2:
        _checks.fail(fn, "grid", f"expected (h, w), got {grid!r}", TypeError)
    return _int(fn, "grid[0]", grid[0], minimum=1), _int(fn, "grid[1]", grid[1], minimum=1)


# --------------------------------------------------------------------------- attention_key_mass


def attention_key_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str = "bhnd",
                       heads: int | None = None, scale: float | None = None, items: Sequence[int] | None = None,
                       backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled-dot-product attention that also returns SAG's per-key attention mass.

    ::

        P = softmax(scale · q kᵀ)                    per sample and head, (N, M), never stored
        out = P v                                    (as F.scaled_dot_product_attention)
        mass[i, j] = mean_heads Σ_queries P[:, j]    for batch item items[i]

    The mass of a key is its column sum averaged over heads; its mean over keys is N/M (1 for
    self-attention), which is why SAG thresholds it at 1.0. Computed flash-style: pass 1 is a
    flash-attention forward that keeps the per-row log-sum-exp, pass 2 recomputes the score tiles
    of the wanted items and sums ``exp(s − lse)`` down the query axis.

    Args:
        q: ``(B, heads, N, d)`` (``layout="bhnd"``) or ``(B, N, heads·d)`` (``"bnd"``, diffusers'
            ``to_q`` output; channel ``h·d + i`` is head ``h``).
        k, v: ``(B, heads, M, d)`` / ``(B, M, heads·d)``, same dtype and device as q.
        layout: ``"bhnd"`` or ``"bnd"``.
        heads: number of heads; required for ``"bnd"`` (must divide the last dim).
        scale: softmax scale, default ``d ** -0.5``.
        items: batch indices (Python ints) whose mass is wanted, e.g. ``range(B // 2)`` for the
            uncond half of a CFG batch; default all. ``out`` is computed for every item. Indices
            in arithmetic progression (any ``range``) reach the Triton kernels as two integers;
            others as a small index tensor (a host→device copy: not CUDA-graph capturable).
        backend: ``"triton"`` (CUDA; head dims ≤ 256), ``"torch"`` (any device, chunked over
            queries: never more than ~2M scores per sample at once) or None/``"auto"``.

    Returns:
        ``(out, mass)``: ``out`` contiguous with q's shape and dtype; ``mass`` float32
        ``(len(items) or B, M)``.

    dtypes: float32 (exact fp32 dots, no TF32), float16, bfloat16 (fp32 accumulation); float64 on
    the torch backend. Head dims 40, 64, 80, 128, 160 (any ≤ 256) on Triton.
    """
    fn = "attention_key_mass"
    _checks.float_tensor(fn, "q", q)
    _checks.float_tensor(fn, "k", k)
    _checks.float_tensor(fn, "v", v)
    _checks.same_device_dtype(fn, "k", k, q, "q")
    _checks.same_device_dtype(fn, "v", v, q, "q")
    if layout not in LAYOUTS:
        _checks.fail(fn, "layout", f"must be one of {LAYOUTS}, got {layout!r}")
    if layout == "bhnd":
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4:
                _checks.fail(fn, name, f"layout 'bhnd' needs (B, heads, N, d), got shape {tuple(t.shape)}")
        if heads is not None and _int(fn, "heads", heads, minimum=1) != q.shape[1]:
            _checks.fail(fn, "heads", f"is {heads} but q has {q.shape[1]} heads (dim 1)")
        heads = q.shape[1]
        batch, n_q, head_dim = q.shape[0], q.shape[2], q.shape[3]
        if tuple(k.shape[:2]) != (batch, heads) or k.shape[3] != head_dim:
            _checks.fail(fn, "k", f"shape {tuple(k.shape)} does not match q {tuple(q.shape)} "
                                  "(expected (B, heads, M, d))")
        n_k = k.shape[2]
    else:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 3:
                _checks.fail(fn, name, f"layout 'bnd' needs (B, N, heads·d), got shape {tuple(t.shape)}")
        if heads is None:
            _checks.fail(fn, "heads", "required with layout 'bnd'")
        heads = _int(fn, "heads", heads, minimum=1)
        if q.shape[2] % heads:
            _checks.fail(fn, "heads", f"{heads} does not divide the last dim {q.shape[2]} of q")
        batch, n_q, head_dim = q.shape[0], q.shape[1], q.shape[2] // heads
        if k.shape[0] != batch or k.shape[2] != q.shape[2]:
            _checks.fail(fn, "k", f"shape {tuple(k.shape)} does not match q {tuple(q.shape)} "
                                  "(expected (B, M, heads·d))")
        n_k = k.shape[1]
    if v.shape != k.shape:
        _checks.fail(fn, "v", f"shape {tuple(v.shape)} differs from k {tuple(k.shape)}")
    if n_q < 1 or n_k < 1 or head_dim < 1:
        _checks.fail(fn, "q", f"needs at least one query, key and feature (N={n_q}, M={n_k}, d={head_dim})")
    scale = head_dim**-0.5 if scale is None else _checks.finite_number(fn, "scale", scale)
    if items is not None:
        if isinstance(items, torch.Tensor) or not isinstance(items, Sequence):
            _checks.fail(fn, "items", f"expected a sequence of Python ints, got {type(items).__name__}", TypeError)
        items = [_int(fn, "items", i) for i in items]
        if not items:
            _checks.fail(fn, "items", "is empty (pass None for every item)")
        bad = [i for i in items if not 0 <= i < batch]
        if bad:
            _checks.fail(fn, "items", f"batch index {bad[0]} out of range for batch size {batch}")
    chosen = backends.select(fn, q, (("head_dim", head_dim),), backend)
    return _library.call(_library.attention_key_mass, q, k, v, heads, layout, float(scale), items, chosen)


# --------------------------------------------------------------------------- sag_degrade


def sag_map_grid(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
    """The attention map's grid for a latent of ``latent_hw`` and ``tokens`` keys, by ComfyUI's rule
    (exact for latents divisible by the UNet's downsampling, and for the padded sizes of the rest):
    ``ratio = 2**(ceil(sqrt(lh·lw/N)) − 1).bit_length()``, grid ``(ceil(lh/ratio), ceil(lw/ratio))``.
    diffusers instead records the mid block's output size (``map_size``): pass that as ``grid=``."""
    return sag_map_grid_comfy(int(latent_hw[0]), int(latent_hw[1]), int(tokens))


def _alpha(fn: str, value, batch: int, device: torch.device):
    """ᾱ_t as (number, None) or (0.0, fp32 tensor (1,) | (B,)); range-checked where that needs no
    device sync (a Python number; a CPU tensor outside torch.compile)."""
    number, tensor = _checks.scale(fn, "alpha_cumprod", value, batch, device)
    if tensor is None and not 0.0 < number <= 1.0:
        _checks.fail(fn, "alpha_cumprod", f"must be in (0, 1], got {number}")
    if isinstance(value, torch.Tensor) and value.device.type == "cpu" and not _checks.is_compiling() \
            and not bool(((tensor > 0) & (tensor <= 1)).all()):
        _checks.fail(fn, "alpha_cumprod", f"values must be in (0, 1], got {value.reshape(-1).tolist()}")
    return number, tensor


def _mask_map(fn: str, mask_or_mass, x0: torch.Tensor, grid, threshold) -> tuple[torch.Tensor, bool]:
    """The (B|1, h, w) map the op reads and whether it is a key mass to threshold."""
    batch, _, height, width = x0.shape
    if not isinstance(mask_or_mass, torch.Tensor):
        _checks.fail(fn, "mask_or_mass", f"expected a torch.Tensor, got {type(mask_or_mass).__name__}", TypeError)
    t = mask_or_mass
    if t.device != x0.device:
        _checks.fail(fn, "mask_or_mass", f"is on {t.device} but x0 is on {x0.device}")
    if not (t.is_floating_point() or t.dtype == torch.bool):
        _checks.fail(fn, "mask_or_mass", f"expected a floating-point or bool tensor, got {t.dtype}", TypeError)
    if t.dim() not in (2, 3, 4):
        _checks.fail(fn, "mask_or_mass", f"expected a key mass (B, N) or a mask (B, h, w) / (B, 1, h, w), "
                                         f"got shape {tuple(t.shape)}")
    if t.shape[0] not in (1, batch):
        _checks.fail(fn, "mask_or_mass", f"batch size {t.shape[0]} is neither 1 nor x0's {batch}")
    if t.dim() == 2:
        if t.dtype == torch.bool:
            _checks.fail(fn, "mask_or_mass", "a bool map is a mask: pass it as (B, h, w)", TypeError)
        tokens = t.shape[1]
        if grid is None:
            h, w = sag_map_grid((height, width), tokens)
            if h * w != tokens:
                _checks.fail(fn, "mask_or_mass", f"{tokens} keys match no map grid for the latent "
                                                 f"{height}x{width} (ComfyUI's rule gives {h}x{w} = {h * w}); "
                                                 "pass grid=(h, w), e.g. diffusers' map_size")
        else:
            h, w = _grid(fn, grid)
            if h * w != tokens:
                _checks.fail(fn, "grid", f"{h}x{w} = {h * w} cells but the key mass has {tokens} keys")
        thresholded = True
        mask_map = t.reshape(t.shape[0], h, w)
    else:
        if grid is not None:
            _checks.fail(fn, "grid", "only applies to a key mass (B, N); a mask carries its own grid")
        if t.dim() == 4 and t.shape[1] != 1:
            _checks.fail(fn, "mask_or_mass", f"a 4-d mask must be (B, 1, h, w) (one map for every channel), "
                                             f"got shape {tuple(t.shape)}")
        mask_map = t.reshape(t.shape[0], t.shape[-2], t.shape[-1])
        thresholded = False
    if 0 in mask_map.shape[1:]:
        _checks.fail(fn, "mask_or_mass", f"empty map grid {tuple(mask_map.shape[1:])}")
    if mask_map.dtype == torch.float64 and x0.dtype != torch.float64:
        mask_map = mask_map.float()  # the kernels read fp32/fp16/bf16/bool maps
    return mask_map, thresholded


def sag_degrade(x0: torch.Tensor, mask_or_mass: torch.Tensor, *, grid: tuple[int, int] | None = None,
                threshold: float = 1.0, sigma: float = 1.0, kernel_size: int = 9, eps: torch.Tensor | None = None,
                alpha_cumprod=None, x_t: torch.Tensor | None = None, return_degraded: bool = False,
                backend: str | None = None):
    """SAG's degraded latent in one kernel: masked Gaussian blur of ``x0``, then re-noise.

    ::

        m        = mass > threshold on grid (h, w)   |  the given mask (blend weights)
        m        ← nearest upsampling to (H, W)       (F.interpolate(mode="nearest") indices)
        degraded = blur(x0)·m + x0·(1 − m)            (Gaussian, kernel_size taps, σ, reflect padding)
        out      = sqrt(ᾱ)·degraded + sqrt(1 − ᾱ)·eps  given eps and alpha_cumprod (diffusers add_noise)
                 = (degraded + x_t) − x0               given x_t (ComfyUI / k-diffusion)
                 = degraded                            given neither

    Args:
        x0: ``(B, C, H, W)`` predicted clean latent of the uncond branch (C = 4…16 in practice;
            any layout; float32/float16/bfloat16, float64 on the torch backend). ``min(H, W)``
            must exceed ``kernel_size // 2`` (reflect padding; ComfyUI skips SAG at ≤ 4).
        mask_or_mass: either the key mass ``(B|1, N)`` (e.g. from :func:`attention_key_mass`, or
            any per-token score), thresholded ``> threshold`` (compared in float32) and read on
            ``grid``; or a ready mask ``(B|1, h, w)`` / ``(B|1, 1, h, w)`` of blend weights
            (bool, or float in [0, 1]; soft values blend linearly) on any grid. Batch 1 broadcasts.
        grid: ``(h, w)`` of the key mass — diffusers' ``map_size`` (the mid block's output size).
            Default: ComfyUI's rule :func:`sag_map_grid`, which also covers latents not divisible
            by the map. Must multiply to N.
        threshold: key-mass threshold (1.0 in both anchors: the mean mass of a self-attention key).
        sigma: blur σ (diffusers 1.0, ComfyUI 2.0).
        kernel_size: odd, 1…15 (9 in both anchors; weights of ``reference.gaussian_kernel_1d``).
        eps, alpha_cumprod: DDPM re-noise; ``alpha_cumprod`` is ᾱ_t in (0, 1], a number or a float
            tensor of shape (), (1,) or (B,) on x0's device (a tensor does not recompile under
            torch.compile when it changes per step; values of CUDA tensors are not range-checked,
            which would sync). ``eps`` has x0's shape, dtype and device.
        x_t: k-diffusion re-noise (the current noisy latent), x0's shape, dtype and device.
        return_degraded: also return the un-noised ``degraded`` (ComfyUI adds ``(degraded − sag)``).
        backend: ``"cuda"``, ``"triton"``, ``"torch"`` or None/``"auto"``.

    Returns:
        ``out`` (``(out, degraded)`` with ``return_degraded``): x0's shape and dtype, laid out like
        x0 when x0 is dense (contiguous, channels-last), else contiguous. fp32 arithmetic.
    """
    fn = "sag_degrade"
    _checks.float_tensor(fn, "x0", x0)
    if x0.dim() != 4:
        _checks.fail(fn, "x0", f"expected a (B, C, H, W) latent, got shape {tuple(x0.shape)}")
    kernel_size = _int(fn, "kernel_size", kernel_size, minimum=1)
    if kernel_size % 2 == 0 or kernel_size > MAX_KERNEL_SIZE:
        _checks.fail(fn, "kernel_size", f"must be odd and <= {MAX_KERNEL_SIZE}, got {kernel_size}")
    sigma = _checks.finite_number(fn, "sigma", sigma, minimum=0.0, minimum_inclusive=False)
    threshold = _checks.finite_number(fn, "threshold", threshold)
    height, width = x0.shape[2], x0.shape[3]
    if min(height, width) <= kernel_size // 2:
        _checks.fail(fn, "x0", f"latent {height}x{width} is too small for the reflect padding of a {kernel_size}-tap "
                               f"blur (min(H, W) must be > {kernel_size // 2}; ComfyUI skips SAG when min(H, W) <= 4)")
    mask_map, thresholded = _mask_map(fn, mask_or_mass, x0, grid, threshold)
    if not isinstance(return_degraded, bool):
        _checks.fail(fn, "return_degraded", f"expected a bool, got {type(return_degraded).__name__}", TypeError)
    alpha, alpha_tensor, other, renoise = 0.0, None, None, "none"
    if x_t is not None:
        if eps is not None or alpha_cumprod is not None:
            _checks.fail(fn, "x_t", "give either x_t (k-diffusion re-noise) or eps and alpha_cumprod (DDPM), not both")
        other, renoise = _like(fn, "x_t", x_t, x0, "x0"), "kdiff"
    elif eps is not None or alpha_cumprod is not None:
        if eps is None:
            _checks.fail(fn, "eps", "required with alpha_cumprod (DDPM re-noise)")
        if alpha_cumprod is None:
            _checks.fail(fn, "alpha_cumprod", "required with eps (DDPM re-noise)")
        other, renoise = _like(fn, "eps", eps, x0, "x0"), "ddpm"
        alpha, alpha_tensor = _alpha(fn, alpha_cumprod, x0.shape[0], x0.device)
    chosen = backends.select(fn, x0, backend=backend)
    out, degraded = _library.call(_library.sag_degrade, x0, mask_map, thresholded, float(threshold), kernel_size,
                                  float(sigma), renoise, float(alpha), alpha_tensor, other, return_degraded, chosen)
    return (out, degraded) if return_degraded else out


# --------------------------------------------------------------------------- mask providers


def attention_mask(mass: torch.Tensor, grid: tuple[int, int], *, threshold: float = 1.0) -> torch.Tensor:
    """The attention mask SAG blurs, to look at or combine: ``(mass > threshold)`` on ``grid`` as a
    float32 ``(B, 1, h, w)`` 0/1 map. (:func:`sag_degrade` takes the mass itself and thresholds it
    in the kernel; passing this mask instead gives the same result.)"""
    fn = "attention_mask"
    _checks.float_tensor(fn, "mass", mass)
    if mass.dim() != 2:
        _checks.fail(fn, "mass", f"expected (B, N), got shape {tuple(mass.shape)}")
    h, w = _grid(fn, grid)
    if h * w != mass.shape[1]:
        _checks.fail(fn, "grid", f"{h}x{w} = {h * w} cells but the key mass has {mass.shape[1]} keys")
    threshold = _checks.finite_number(fn, "threshold", threshold)
    return (mass.float() > threshold).float().reshape(-1, 1, h, w)


def global_mask(batch: int = 1, *, device=None) -> torch.Tensor:
    """Blur everything (the paper's "global" ablation): a float32 ``(batch, 1, 1, 1)`` mask of ones."""
    return torch.ones((_int("global_mask", "batch", batch, minimum=1), 1, 1, 1), device=device)


def random_patch_mask(batch: int, grid: tuple[int, int], *, fraction: float = 0.5,
                      generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Random patches (the paper's "random" ablation): on a ``grid`` of patches, exactly
    ``round(fraction·h·w)`` cells per sample, drawn uniformly without replacement, are 1.
    Returns float32 ``(batch, 1, h, w)``; nearest upsampling in :func:`sag_degrade` turns each
    cell into a patch of the latent. ``generator`` lives on the CPU (masks are drawn there)."""
    fn = "random_patch_mask"
    batch = _int(fn, "batch", batch, minimum=1)
    h, w = _grid(fn, grid)
    fraction = _checks.finite_number(fn, "fraction", fraction, minimum=0.0)
    if fraction > 1:
        _checks.fail(fn, "fraction", f"must be in [0, 1], got {fraction}")
    count = round(fraction * h * w)
    order = torch.rand((batch, h * w), generator=generator).argsort(dim=1)
    mask = (order < count).float()  # the rank of each cell in a random order: the first `count` are chosen
    return mask.reshape(batch, 1, h, w).to(device)


def square_patch_mask(batch: int, grid: tuple[int, int], *, size: int, generator: torch.Generator | None = None,
                      device=None) -> torch.Tensor:
    """One square per sample (the paper's "square" ablation): a ``size × size`` block of 1s at a
    uniformly random position inside ``grid`` (use the latent size as grid for pixel squares).
    Returns float32 ``(batch, 1, h, w)``; ``generator`` lives on the CPU."""
    fn = "square_patch_mask"
    batch = _int(fn, "batch", batch, minimum=1)
    h, w = _grid(fn, grid)
    size = _int(fn, "size", size, minimum=1)
    if size > min(h, w):
        _checks.fail(fn, "size", f"{size} does not fit in the {h}x{w} grid")
    top = torch.randint(0, h - size + 1, (batch,), generator=generator)
    left = torch.randint(0, w - size + 1, (batch,), generator=generator)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < top.view(-1, 1, 1) + size)
              & (cols >= left.view(-1, 1, 1)) & (cols < left.view(-1, 1, 1) + size))
    return inside.float().unsqueeze(1).to(device)


def high_frequency_mask(x0: torch.Tensor, *, cutoff: float = 0.25, threshold: float = 1.0) -> torch.Tensor:
    """Where the latent has high-frequency content (the paper's "high-frequency" ablation).

    ``hp = ifft2(fft2(x0) · [|f| > cutoff · 0.5])`` removes the frequencies within ``cutoff`` of
    the Nyquist radius (``|f|`` in cycles per pixel, ``fftfreq`` per axis); the energy
    ``e = mean_channels |hp|²`` is thresholded relative to its per-sample mean:
    ``mask = e > threshold · mean(e)`` — the same "above average" rule as the attention mass.
    Returns float32 ``(B, 1, H, W)`` on x0's device (computed in float32)."""
    fn = "high_frequency_mask"
    _checks.float_tensor(fn, "x0", x0)
    if x0.dim() != 4:
        _checks.fail(fn, "x0", f"expected (B, C, H, W), got shape {tuple(x0.shape)}")
    cutoff = _checks.finite_number(fn, "cutoff", cutoff, minimum=0.0)
    threshold = _checks.finite_number(fn, "threshold", threshold)
    height, width = x0.shape[-2:]
    x = x0.to(torch.float64 if x0.dtype == torch.float64 else torch.float32)
    fy = torch.fft.fftfreq(height, device=x.device, dtype=x.dtype).view(-1, 1)
    fx = torch.fft.fftfreq(width, device=x.device, dtype=x.dtype).view(1, -1)
    keep = (fy.square() + fx.square()).sqrt() > cutoff * 0.5
    high = torch.fft.ifft2(torch.fft.fft2(x) * keep).real
    energy = high.square().mean(dim=1, keepdim=True)
    mean = energy.mean(dim=(2, 3), keepdim=True)
    return (energy > threshold * mean).float()

