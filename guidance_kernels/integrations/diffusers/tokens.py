"""Token grids and SEG's query blur over them.

SEG (Smoothed Energy Guidance) blurs the queries of the perturbed branch over the image-token grid.
Where the attention takes the query projection as it is (UNet self-attention, SD3 without qk-norm)
the blur runs inside ``guided_attention`` (σ = ∞ then costs one attention row per head). Where a
qk-norm or RoPE follows the projection (SD3.5, Flux, Wan, LTX, HunyuanVideo), SEG blurs the output
of ``to_q`` — what diffusers' ``SmoothedEnergyGuidanceHook`` on ``to_q`` means, without its swapped
finite / infinite branches and square-grid assumption — and the attention runs normally on the
normalised, rotated result (σ = ∞ is then not one attention row: the mean is taken before the norm).

Video tokens are row-major over (T, H, W). ``blur="frame"`` (default) blurs each frame over (H, W)
— a free view of the (b, T·H·W, C) tokens as (b·T, H·W, C) — with SEG's 2-D kernel
(:func:`guidance_kernels.gaussian_blur_2d`'s size rule, reflect padding; σ > 9999: the frame mean).
``blur="3d"`` then also blurs along T: the separable 3-D Gaussian, the T-axis kernel of the same σ
capped at the largest odd size ≤ T (T = 1: no temporal pass); σ > 9999: the mean over all T·H·W.
"""

from __future__ import annotations

import math

import torch

from guidance_kernels._spec import SEG_INF_SIGMA, blur_weights, seg_kernel_size

BLURS = ("frame", "3d")


def layer_grid(latent_hw: tuple[int, int] | None, tokens: int) -> tuple[int, int]:
    """(H, W) of a UNet layer's tokens from the latent size: the latent downsampled by a power of
    two (ceil division, as strided convolutions do) with H·W == tokens."""
    if latent_hw is None:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"cannot infer a grid for {tokens} tokens without the latent size")
        return side, side
    h, w = latent_hw
    for shift in range(0, 8):
        f = 1 << shift
        gh, gw = -(-h // f), -(-w // f)
        if gh * gw == tokens:
            return gh, gw
    raise ValueError(f"{tokens} image tokens do not match the latent {h}x{w} downsampled by a power of two")


def temporal_kernel_size(sigma: float, frames: int) -> int:
    """T-axis kernel of the 3-D blur: SEG's size rule capped at the largest odd size ≤ ``frames``."""
    return min(seg_kernel_size(sigma), frames - (frames % 2 - 1))


def _temporal_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``(b, T, …)`` along T with reflect padding, accumulated in float32."""
    frames = x.shape[1]
    size = temporal_kernel_size(sigma, frames)
    if size <= 1:
        return x
    weights = blur_weights(size, sigma)
    pad = size // 2
    # reflect padding (no edge repeat) as index arithmetic: frame -1 is frame 1, frame T is T - 2
    index = [abs(t) if t < frames else 2 * (frames - 1) - t for t in range(-pad, frames + pad)]
    padded = x[:, index].float()
    out = sum(w * padded[:, j:j + frames] for j, w in enumerate(weights))
    return out.to(x.dtype)


def blur_tokens(x: torch.Tensor, grid: tuple[int, int, int], sigma: float, blur: str, ops) -> torch.Tensor:
    """SEG's blur of image tokens ``(b, T·H·W, C)`` (row-major over ``grid`` = (T, H, W))."""
    t, h, w = grid
    b, n, c = x.shape
    if blur == "3d" and sigma > SEG_INF_SIGMA:
        return ops.blur_tokens(x, sigma, (t * h, w))  # the mean over every token
    frames = ops.blur_tokens(x.reshape(b * t, h * w, c), sigma, (h, w)).reshape(b, n, c)
    if blur == "3d" and t > 1:
        frames = _temporal_blur(frames.reshape(b, t, h * w, c), sigma).reshape(b, n, c)
    return frames


def blur_query_rows(q: torch.Tensor, rows: slice | None, image: slice, grid, sigma: float, blur: str, ops):
    """``q`` ``(B, N, C)`` (a ``to_q`` output) with the image tokens of ``rows`` blurred."""
    if rows is None:
        return q
    out = q.clone()
    out[rows, image] = blur_tokens(q[rows, image], grid, sigma, blur, ops)
    return out
