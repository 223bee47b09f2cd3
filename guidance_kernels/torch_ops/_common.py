"""Helpers every torch-backend module uses: the compute dtype, the separable blur and attention
as written (``softmax(scale·q kᵀ) v``, in query chunks)."""

from __future__ import annotations

from math import prod

import torch
import torch.nn.functional as F

from .._layout import blur_taps_like


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (fp16/bf16 compute in fp32)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the dispatch of a no-op conversion (most calls: fp32 inputs)."""
    return t if t.dtype is dtype else t.to(dtype)


def per_sample(number: float, tensor: torch.Tensor | None, ndim: int, dtype: torch.dtype):
    """A scale as the Python ``number`` or the (1,) / (B,) ``tensor`` shaped (B|1, 1, …, 1)."""
    if tensor is None:
        return number
    return as_dtype(tensor, dtype).reshape(-1, *([1] * (ndim - 1)))


def separable_blur(img: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Blur ``(B, C, H, W)`` (already in the compute dtype) with reflect padding: a ``1×k`` then a
    ``k×1`` depthwise convolution, each after its own padding — with reflect padding the two orders
    are the same linear map as the anchors' ``k×k`` kernel, since reflection acts on each axis
    independently. Taps of weight 0 are left out (``_spec.blur_taps``). ``kernel_size`` 0: the
    spatial mean, broadcast (a view); one tap: ``img`` itself (the single weight is exactly 1)."""
    if kernel_size == 0:
        return img.mean(dim=(-2, -1), keepdim=True).expand(img.shape)
    w = blur_taps_like(img, kernel_size, sigma, img.dtype) if kernel_size > 1 else None
    if w is None or w.numel() == 1:
        return img
    c, kernel_size = img.shape[1], w.numel()
    pad = kernel_size // 2
    x = F.pad(img, (pad, pad, 0, 0), mode="reflect")
    x = F.conv2d(x, w.view(1, 1, 1, kernel_size).expand(c, 1, 1, kernel_size), groups=c)
    x = F.pad(x, (0, 0, pad, pad), mode="reflect")
    return F.conv2d(x, w.view(1, 1, kernel_size, 1).expand(c, 1, kernel_size, 1), groups=c)


# Logits held at once by the chunked attention (fp32: 8 MiB). A chunk is at least one query row.
CHUNK_ELEMENTS = 1 << 21


def softmax_rows_(s: torch.Tensor) -> torch.Tensor:
    """The row softmax of ``s`` in place, as written: ``exp(s − max s) / Σ``. A row with a NaN
    logit, a +inf logit or only −inf logits is NaN (torch's fused attention kernels return finite
    rows for some of these; the definition does not)."""
    s.sub_(s.amax(dim=-1, keepdim=True)).exp_()
    return s.div_(s.sum(dim=-1, keepdim=True))


def query_chunks(q: torch.Tensor, keys: int):
    """Slices of q's query rows (dim −2) holding at most CHUNK_ELEMENTS logits against ``keys`` keys."""
    rows = max(1, CHUNK_ELEMENTS // max(1, prod(q.shape[:-2]) * keys))
    return [slice(lo, lo + rows) for lo in range(0, q.shape[-2], rows)]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(scale·q kᵀ) v`` for (…, N, d) q and (…, M, d) k, v, in the compute dtype, exactly as
    written (its NaN/inf rules included), never holding more than CHUNK_ELEMENTS logits."""
    dtype = compute_dtype(q)
    kt, vc = k.to(dtype).transpose(-1, -2), v.to(dtype)
    out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=dtype, device=q.device)
    for rows in query_chunks(q, k.shape[-2]):
        out[..., rows, :] = torch.matmul(softmax_rows_(torch.matmul(q[..., rows, :].to(dtype), kt).mul_(scale)), vc)
    return out
