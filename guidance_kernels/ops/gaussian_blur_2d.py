"""gaussian_blur_2d: the depthwise Gaussian blur of SEG and SAG (reflect padding, SEG's kernel-size
rule, σ above ``SEG_INF_SIGMA`` = the exact spatial mean), computed separably.

It has an autograd formula (the blur and the mean are linear maps): models that use it compile
with parameters requiring grad.
"""

from __future__ import annotations

import torch

from .. import _checks, _library, backends
from .._library import GaussianBlur2dArgs
from .._spec import SEG_INF_SIGMA, blur_kernel_size

LAYOUTS = ("nchw", "bnc", "bhnd")

backends.register_op("gaussian_blur_2d", ("triton", "torch"))


def _grid_of(fn: str, x: torch.Tensor, layout: str, grid) -> tuple[int, int]:
    """The (H, W) grid of ``x`` in ``layout`` (checked against ``grid`` when one is given)."""
    ndim = {"nchw": 4, "bnc": 3, "bhnd": 4}[layout]
    if x.dim() != ndim:
        _checks.fail(fn, "x", f"layout {layout!r} expects {ndim} dims, got shape {tuple(x.shape)}")
    if layout == "nchw":
        shape_grid = (int(x.shape[2]), int(x.shape[3]))
        if 0 in shape_grid:
            _checks.fail(fn, "x", f"has an empty spatial grid {shape_grid}: there is nothing to blur over")
        h, w = _checks.grid(fn, grid) if grid is not None else shape_grid
        if (h, w) != shape_grid:
            _checks.fail(fn, "grid", f"{(h, w)} differs from x's spatial dims {shape_grid}")
        return h, w
    if grid is None:
        _checks.fail(fn, "grid", f"required for layout {layout!r} (the (H, W) of the image tokens)")
    h, w = _checks.grid(fn, grid)
    n = x.shape[1] if layout == "bnc" else x.shape[2]
    if n != h * w:
        _checks.fail(fn, "x", f"has {n} tokens but grid {(h, w)} has H*W = {h * w}")
    return h, w


def _check_heads(fn: str, x: torch.Tensor, layout: str, heads) -> None:
    heads = _checks.integer(fn, "heads", heads, minimum=1)
    if layout == "bhnd" and x.shape[1] != heads:
        _checks.fail(fn, "heads", f"is {heads} but x has {x.shape[1]} heads (dim 1)")
    if layout != "bhnd" and x.shape[1 if layout == "nchw" else 2] % heads != 0:
        _checks.fail(fn, "heads", f"{heads} does not divide the channel count")


def _kernel_size(fn: str, sigma: float, kernel_size, grid: tuple[int, int]) -> int:
    """The op's kernel size: 0 for σ = ∞, SEG's rule by default, else the caller's odd size."""
    if sigma > SEG_INF_SIGMA:
        if kernel_size is not None:
            _checks.integer(fn, "kernel_size", kernel_size, minimum=1)
        return 0
    if kernel_size is None:
        return blur_kernel_size(sigma, grid)
    size = _checks.integer(fn, "kernel_size", kernel_size, minimum=1)
    if size % 2 == 0:
        _checks.fail(fn, "kernel_size", f"must be odd (an even size shifts the image), got {size}")
    if size // 2 >= min(grid):
        _checks.fail(fn, "kernel_size", f"{size} needs reflect padding {size // 2}, which must be below "
                                        f"both grid dims {grid}: the grid is too small for this kernel")
    return size


def gaussian_blur_2d(x: torch.Tensor, sigma: float, *, kernel_size: int | None = None, grid=None,
                     layout: str = "nchw", heads: int | None = None, backend: str | None = None) -> torch.Tensor:
    """Depthwise Gaussian blur with reflect padding, computed separably (two 1-D passes fused in one
    kernel), never as a k×k convolution.

    Args:
        x: ``(B, C, H, W)`` for ``layout="nchw"``; image tokens ``(B, N, C)`` (``"bnc"``) or
            ``(B, heads, N, d)`` (``"bhnd"``, channels ``heads·d``) with ``N = H·W`` row-major.
            float32/float16/bfloat16 (float64 on the torch backend); any strides.
        sigma: σ > 0. σ > 9999 (``SEG_INF_SIGMA``, inf included): every position becomes the exact
            spatial mean of its channel (SEG's infinite blur; ``kernel_size`` is then ignored). A σ
            that rounds to 0 in float32 (< 1.4e-45) is the identity, its limit.
        kernel_size: odd size; its padding ``kernel_size // 2`` must be below H and W. Default:
            SEG's rule ``ceil(6σ) + 1 − ceil(6σ) % 2`` capped by the grid (``_spec.blur_kernel_size``).
        grid: ``(H, W)``; required for the token layouts (optional check for ``"nchw"``).
        heads: optional check of the head count of ``"bhnd"`` (``x.shape[1]``) or of ``C % heads``.
        backend: ``"triton"``, ``"torch"`` or None/``"auto"`` (see :mod:`guidance_kernels.backends`).

    Weights are ``_spec.gaussian_kernel_1d`` (float32) for both axes; accumulation is float32.
    Taps whose float32 weight is exactly 0 (σ small against ``kernel_size``) are left out, so
    NaN/inf spread exactly over the footprint of the non-zero weights, on every backend.
    Returns a new tensor of ``x``'s shape and dtype (``x``'s layout when dense, else contiguous).
    """
    fn = "gaussian_blur_2d"
    _checks.float_tensor(fn, "x", x)
    if layout not in LAYOUTS:
        _checks.fail(fn, "layout", f"must be one of {LAYOUTS}, got {layout!r}")
    sigma = _checks.sigma(fn, "sigma", sigma)
    h, w = _grid_of(fn, x, layout, grid)
    if heads is not None:
        _check_heads(fn, x, layout, heads)
    size = _kernel_size(fn, sigma, kernel_size, (h, w))
    chosen = backends.select(fn, x, backend=backend)
    return _library.call(fn, GaussianBlur2dArgs(x, h, w, layout, size, sigma if size else 0.0), chosen)
