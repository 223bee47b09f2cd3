"""Naive PyTorch references, written to mirror the anchor implementations operation by operation.

They compute in the input dtype, exactly as the anchors do (diffusers pipelines and guiders),
and are the oracle every backend is tested against. They favour clarity over speed and
memory: SAG's reference materialises the full attention map, SEG's reference runs a 2-D
convolution — which is the point of having kernels.

Shapes: a branch is ``(B, …)``; ``branches`` is the list of the K branches (``pred.chunk(K)``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._spec import (  # noqa: F401  (re-exported: the oracle's own rules are the shared ones)
    PYR_BLUR,
    SEG_INF_SIGMA,
    blur_taps,
    fdg_padded_size,
    gaussian_kernel_1d,
    image_to_tokens,
    sag_map_grid as sag_map_grid_comfy,
    seg_kernel_size,
    tokens_to_image,
)
from .terms import Guidance


def _per_sample(value, like: torch.Tensor):
    """A Python number stays a number; a () / (1,) / (B,) tensor becomes (B|1, 1, …, 1)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)
    return value


def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor, guidance_rescale) -> torch.Tensor:
    """diffusers' ``rescale_noise_cfg``: per-sample UNBIASED std over all non-batch dims."""
    dims = list(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    noise_pred_rescaled = noise_cfg * (std_text / std_cfg)
    guidance_rescale = _per_sample(guidance_rescale, noise_cfg)
    return guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_cfg


def guidance_combine(branches: Sequence[torch.Tensor], guidance: Guidance, *, rescale=0.0,
                     rescale_ref: int | None = None) -> torch.Tensor:
    """``D[base] + Σ g_t (D[pos_t] − D[neg_t])`` in the order diffusers' pipelines write it
    (``noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond) + …``), then
    ``rescale_noise_cfg`` against ``branches[rescale_ref]`` (default: the first term's positive)."""
    out = branches[guidance.base]
    for term in guidance.terms:
        out = out + _per_sample(term.scale, out) * (branches[term.pos] - branches[term.neg])
    if isinstance(rescale, torch.Tensor) or rescale > 0:
        ref = guidance.terms[0].pos if rescale_ref is None else rescale_ref
        out = rescale_noise_cfg(out, branches[ref], rescale)
    return out


def apg_combine(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, scale, *, eta: float = 1.0,
                norm_threshold: float = 0.0, momentum: float = 0.0,
                momentum_buffer: torch.Tensor | None = None, formulation: str = "paper",
                rescale=0.0) -> torch.Tensor:
    """APG (Sadat et al. 2024, Algorithm 1), mirroring diffusers' ``normalized_guidance``
    (projection in float64) and ``MomentumBuffer`` (``running = diff + momentum * running``,
    updated in place in ``momentum_buffer`` when one is given).

    ``formulation``: ``"paper"`` → ``cond + (w − 1)·update``; ``"diffusers"`` →
    ``uncond + w·update`` (diffusers' default); ``"diffusers_original"`` → ``cond + w·update``
    (diffusers' ``use_original_formulation=True``); ``"cfg"`` / ``"cfg_original"``: the CFG phase of
    diffusers' ``AdaptiveProjectedMixGuidance`` (``update_momentum_buffer`` then plain CFG on
    uncond / cond)."""
    diff = pred_cond - pred_uncond
    dim = [-i for i in range(1, len(diff.shape))]
    if momentum_buffer is not None:
        running = diff + momentum * momentum_buffer.to(diff.dtype)
        momentum_buffer.copy_(running)
        if formulation not in ("cfg", "cfg_original"):
            diff = running
    if formulation in ("cfg", "cfg_original"):
        pred = pred_uncond if formulation == "cfg" else pred_cond
        pred = pred + _per_sample(scale, pred_cond) * diff
        if isinstance(rescale, torch.Tensor) or rescale > 0:
            pred = rescale_noise_cfg(pred, pred_cond, rescale)
        return pred
    if norm_threshold > 0:
        ones = torch.ones_like(diff)
        diff_norm = diff.norm(p=2, dim=dim, keepdim=True)
        scale_factor = torch.minimum(ones, norm_threshold / diff_norm)
        diff = diff * scale_factor
    v0, v1 = diff.double(), pred_cond.double()
    v1 = torch.nn.functional.normalize(v1, dim=dim)
    v0_parallel = (v0 * v1).sum(dim=dim, keepdim=True) * v1
    v0_orthogonal = v0 - v0_parallel
    diff_parallel = v0_parallel.to(dtype=diff.dtype)
    diff_orthogonal = v0_orthogonal.to(dtype=diff.dtype)
    normalized_update = diff_orthogonal + eta * diff_parallel
    w = _per_sample(scale, pred_cond)
    if formulation == "paper":
        pred = pred_cond + (w - 1) * normalized_update
    elif formulation == "diffusers":
        pred = pred_uncond + w * normalized_update
    elif formulation == "diffusers_original":
        pred = pred_cond + w * normalized_update
    else:
        raise ValueError(f"apg_combine: formulation: unknown {formulation!r}")
    if isinstance(rescale, torch.Tensor) or rescale > 0:
        pred = rescale_noise_cfg(pred, pred_cond, rescale)
    return pred


def cfg_zero_star_combine(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, scale, *,
                          original_formulation: bool = False, zero_init: bool = False,
                          rescale=0.0) -> torch.Tensor:
    """diffusers' ``ClassifierFreeZeroStarGuidance.forward`` (alpha computed in fp32 and cast back
    to the input dtype, as ``cfg_zero_star_scale`` does; float64 inputs stay float64).

    Deliberate difference: with ``zero_init`` and a rescale, diffusers rescales the zeros and
    returns NaN (0·(std/0)); this returns the zeros."""
    if zero_init:
        return torch.zeros_like(pred_cond)
    # diffusers casts with .float(); promoting instead is identical for fp32/fp16/bf16 and keeps
    # float64 inputs exact (so the reference doubles as the float64 truth in tests).
    wide = torch.promote_types(pred_cond.dtype, torch.float32)
    cond = pred_cond.flatten(1).to(wide)
    uncond = pred_uncond.flatten(1).to(wide)
    dot_product = torch.sum(cond * uncond, dim=1, keepdim=True)
    squared_norm = torch.sum(uncond**2, dim=1, keepdim=True) + 1e-8
    alpha = (dot_product / squared_norm).to(pred_cond.dtype)
    alpha = alpha.view(-1, *(1,) * (pred_cond.dim() - 1))
    pred_uncond = pred_uncond * alpha
    shift = pred_cond - pred_uncond
    pred = pred_cond if original_formulation else pred_uncond
    pred = pred + _per_sample(scale, pred_cond) * shift
    if isinstance(rescale, torch.Tensor) or rescale > 0:
        pred = rescale_noise_cfg(pred, pred_cond, rescale)
    return pred


def tcfg_combine(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, scale, *, original_formulation: bool = False,
                 rescale=0.0) -> torch.Tensor:
    """diffusers' ``TangentialClassifierFreeGuidance``: ``normalized_guidance`` (an SVD per sample of
    the stacked ``[cond, uncond]`` in fp32 — promoted, so float64 inputs stay float64 — uncond
    projected on the first right-singular vector and cast back), then rescale against cond."""
    wide = torch.promote_types(pred_cond.dtype, torch.float32)
    preds = torch.stack([pred_cond, pred_uncond], dim=1).to(wide).flatten(2)
    _, _, vh = torch.linalg.svd(preds, full_matrices=False)
    vh_modified = vh.clone()
    vh_modified[:, 1] = 0
    uncond_flat = pred_uncond.reshape(pred_uncond.size(0), 1, -1).to(wide)
    x_vh = torch.matmul(uncond_flat, vh.transpose(-2, -1))
    pred_uncond = torch.matmul(x_vh, vh_modified).reshape(pred_uncond.shape).to(pred_cond.dtype)
    pred = pred_cond if original_formulation else pred_uncond
    pred = pred + _per_sample(scale, pred_cond) * (pred_cond - pred_uncond)
    if isinstance(rescale, torch.Tensor) or rescale > 0:
        pred = rescale_noise_cfg(pred, pred_cond, rescale)
    return pred


def mag_combine(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, scale, *, alpha: float = 8.0,
                original_formulation: bool = False, rescale=0.0) -> torch.Tensor:
    """diffusers' ``mambo_guidance`` (MagnitudeAwareGuidance) with its norms read as the Frobenius
    norm over all non-batch dims (its ``torch.norm(x, dim=[1, 2, 3])`` raises on 4-D latents),
    then rescale against cond."""
    dim = list(range(1, pred_cond.dim()))
    diff = pred_cond - pred_uncond
    ratio = torch.linalg.vector_norm(diff, dim=dim, keepdim=True) / torch.linalg.vector_norm(
        pred_uncond, dim=dim, keepdim=True)
    s = _per_sample(scale, pred_cond)
    if original_formulation:
        scale_final = s * torch.exp(-alpha * ratio)
    else:
        scale_final = 1.0 + (s - 1.0) * torch.exp(-alpha * ratio)
    pred = pred_cond if original_formulation else pred_uncond
    pred = pred + scale_final * diff
    if isinstance(rescale, torch.Tensor) or rescale > 0:
        pred = rescale_noise_cfg(pred, pred_cond, rescale)
    return pred


def cfg_norm(denoised: torch.Tensor, cond: torch.Tensor, strength) -> torch.Tensor:
    """ComfyUI's CFGNorm on a combine result: channel norms (dim 1) per position,
    ``denoised · clamp(‖cond‖ / (‖denoised‖ + 1e-8), 0, 1) · strength``."""
    norm_cond = torch.linalg.vector_norm(cond, dim=1, keepdim=True)
    norm_out = torch.linalg.vector_norm(denoised, dim=1, keepdim=True)
    scale = (norm_cond / (norm_out + 1e-8)).clamp(min=0.0, max=1.0)
    return denoised * scale * _per_sample(strength, denoised)


def mahiro(denoised: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """ComfyUI's Mahiro on a combine result, with the similarity averaged per sample (ComfyUI
    averages over the whole batch: the same for a batch of one)."""
    s = _per_sample(scale, denoised)
    leap = cond * s
    u_leap = uncond * s
    merge = (leap + denoised) / 2
    normu = torch.sqrt(u_leap.abs()) * u_leap.sign()
    normm = torch.sqrt(merge.abs()) * merge.sign()
    sim = torch.nn.functional.cosine_similarity(normu, normm, dim=1)
    sim = sim.reshape(sim.shape[0], -1).mean(dim=1).reshape(-1, *([1] * (denoised.dim() - 1)))
    simsc = 2 * (sim + 1)
    return (simsc * denoised + (4 - simsc) * leap) / 4


# --------------------------------------------------------------------------- FDG (kornia's Laplacian pyramid)


def _pyr_blur(img: torch.Tensor) -> torch.Tensor:
    """kornia's ``filter2d`` with its pyramid kernel: reflect pad 2, one depthwise 5×5 convolution."""
    kernel = torch.tensor(PYR_BLUR, dtype=img.dtype, device=img.device)
    kernel = torch.outer(kernel, kernel)[None, None].expand(img.shape[1], 1, 5, 5)
    return torch.nn.functional.conv2d(torch.nn.functional.pad(img, [2, 2, 2, 2], mode="reflect"), kernel,
                                      groups=img.shape[1])


def pyrdown(img: torch.Tensor) -> torch.Tensor:
    """kornia's ``pyrdown``: blur, then bilinear resize to ``floor(side / 2)`` (align_corners=False)."""
    h, w = img.shape[-2:]
    return torch.nn.functional.interpolate(_pyr_blur(img), size=(h // 2, w // 2), mode="bilinear",
                                           align_corners=False)


def pyrup(img: torch.Tensor) -> torch.Tensor:
    """kornia's ``pyrup``: bilinear resize to twice the size (align_corners=False), then blur."""
    h, w = img.shape[-2:]
    return _pyr_blur(torch.nn.functional.interpolate(img, size=(2 * h, 2 * w), mode="bilinear", align_corners=False))


def laplacian_pyramid(img: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """kornia's ``build_laplacian_pyramid`` on ``(B, C, H, W)``, its power-of-two reflect padding included."""
    h, w = img.shape[-2:]
    ph, pw = fdg_padded_size(h, w, levels)
    if (ph, pw) != (h, w):
        img = torch.nn.functional.pad(img, (0, pw - w, 0, ph - h), mode="reflect")
    gaussian = [img]
    for _ in range(levels - 1):
        gaussian.append(pyrdown(gaussian[-1]))
    return [gaussian[i] - pyrup(gaussian[i + 1]) for i in range(levels - 1)] + [gaussian[-1]]


def _project(v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' FDG ``project`` with ``upcast_to_double=True``: parallel and orthogonal parts of v0."""
    dims = list(range(1, v0.dim()))
    dtype = v0.dtype
    v0, v1 = v0.double(), v1.double()
    v1 = torch.nn.functional.normalize(v1, dim=dims)
    parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
    return parallel.to(dtype), (v0 - parallel).to(dtype)


def fdg_combine(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, scales, *, parallel_weights=None, rescale=0.0,
                rescale_space: str = "data", original_formulation: bool = False) -> torch.Tensor:
    """diffusers' ``FrequencyDecoupledGuidance.forward`` (every level enabled) on ``(B, …, H, W)``
    (the dims between batch and (H, W) flattened into kornia's channel dim), in the input dtype,
    with two decided differences: the result is cropped to the input's (H, W) (the guider returns
    kornia's padded size) and data-space rescale uses that crop. A level whose scale is exactly 1
    (0 with the original formulation) keeps the cond level, as the guider's ``isclose`` test does;
    a tensor scale decides per sample."""
    levels = len(scales)
    shape = pred_cond.shape
    h, w = shape[-2:]
    c4 = pred_cond.reshape(shape[0], -1, h, w)
    u4 = pred_uncond.reshape(shape[0], -1, h, w)
    weights = [1.0] * levels if parallel_weights is None else (
        list(parallel_weights) if isinstance(parallel_weights, (list, tuple)) else [parallel_weights] * levels)
    phis = list(rescale) if isinstance(rescale, (list, tuple)) else [rescale] * levels
    cond_pyr, uncond_pyr = laplacian_pyramid(c4, levels), laplacian_pyramid(u4, levels)
    guided = []
    for level, (scale, weight, phi) in enumerate(zip(scales, weights, phis)):
        cond_freq, uncond_freq = cond_pyr[level], uncond_pyr[level]
        shift = cond_freq - uncond_freq
        if weight != 1.0:
            parallel, orthogonal = _project(shift, cond_freq)
            shift = weight * parallel + orthogonal
        pred = cond_freq if original_formulation else uncond_freq
        s = _per_sample(scale, pred)
        pred = pred + s * shift
        if rescale_space == "freq" and (isinstance(phi, torch.Tensor) or phi > 0):
            pred = rescale_noise_cfg(pred, cond_freq, phi)
        off = 0.0 if original_formulation else 1.0
        if isinstance(s, torch.Tensor):
            guided.append(torch.where(s == off, cond_freq, pred))
        else:
            guided.append(cond_freq if s == off else pred)
    img = guided[-1]
    for i in range(levels - 2, -1, -1):
        img = pyrup(img) + guided[i]
    out = img[..., :h, :w].reshape(shape)
    phi = phis[0]
    if rescale_space == "data" and (isinstance(phi, torch.Tensor) or phi > 0):
        out = rescale_noise_cfg(out, pred_cond, phi)
    return out


# --------------------------------------------------------------------------- Gaussian blur (SEG §5, SAG §6)


def gaussian_blur_2d(img: torch.Tensor, kernel_size: int, sigma: float, *, cap_to_grid: bool = True) -> torch.Tensor:
    """Depthwise Gaussian blur of ``(B, C, H, W)`` with reflect padding, as SEG-SDXL writes it: a
    k×k kernel ``outer(w, w)`` in the image dtype and one grouped ``conv2d``.

    ``cap_to_grid`` applies SEG-SDXL's cap ``k ≤ W − (W % 2 − 1)`` (its code uses the last dim);
    diffusers' SAG pipeline has the same function without the cap (``cap_to_grid=False``).

    Deliberate differences from the anchors, both where their float32 weights degenerate: taps
    whose weight is exactly 0 are dropped (``_spec.blur_taps``; the anchors' conv turns ``0·inf``
    into NaN outside the blur's footprint), and a σ that rounds to 0 in float32 is the identity
    (the anchors' weights are NaN there)."""
    if cap_to_grid:
        width = img.shape[-1]
        kernel_size = min(kernel_size, width - (width % 2 - 1))
    taps = blur_taps(kernel_size, sigma)  # = gaussian_kernel_1d(kernel_size, sigma) wherever no weight is 0
    kernel_size = len(taps)
    x_kernel = torch.tensor(taps, dtype=torch.float32).to(device=img.device, dtype=img.dtype)
    kernel2d = torch.mm(x_kernel[:, None], x_kernel[None, :])
    kernel2d = kernel2d.expand(img.shape[-3], 1, kernel2d.shape[0], kernel2d.shape[1])
    padding = [kernel_size // 2] * 4
    img = torch.nn.functional.pad(img, padding, mode="reflect")
    if img.dtype == torch.float64:
        # The same k×k kernel on every channel as one single-channel convolution over B·C images:
        # bit-identical, and ~1000× faster than torch's grouped float64 conv2d on the CPU (which the
        # float64 truths of the tests use).
        out = torch.nn.functional.conv2d(img.reshape(-1, 1, *img.shape[-2:]), kernel2d[:1])
        return out.view(*img.shape[:-2], *out.shape[-2:])
    return torch.nn.functional.conv2d(img, kernel2d, groups=img.shape[-3])


# --------------------------------------------------------------------------- SAG (§6)


def attention_probs(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """diffusers' ``Attention.get_attention_scores`` without a mask: ``softmax(scale·q kᵀ)`` on
    ``(B·heads, N, d)`` × ``(B·heads, M, d)`` → ``(B·heads, N, M)``, all in the input dtype."""
    baddbmm_input = torch.empty(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype, device=query.device)
    scores = torch.baddbmm(baddbmm_input, query, key.transpose(-1, -2), beta=0, alpha=scale)
    return scores.softmax(dim=-1)


def attention_key_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str = "bhnd",
                       heads: int | None = None, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and per-key mass the way diffusers' SAG pipeline gets them: the explicit
    ``(B·heads, N, M)`` probability map of ``CrossAttnStoreProcessor``, ``bmm`` with V, and
    ``sag_masking``'s ``probs.reshape(B, heads, N, M).mean(1).sum(1)`` → ``(B, M)``.

    ``layout="bhnd"``: q ``(B, heads, N, d)``, k/v ``(B, heads, M, d)``; ``"bnd"``: q ``(B, N, heads·d)``,
    k/v ``(B, M, heads·d)`` (diffusers' ``head_to_batch_dim`` order). Everything in the input dtype."""
    if layout == "bnd":
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    b, h, n, d = q.shape
    m = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    probs = attention_probs(q.reshape(b * h, n, d), k.reshape(b * h, m, d), scale)
    out = torch.bmm(probs, v.reshape(b * h, m, d)).reshape(b, h, n, d)
    mass = probs.reshape(b, h, n, m).mean(1, keepdim=False).sum(1, keepdim=False)
    if layout == "bnd":
        out = out.transpose(1, 2).flatten(2)
    return out, mass


def _add_noise(original: torch.Tensor, noise: torch.Tensor, alpha_cumprod) -> torch.Tensor:
    """diffusers' ``DDIMScheduler.add_noise`` given ᾱ_t (a number or a () / (1,) / (B,) tensor):
    ᾱ cast to the sample dtype, then ``ᾱ**0.5 · x + (1 − ᾱ)**0.5 · noise``."""
    if not isinstance(alpha_cumprod, torch.Tensor):
        alpha_cumprod = torch.tensor([alpha_cumprod], dtype=torch.float32)
    alphas = alpha_cumprod.to(device=original.device, dtype=original.dtype).reshape(-1)
    sqrt_alpha_prod = (alphas**0.5).reshape(-1, *([1] * (original.dim() - 1)))
    sqrt_one_minus_alpha_prod = ((1 - alphas) ** 0.5).reshape(-1, *([1] * (original.dim() - 1)))
    return sqrt_alpha_prod * original + sqrt_one_minus_alpha_prod * noise


def sag_masking(original_latents: torch.Tensor, attn_map: torch.Tensor, map_size, heads: int, alpha_cumprod,
                eps: torch.Tensor, *, sigma: float = 1.0, kernel_size: int = 9) -> torch.Tensor:
    """diffusers' ``StableDiffusionSAGPipeline.sag_masking`` line by line (σ and the kernel size made
    arguments; ᾱ_t given instead of the scheduler and timestep)."""
    bh, hw1, hw2 = attn_map.shape
    b, latent_channel, latent_h, latent_w = original_latents.shape
    attn_map = attn_map.reshape(b, heads, hw1, hw2)
    attn_mask = attn_map.mean(1, keepdim=False).sum(1, keepdim=False) > 1.0
    attn_mask = (attn_mask.reshape(b, map_size[0], map_size[1]).unsqueeze(1).repeat(1, latent_channel, 1, 1)
                 .type(attn_map.dtype))
    attn_mask = torch.nn.functional.interpolate(attn_mask, (latent_h, latent_w))
    degraded_latents = gaussian_blur_2d(original_latents, kernel_size, sigma, cap_to_grid=False)
    degraded_latents = degraded_latents * attn_mask + original_latents * (1 - attn_mask)
    return _add_noise(degraded_latents, eps, alpha_cumprod)


def sag_blur_map_comfy(x0: torch.Tensor, attn: torch.Tensor, x: torch.Tensor, *, sigma: float = 2.0,
                       threshold: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's ``create_blur_map`` on the uncond attention map ``(B·heads, N, N)``, followed by
    its k-diffusion re-noise ``degraded + x − x0``. Returns ``(degraded_noised, degraded)``."""
    _, hw1, hw2 = attn.shape
    b, _, lh, lw = x0.shape
    attn = attn.reshape(b, -1, hw1, hw2)
    mask = attn.mean(1, keepdim=False).sum(1, keepdim=False) > threshold
    mid_shape = list(sag_map_grid_comfy(lh, lw, hw1))
    mask = mask.reshape(b, *mid_shape).unsqueeze(1).type(attn.dtype)
    mask = torch.nn.functional.interpolate(mask, (lh, lw))
    blurred = gaussian_blur_2d(x0, 9, sigma, cap_to_grid=False)
    blurred = blurred * mask + x0 * (1 - mask)
    return blurred + x - x0, blurred


def sag_degrade(x0: torch.Tensor, mask_or_mass: torch.Tensor, *, grid=None, threshold: float = 1.0,
                kernel_size: int = 9, sigma: float = 1.0, eps: torch.Tensor | None = None, alpha_cumprod=None,
                x_t: torch.Tensor | None = None, return_degraded: bool = False):
    """The SAG degrade step composed from the anchors' operations, in the dtype of ``x0``; the
    oracle of every ``sag_degrade`` backend, with the same call signature. Returns the re-noised
    latent, or ``(re-noised, degraded)`` with ``return_degraded``.

    ``mask_or_mass``: a key mass ``(B|1, N)`` (thresholded ``> threshold`` and laid on ``grid``, by
    default ComfyUI's rule) or a ready mask ``(B|1, h, w)`` / ``(B|1, 1, h, w)`` of blend weights.
    Then nearest upsampling to the latent (``F.interpolate``), ``gaussian_blur_2d`` (no cap), the
    blend ``blurred·mask + x0·(1 − mask)`` and the re-noise: ``add_noise`` with ``eps`` and ᾱ, or
    ComfyUI's ``degraded + x_t − x0``, or none."""
    b, c, lh, lw = x0.shape
    if mask_or_mass.dim() == 2:
        h, w = grid if grid is not None else sag_map_grid_comfy(lh, lw, mask_or_mass.shape[1])
        mask = (mask_or_mass > threshold).reshape(-1, 1, h, w).to(x0.dtype)
    else:
        mask = mask_or_mass.reshape(mask_or_mass.shape[0], 1, *mask_or_mass.shape[-2:]).to(x0.dtype)
    mask = torch.nn.functional.interpolate(mask, (lh, lw))
    blurred = gaussian_blur_2d(x0, kernel_size, sigma, cap_to_grid=False)
    degraded = blurred * mask + x0 * (1 - mask)
    if alpha_cumprod is not None:
        noised = _add_noise(degraded, eps, alpha_cumprod)
    elif x_t is not None:
        noised = degraded + x_t - x0
    else:
        noised = degraded
    return (noised, degraded) if return_degraded else noised


# --------------------------------------------------------------------------- guided attention (PAG §4, SEG §5)


def seg_blur(img: torch.Tensor, sigma: float, kernel_size: int | None = None, *,
             cap_to_grid: bool = True) -> torch.Tensor:
    """SEG-SDXL's query perturbation of ``(B, C, H, W)``: for ``σ > SEG_INF_SIGMA`` every position
    becomes the spatial mean of its channel (``query_ptb[:] = query_ptb.mean(dim=(-2, -1),
    keepdim=True)``, in the tensor dtype); otherwise :func:`gaussian_blur_2d` with SEG's kernel size
    ``ceil(6σ) + 1 − ceil(6σ) % 2`` (or ``kernel_size``), capped by the last dim as SEG-SDXL does."""
    if sigma > SEG_INF_SIGMA:
        out = img.clone()
        out[:] = img.mean(dim=(-2, -1), keepdim=True)
        return out
    k = seg_kernel_size(sigma) if kernel_size is None else kernel_size
    return gaussian_blur_2d(img, k, sigma, cap_to_grid=cap_to_grid)


def blur_tokens(x: torch.Tensor, sigma: float, grid: tuple[int, int], layout: str, kernel_size: int | None = None,
                *, cap_to_grid: bool = True) -> torch.Tensor:
    """:func:`seg_blur` of image tokens in any of the layouts of :func:`tokens_to_image`."""
    img = tokens_to_image(x, grid, layout)
    return image_to_tokens(seg_blur(img, sigma, kernel_size, cap_to_grid=cap_to_grid), x, layout)


def joint_identity_mask(image_tokens: int, text_tokens: int, text_position: str, dtype, device) -> torch.Tensor:
    """diffusers ``PAGJointAttnProcessor2_0``'s additive ``(S, S)`` mask: 0 everywhere except the
    image↔image block, which is −inf off its diagonal (an image query sees its own key and every
    text key; text queries see everything). diffusers puts the image tokens first; with
    ``text_position="before"`` the same block is moved behind the text tokens."""
    seq = image_tokens + text_tokens
    start = text_tokens if text_position == "before" else 0
    full_mask = torch.zeros((seq, seq), device=device, dtype=dtype)
    block = full_mask[start:start + image_tokens, start:start + image_tokens]
    block.fill_(float("-inf"))
    block.fill_diagonal_(0)
    return full_mask


def guided_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, modes, sigma=None, grid=None, *,
                     text_tokens: int = 0, text_position: str = "after", scale: float | None = None,
                     kernel_size=None) -> torch.Tensor:
    """Attention of ``(B, heads, N, d)`` tensors where batch item ``i`` is perturbed by ``modes[i]``,
    each item computed the way its anchor computes that branch, in the input dtype:

    * ``"none"``: ``F.scaled_dot_product_attention`` (cross-attention allowed);
    * ``"identity"`` (PAG): without text tokens the output is V (diffusers' PAG UNet processors
      skip the attention); with text tokens it is SDPA with :func:`joint_identity_mask`
      (``PAGJointAttnProcessor2_0``);
    * ``"blur"`` (SEG, SEG-SDXL ``SEGCFGSelfAttnProcessor``): the image queries, viewed as
      ``(1, heads·d, H, W)``, go through :func:`seg_blur` (σ > 9999: the grid mean), text queries
      are untouched, then SDPA.

    ``sigma`` (and ``kernel_size``, default SEG's rule) is a number or one value per item; ``grid`` the
    ``(H, W)`` of the image tokens, which are the first ``H·W`` tokens (``text_position="after"``) or
    the last (``"before"``)."""
    sigmas = list(sigma) if isinstance(sigma, (list, tuple)) else [sigma] * q.shape[0]
    sizes = list(kernel_size) if isinstance(kernel_size, (list, tuple)) else [kernel_size] * q.shape[0]
    n = q.shape[2]
    start = text_tokens if text_position == "before" else 0
    image = slice(start, start + n - text_tokens)
    out = []
    for i, mode in enumerate(modes):
        qi, ki, vi = q[i:i + 1], k[i:i + 1], v[i:i + 1]
        if mode == "identity":
            if text_tokens == 0:
                out.append(vi)
                continue
            mask = joint_identity_mask(n - text_tokens, text_tokens, text_position, q.dtype, q.device)
            out.append(torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask[None, None],
                                                                        scale=scale))
            continue
        if mode == "blur":
            blurred = blur_tokens(qi[:, :, image], sigmas[i], grid, "bhnd", sizes[i])
            qi = qi.clone()  # (blurred from the untouched q: the reference stays differentiable)
            qi[:, :, image] = blurred
        elif mode != "none":
            raise ValueError(f"guided_attention: modes[{i}]: unknown mode {mode!r}")
        out.append(torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, scale=scale))
    return torch.cat(out)
