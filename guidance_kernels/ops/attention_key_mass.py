"""attention_key_mass: attention that also returns SAG's per-key attention mass — the input of
SAG's mask (Hong et al. 2023) — without the (B·heads, N, M) probability map.

A SAG step (diffusers ``StableDiffusionSAGPipeline``, ComfyUI ``SelfAttentionGuidance``)::

    out, mass = attention_key_mass(q, k, v, items=uncond_items)   # in the mid-block self-attention
    degraded = sag_degrade(x0_uncond, mass, grid=map_size, eps=eps_uncond, alpha_cumprod=a_t)
    eps_degraded = unet(degraded, ...)                              # one extra uncond forward
    noise_pred += sag_scale * (eps_uncond - eps_degraded)           # or combine with terms.sag()

This is an inference op: it has no autograd formula.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import _checks, _library, backends
from .._library import AttentionKeyMassArgs

LAYOUTS = ("bhnd", "bnd")
MAX_TRITON_HEAD_DIM = 256


def _triton_reasons(req: backends.Request) -> list[str]:
    head_dim = req.fact("head_dim")
    if head_dim is not None and head_dim > MAX_TRITON_HEAD_DIM:
        return [f"head dim {head_dim} > {MAX_TRITON_HEAD_DIM}"]
    return []


backends.register_op("attention_key_mass", ("triton", "torch"), triton=_triton_reasons)


def _shapes(fn: str, q, k, v, layout: str, heads) -> tuple[int, int, int, int, int]:
    """(heads, batch, N, M, d) of checked q, k, v in ``layout``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.float_tensor(fn, name, t)
    _checks.same_device_dtype(fn, "k", k, q, "q")
    _checks.same_device_dtype(fn, "v", v, q, "q")
    if layout not in LAYOUTS:
        _checks.fail(fn, "layout", f"must be one of {LAYOUTS}, got {layout!r}")
    if layout == "bhnd":
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4:
                _checks.fail(fn, name, f"layout 'bhnd' needs (B, heads, N, d), got shape {tuple(t.shape)}")
        if heads is not None and _checks.integer(fn, "heads", heads, minimum=1) != q.shape[1]:
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
        heads = _checks.integer(fn, "heads", heads, minimum=1)
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
    return heads, batch, n_q, n_k, head_dim


def _items(fn: str, items, batch: int) -> list[int] | None:
    if items is None:
        return None
    if isinstance(items, torch.Tensor) or not isinstance(items, Sequence):
        _checks.fail(fn, "items", f"expected a sequence of Python ints, got {type(items).__name__}", TypeError)
    items = [_checks.integer(fn, "items", i) for i in items]
    if not items:
        _checks.fail(fn, "items", "is empty (pass None for every item)")
    bad = [i for i in items if not 0 <= i < batch]
    if bad:
        _checks.fail(fn, "items", f"batch index {bad[0]} out of range for batch size {batch}")
    return items


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

    Non-finite data follow the definition on every backend: the softmax rows as written (a NaN
    logit, a +inf logit or a row of −inf logits makes the row NaN), ``out`` as in
    :func:`~guidance_kernels.guided_attention`, and a NaN row makes every mass column of its item NaN.
    """
    fn = "attention_key_mass"
    heads, batch, _, _, head_dim = _shapes(fn, q, k, v, layout, heads)
    scale = head_dim**-0.5 if scale is None else _checks.finite_number(fn, "scale", scale)
    items = _items(fn, items, batch)
    chosen = backends.select(fn, q, (("head_dim", head_dim),), backend)
    return _library.call(fn, AttentionKeyMassArgs(q, k, v, heads, layout, float(scale), items), chosen)
