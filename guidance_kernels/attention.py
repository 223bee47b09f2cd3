"""Perturbed attention for guidance: Gaussian-blurred queries (SEG) and identity attention (PAG).

:func:`gaussian_blur_2d` is the depthwise Gaussian blur of SEG and SAG (reflect padding, SEG's
kernel-size rule, σ above ``SEG_INF_SIGMA`` = the exact spatial mean), computed separably.

:func:`guided_attention` is scaled-dot-product attention where every batch item carries its own
perturbation, so a diffusers / ComfyUI batch ``[uncond, cond, perturbed…]`` is one call with no
chunk or cat:

================  =====================================================================================
mode              output rows of that item
================  =====================================================================================
``"none"``        ``softmax(scale·q kᵀ) v`` (k, v may have another length: cross-attention)
``"identity"``    PAG: ``v`` itself (bit-exact copy). With text tokens (joint attention, SD3/Flux):
                  image query i attends to key i and every text key, text queries attend normally
                  (diffusers ``PAGJointAttnProcessor2_0``, without its S×S mask)
``"blur"``        SEG: image queries blurred over the ``(H, W)`` grid (= the logits blurred along
                  the query axis), text queries untouched; σ > 9999: every image query is the grid
                  mean, computed as ONE attention row per (item, head) and broadcast: O(N·d)
================  =====================================================================================

These are inference ops (no autograd formula). Modes, σ, grid and text tokens are static Python
values: under ``torch.compile`` a new configuration compiles once.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

from . import _checks, _library, backends
from .reference import SEG_INF_SIGMA, seg_kernel_size

MODES = ("none", "identity", "blur")
BLUR_LAYOUTS = ("nchw", "bnc", "bhnd")
ATTENTION_LAYOUTS = ("bhnd", "bnd")
TEXT_POSITIONS = ("after", "before")
MAX_TRITON_HEAD_DIM = 256
MAX_TRITON_FP32_HEAD_DIM = 128


def _triton_attention_reasons(req: backends.Request) -> list[str]:
    """Why the triton backend cannot serve a call (facts: the static head dim)."""
    d = req.fact("head_dim")
    if d is None:
        return []
    if d > MAX_TRITON_HEAD_DIM:
        return [f"head dim {d} > {MAX_TRITON_HEAD_DIM} (the kernel keeps a (BLOCK_M, head dim) tile in registers)"]
    if req.dtype == torch.float32 and d > MAX_TRITON_FP32_HEAD_DIM and req.device_type == "cuda":
        return [f"float32 with head dim {d} > {MAX_TRITON_FP32_HEAD_DIM} (the IEEE fp32 dot of a 256-wide "
                "tile spills registers; half precision is served)"]
    return []


backends.register_op("gaussian_blur_2d", ("triton", "torch"))
backends.register_op("guided_attention", ("triton", "torch"), triton=_triton_attention_reasons)


# --------------------------------------------------------------------------- argument checks


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


def _int(fn: str, arg: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        _checks.fail(fn, arg, f"expected an int, got {type(value).__name__}", TypeError)
    value = int(value)
    if value < minimum:
        _checks.fail(fn, arg, f"must be >= {minimum}, got {value}")
    return value


def _sigma(fn: str, arg: str, value) -> float:
    """σ > 0, not NaN; inf (or anything above SEG_INF_SIGMA) means the mean. Traced floats are
    specialised (``float()``): σ is a static configuration value."""
    if isinstance(value, torch.Tensor):
        _checks.fail(fn, arg, "expected a Python number (σ selects the kernel; it is not a per-step tensor)",
                     TypeError)
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        _checks.fail(fn, arg, f"expected a real number, got {type(value).__name__}", TypeError)
    value = float(value)
    if not value > 0:  # also catches NaN (a plain comparison: traceable on a traced float)
        _checks.fail(fn, arg, f"must be > 0 (and not NaN), got {value}")
    return value


def _grid(fn: str, grid) -> tuple[int, int]:
    if not isinstance(grid, Sequence) or isinstance(grid, (str, bytes)) or len(grid) != 2:
        _checks.fail(fn, "grid", f"expected (H, W), got {grid!r}", TypeError)
    return _int(fn, "grid[0]", grid[0], 1), _int(fn, "grid[1]", grid[1], 1)


# --------------------------------------------------------------------------- gaussian_blur_2d


def gaussian_blur_2d(x: torch.Tensor, sigma: float, *, kernel_size: int | None = None, grid=None,
                     layout: str = "nchw", heads: int | None = None, backend: str | None = None) -> torch.Tensor:
    """Depthwise Gaussian blur with reflect padding, computed separably (two 1-D passes fused in one
    kernel), never as a k×k convolution.

    Args:
        x: ``(B, C, H, W)`` for ``layout="nchw"``; image tokens ``(B, N, C)`` (``"bnc"``) or
            ``(B, heads, N, d)`` (``"bhnd"``, channels ``heads·d``) with ``N = H·W`` row-major.
            float32/float16/bfloat16 (float64 on the torch backend); any strides.
        sigma: σ > 0. σ > 9999 (``SEG_INF_SIGMA``, inf included): every position becomes the exact
            spatial mean of its channel (SEG's infinite blur; ``kernel_size`` is then ignored).
        kernel_size: odd size; its padding ``kernel_size // 2`` must be below H and W. Default:
            SEG's rule ``ceil(6σ) + 1 − ceil(6σ) % 2`` capped by the grid (:func:`blur_kernel_size`).
        grid: ``(H, W)``; required for the token layouts (optional check for ``"nchw"``).
        heads: optional check of the head count of ``"bhnd"`` (``x.shape[1]``) or of ``C % heads``.
        backend: ``"triton"``, ``"torch"`` or None/``"auto"`` (see :mod:`.backends`).

    Weights are ``reference.gaussian_kernel_1d`` (float32) for both axes; accumulation is float32.
    Returns a new tensor of ``x``'s shape and dtype (``x``'s layout when dense, else contiguous).
    """
    fn = "gaussian_blur_2d"
    _checks.float_tensor(fn, "x", x)
    if layout not in BLUR_LAYOUTS:
        _checks.fail(fn, "layout", f"must be one of {BLUR_LAYOUTS}, got {layout!r}")
    sigma = _sigma(fn, "sigma", sigma)
    ndim = {"nchw": 4, "bnc": 3, "bhnd": 4}[layout]
    if x.dim() != ndim:
        _checks.fail(fn, "x", f"layout {layout!r} expects {ndim} dims, got shape {tuple(x.shape)}")
    if layout == "nchw":
        shape_grid = (x.shape[2], x.shape[3])
        h, w = _grid(fn, grid) if grid is not None else (int(x.shape[2]), int(x.shape[3]))
        if (h, w) != tuple(shape_grid):
            _checks.fail(fn, "grid", f"{(h, w)} differs from x's spatial dims {tuple(shape_grid)}")
    else:
        if grid is None:
            _checks.fail(fn, "grid", f"required for layout {layout!r} (the (H, W) of the image tokens)")
        h, w = _grid(fn, grid)
        n = x.shape[1] if layout == "bnc" else x.shape[2]
        if n != h * w:
            _checks.fail(fn, "x", f"has {n} tokens but grid {(h, w)} has H*W = {h * w}")
    if heads is not None:
        heads = _int(fn, "heads", heads, 1)
        if layout == "bhnd" and x.shape[1] != heads:
            _checks.fail(fn, "heads", f"is {heads} but x has {x.shape[1]} heads (dim 1)")
        if layout != "bhnd" and x.shape[1 if layout == "nchw" else 2] % heads != 0:
            _checks.fail(fn, "heads", f"{heads} does not divide the channel count")
    if sigma > SEG_INF_SIGMA:
        size = 0
        if kernel_size is not None:
            _int(fn, "kernel_size", kernel_size, 1)
    elif kernel_size is None:
        size = blur_kernel_size(sigma, (h, w))
    else:
        size = _int(fn, "kernel_size", kernel_size, 1)
        if size % 2 == 0:
            _checks.fail(fn, "kernel_size", f"must be odd (an even size shifts the image), got {size}")
        if size // 2 >= min(h, w):
            _checks.fail(fn, "kernel_size", f"{size} needs reflect padding {size // 2}, which must be below "
                                            f"both grid dims {(h, w)}: the grid is too small for this kernel")
    chosen = backends.select(fn, x, backend=backend)
    return _library.call(_library.gaussian_blur_2d, x, h, w, layout, size, sigma if size else 0.0, chosen)


# --------------------------------------------------------------------------- guided_attention


def _modes(fn: str, modes, batch: int) -> list[int]:
    if modes is None:
        return [_library.MODE_NONE] * batch
    if isinstance(modes, torch.Tensor):
        if modes.dim() != 1 or modes.dtype.is_floating_point or modes.dtype.is_complex:
            _checks.fail(fn, "modes", "a tensor of modes must be 1-D with integer codes 0/1/2", TypeError)
        modes = modes.tolist()  # host values: the modes select the kernel's work
    if isinstance(modes, (str, bytes)) or not isinstance(modes, Sequence):
        _checks.fail(fn, "modes", f"expected a sequence with one mode per batch item, got {type(modes).__name__}",
                     TypeError)
    if len(modes) != batch:
        _checks.fail(fn, "modes", f"has {len(modes)} entries but the batch has {batch} items")
    codes = []
    for i, mode in enumerate(modes):
        if isinstance(mode, str) and mode in MODES:
            codes.append(MODES.index(mode))
        elif isinstance(mode, numbers.Integral) and not isinstance(mode, bool) and 0 <= int(mode) < len(MODES):
            codes.append(int(mode))
        else:
            _checks.fail(fn, f"modes[{i}]", f"unknown mode {mode!r} (choose from {MODES} or 0/1/2)")
    return codes


def _per_item_sigma(fn: str, sigma, codes: list[int]) -> list[float | None]:
    per_item = isinstance(sigma, Sequence) and not isinstance(sigma, (str, bytes))
    if per_item:
        values = list(sigma)
        if len(values) != len(codes):
            _checks.fail(fn, "sigma", f"has {len(values)} entries but the batch has {len(codes)} items")
    else:
        values = [sigma] * len(codes)
    out: list[float | None] = [None] * len(codes)
    for i, code in enumerate(codes):
        if code != _library.MODE_BLUR:
            continue
        arg = f"sigma[{i}]" if per_item else "sigma"
        if values[i] is None:
            _checks.fail(fn, arg, f"required for blur item {i} (σ > 0; > 9999 means infinite)")
        out[i] = _sigma(fn, arg, values[i])
    return out


def _attention_views(fn: str, name: str, t: torch.Tensor, layout: str, heads: int | None) -> torch.Tensor:
    """``t`` as a (B, heads, N, d) view (no copy)."""
    if layout == "bhnd":
        if t.dim() != 4:
            _checks.fail(fn, name, f"layout 'bhnd' expects (B, heads, N, d), got shape {tuple(t.shape)}")
        return t
    if t.dim() != 3:
        _checks.fail(fn, name, f"layout 'bnd' expects (B, N, heads*d), got shape {tuple(t.shape)}")
    if t.shape[2] % heads != 0:
        _checks.fail(fn, name, f"last dim {t.shape[2]} is not divisible by heads={heads}")
    return t.unflatten(2, (heads, t.shape[2] // heads)).transpose(1, 2)


def guided_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, modes=None, sigma=None, grid=None,
                     layout: str = "bhnd", heads: int | None = None, text_tokens: int = 0,
                     text_position: str = "after", scale: float | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """Scaled-dot-product attention with a perturbation per batch item (PAG identity, SEG blur).

    Args:
        q: ``(B, heads, Nq, d)`` (``layout="bhnd"``, as diffusers processors hold it) or
            ``(B, Nq, heads·d)`` (``"bnd"``, as ComfyUI attention patches receive it; needs
            ``heads``). float32/float16/bfloat16 (float64 on the torch backend), any strides.
        k, v: the same layout with Nk tokens; Nk may differ from Nq (cross-attention) only when
            every mode is ``"none"``. Same batch, heads and head dim as q; same device and dtype.
        modes: one per batch item: ``"none"``, ``"identity"``, ``"blur"`` (or 0/1/2; a 1-D CPU
            integer tensor is read on the host). None: all ``"none"``.
        sigma: σ of the blur items: a number or one value per item (ignored for other items);
            σ > 0, not NaN; σ > 9999 (inf included) means infinite: every image query := the mean.
            The blur uses SEG's kernel ``ceil(6σ)+1−ceil(6σ)%2`` capped by the grid
            (:func:`blur_kernel_size`) with reflect padding, as SEG-SDXL.
        grid: ``(H, W)`` of the image tokens (row-major). Required when an item blurs; when
            given, ``Nq`` must equal ``H·W + text_tokens``. (Joint PAG needs only the image block's
            length, ``Nq − text_tokens``.)
        text_tokens: number of text tokens in joint attention (SD3/Flux/DiT): the sequence is the
            ``H·W`` image tokens followed (``text_position="after"``, SD3) or preceded
            (``"before"``, Flux) by the text block.
        scale: softmax scale, default ``1/sqrt(d)``.
        backend: ``"triton"``, ``"torch"`` or None/``"auto"`` (see :mod:`.backends`).

    Returns:
        The attention output in q's layout and dtype: ``(B, heads, Nq, d)`` (laid out like q when
        q is dense) or ``(B, Nq, heads·d)`` contiguous. Identity items without text tokens are
        bit-exact copies of v.
    """
    fn = "guided_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.float_tensor(fn, name, t)
    _checks.same_device_dtype(fn, "k", k, q, "q")
    _checks.same_device_dtype(fn, "v", v, q, "q")
    if layout not in ATTENTION_LAYOUTS:
        _checks.fail(fn, "layout", f"must be one of {ATTENTION_LAYOUTS}, got {layout!r}")
    if layout == "bnd":
        if heads is None:
            _checks.fail(fn, "heads", "required for layout 'bnd' (q is (B, N, heads*d))")
        heads = _int(fn, "heads", heads, 1)
    elif heads is not None:
        heads = _int(fn, "heads", heads, 1)
        if q.dim() == 4 and q.shape[1] != heads:
            _checks.fail(fn, "heads", f"is {heads} but q has {q.shape[1]} heads (dim 1)")
    q4 = _attention_views(fn, "q", q, layout, heads)
    k4 = _attention_views(fn, "k", k, layout, heads)
    v4 = _attention_views(fn, "v", v, layout, heads)
    batch, nheads, nq, d = q4.shape
    for name, t in (("k", k4), ("v", v4)):
        if t.shape[0] != batch:
            _checks.fail(fn, name, f"batch {t.shape[0]} differs from q's {batch}")
        if t.shape[1] != nheads:
            _checks.fail(fn, name, f"has {t.shape[1]} heads but q has {nheads}")
        if t.shape[3] != d:
            _checks.fail(fn, name, f"head dim {t.shape[3]} differs from q's {d}")
    nk = k4.shape[2]
    if v4.shape[2] != nk:
        _checks.fail(fn, "v", f"has {v4.shape[2]} tokens but k has {nk}")
    if nk == 0 and nq > 0:
        _checks.fail(fn, "k", "has no tokens: a softmax over no keys is undefined")
    codes = _modes(fn, modes, batch)
    text_tokens = _int(fn, "text_tokens", text_tokens, 0)
    if text_position not in TEXT_POSITIONS:
        _checks.fail(fn, "text_position", f"must be one of {TEXT_POSITIONS}, got {text_position!r}")
    if text_tokens > nq:
        _checks.fail(fn, "text_tokens", f"{text_tokens} exceeds the {nq} query tokens")
    perturbed = any(c != _library.MODE_NONE for c in codes)
    if perturbed and nk != nq:
        _checks.fail(fn, "k", f"has {nk} tokens but q has {nq}: identity and blur items need self-attention "
                              "(cross-attention only with mode 'none')")
    if grid is None:
        if any(c == _library.MODE_BLUR for c in codes):
            _checks.fail(fn, "grid", "required when an item blurs (the (H, W) of the image tokens)")
        gh, gw = 1, nq - text_tokens  # joint PAG needs only the image block's length
    else:
        gh, gw = _grid(fn, grid)
        if gh * gw + text_tokens != nq:
            _checks.fail(fn, "q", f"has {nq} tokens but grid {(gh, gw)} has H*W = {gh * gw}"
                                  + (f" + {text_tokens} text tokens" if text_tokens else ""))
    sigmas = _per_item_sigma(fn, sigma, codes)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    else:
        scale = _checks.finite_number(fn, "scale", scale)
        scale = float(scale)
    op_modes, op_sigmas, op_sizes = [], [], []
    for c, s in zip(codes, sigmas):
        size = blur_kernel_size(s, (gh, gw)) if c == _library.MODE_BLUR else 0
        if c == _library.MODE_BLUR and size == 1:
            c = _library.MODE_NONE  # a 1-tap blur is the identity on the queries: plain attention, exactly
        elif c == _library.MODE_BLUR and size == 0:
            c = _library.MODE_MEAN
        op_modes.append(c)
        op_sigmas.append(s if c == _library.MODE_BLUR else 0.0)
        op_sizes.append(size if c == _library.MODE_BLUR else 0)
    chosen = backends.select(fn, q, (("head_dim", int(d)),), backend=backend)
    out = _library.call(_library.guided_attention, q4, k4, v4, op_modes, op_sigmas, op_sizes, gh, gw, text_tokens,
                        text_position == "before", scale, layout, chosen)
    if layout == "bnd":
        return out.transpose(1, 2).flatten(2)
    return out
