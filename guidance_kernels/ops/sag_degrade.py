"""sag_degrade: SAG's degraded latent (Hong et al. 2023) in ONE kernel — threshold of the key mass,
nearest upsampling of the map to the latent, 9-tap Gaussian blur (reflect padding), blend and
re-noise. The map is the key mass of :func:`~guidance_kernels.attention_key_mass`, or any mask of
:mod:`guidance_kernels.sag_masks` (the paper's masking ablation), or a user map.

The blur acts in the space the caller hands over (x0 for diffusers and ComfyUI). This is an
inference op: it has no autograd formula.
"""

from __future__ import annotations

import torch

from .. import _checks, _extension, _library, _spec, backends
from .._library import SagDegradeArgs
from .._spec import MAX_SAG_KERNEL_SIZE


def _cuda_reasons(req: backends.Request) -> list[str]:
    module = _extension.load()
    if module is not None and not hasattr(module, "sag_degrade"):
        return ["_C was built without sag_degrade (csrc/_C.cpp must call register_sag_degrade)"]
    return []


backends.register_op("sag_degrade", ("cuda", "triton", "torch"), cuda=_cuda_reasons)


def sag_map_grid(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
    """The attention map's grid for a latent of ``latent_hw`` and ``tokens`` keys, by ComfyUI's rule
    (exact for latents divisible by the UNet's downsampling, and for the padded sizes of the rest):
    ``ratio = 2**(ceil(sqrt(lh·lw/N)) − 1).bit_length()``, grid ``(ceil(lh/ratio), ceil(lw/ratio))``.
    diffusers instead records the mid block's output size (``map_size``): pass that as ``grid=``."""
    fn = "sag_map_grid"
    height, width = _checks.grid(fn, latent_hw, "latent_hw", names="(H, W)")
    return _spec.sag_map_grid(height, width, _checks.integer(fn, "tokens", tokens, minimum=1))


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
        if tokens == 0:
            _checks.fail(fn, "mask_or_mass", f"a key mass needs at least one key, got shape {tuple(t.shape)}")
        if grid is None:
            h, w = sag_map_grid((height, width), tokens)
            if h * w != tokens:
                _checks.fail(fn, "mask_or_mass", f"{tokens} keys match no map grid for the latent "
                                                 f"{height}x{width} (ComfyUI's rule gives {h}x{w} = {h * w}); "
                                                 "pass grid=(h, w), e.g. diffusers' map_size")
        else:
            h, w = _checks.grid(fn, grid, names="(h, w)")
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
    kernel_size = _checks.integer(fn, "kernel_size", kernel_size, minimum=1)
    if kernel_size % 2 == 0 or kernel_size > MAX_SAG_KERNEL_SIZE:
        _checks.fail(fn, "kernel_size", f"must be odd and <= {MAX_SAG_KERNEL_SIZE}, got {kernel_size}")
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
        other, renoise = _checks.tensor_like(fn, "x_t", x_t, x0, "x0"), "kdiff"
    elif eps is not None or alpha_cumprod is not None:
        if eps is None:
            _checks.fail(fn, "eps", "required with alpha_cumprod (DDPM re-noise)")
        if alpha_cumprod is None:
            _checks.fail(fn, "alpha_cumprod", "required with eps (DDPM re-noise)")
        other, renoise = _checks.tensor_like(fn, "eps", eps, x0, "x0"), "ddpm"
        alpha, alpha_tensor = _alpha(fn, alpha_cumprod, x0.shape[0], x0.device)
    chosen = backends.select(fn, x0, backend=backend)
    args = SagDegradeArgs(x0, mask_map, thresholded, float(threshold), kernel_size, float(sigma), renoise,
                          float(alpha), alpha_tensor, other, return_degraded)
    out, degraded = _library.call(fn, args, chosen)
    return (out, degraded) if return_degraded else out
