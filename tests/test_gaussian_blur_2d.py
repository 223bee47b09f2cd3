"""gaussian_blur_2d: reference vs an independent float64 blur; every backend vs the reference over
layouts, dtypes, grids (square, non-square, odd, 1×1) and σ edge cases; the kernel-size rule;
bad input; opcheck; torch.compile."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import guidance_kernels as gk
from guidance_kernels import reference as R
from guidance_kernels._spec import blur_kernel_size
from helpers import DTYPES, assert_close_to_truth, make_strided, to64

# (layout, shape, grid): channels C = 3 / 6 / 2·5
CASES = [
    ("nchw", (2, 3, 7, 9), (7, 9)),  # odd, non-square
    ("nchw", (1, 2, 1, 1), (1, 1)),  # 1×1
    ("bnc", (2, 35, 6), (5, 7)),
    ("bhnd", (2, 2, 35, 5), (7, 5)),
    ("bhnd", (1, 3, 16, 8), (4, 4)),  # square
]
# tiny σ → kernel 1; SAG's σ; a kernel larger than the grid (capped); σ at the threshold (finite,
# a near-box filter capped by the grid); above it (the mean); inf
SIGMAS = [0.1, 1.0, 2.5, 9999.0, 9999.5, math.inf]


def _x(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- reference vs independent


def _np_blur(img: np.ndarray, k: int, sigma: float) -> np.ndarray:
    """Reflect-padded 2-D Gaussian convolution written directly (float64, fp32-built weights)."""
    half = (k - 1) / 2
    x = np.linspace(-half, half, k, dtype=np.float32)
    w = np.exp(-0.5 * (x / np.float32(sigma)) ** 2).astype(np.float32)
    w = (w / w.sum()).astype(np.float64)
    p = k // 2
    padded = np.pad(img, ((0, 0), (0, 0), (p, p), (p, p)), mode="reflect")
    out = np.zeros_like(img)
    h, wd = img.shape[-2:]
    for dy in range(k):
        for dx in range(k):
            out += w[dy] * w[dx] * padded[..., dy:dy + h, dx:dx + wd]
    return out


@pytest.mark.parametrize("sigma,k", [(1.0, 7), (0.5, 3), (2.0, 9)])
def test_reference_matches_independent_float64(sigma, k):
    img = np.random.default_rng(0).standard_normal((2, 3, 9, 11))
    got = R.gaussian_blur_2d(torch.from_numpy(img), k, sigma)
    np.testing.assert_allclose(got.numpy(), _np_blur(img, k, sigma), rtol=1e-6, atol=1e-6)
    # SEG's infinite blur is the per-channel spatial mean
    mean = R.seg_blur(torch.from_numpy(img), 1e5)
    np.testing.assert_allclose(mean.numpy(), np.broadcast_to(img.mean(axis=(2, 3), keepdims=True), img.shape),
                               rtol=1e-12, atol=1e-12)


def test_token_views_match_seg_sdxl():
    """SEG-SDXL views (B, heads, N, d) queries — held as a transpose of (B, N, heads·d) — with
    ``permute(0, 1, 3, 2).view(B, heads·d, H, W)``: channel head·d + j, token n at (n // W, n % W)."""
    b, heads, d, h, w = 2, 3, 4, 5, 6
    hidden = torch.randn(b, h * w, heads * d, dtype=torch.float64)
    q = hidden.view(b, -1, heads, d).transpose(1, 2)
    seg_view = q.permute(0, 1, 3, 2).view(b, heads * d, h, w)
    assert torch.equal(R.tokens_to_image(q, (h, w), "bhnd"), seg_view)
    assert torch.equal(R.tokens_to_image(hidden, (h, w), "bnc"), seg_view)
    assert torch.equal(R.image_to_tokens(seg_view, q, "bhnd"), q)
    assert torch.equal(R.image_to_tokens(seg_view, hidden, "bnc"), hidden)


def test_kernel_size_rule():
    # SEG's rule, then SEG-SDXL's cap by the last dim
    assert [R.seg_kernel_size(s) for s in (0.1, 0.5, 1.0, 1.01, 2.0, 10.0)] == [1, 3, 7, 7, 13, 61]
    assert blur_kernel_size(1.0, (64, 64)) == 7
    assert blur_kernel_size(10.0, (32, 32)) == 33  # W even: W − (W % 2 − 1) = W + 1
    assert blur_kernel_size(10.0, (31, 31)) == 31
    assert blur_kernel_size(10.0, (128, 32)) == 33  # tall grid: the cap is SEG-SDXL's (last dim)
    assert blur_kernel_size(3.0, (2, 16)) == 3  # wide grid: reflect padding needs k // 2 < H
    assert blur_kernel_size(2.0, (1, 1)) == 1
    assert blur_kernel_size(9999.0, (8, 8)) == 9 and blur_kernel_size(9999.5, (8, 8)) == 0
    for h in range(1, 12):
        for w in range(1, 12):
            for sigma in (0.3, 1.0, 4.0, 100.0):
                k = blur_kernel_size(sigma, (h, w))
                assert k % 2 == 1 and k // 2 < h and k // 2 < w


# --------------------------------------------------------------------------- backends vs reference


def _reference(x, sigma, grid, layout, kernel_size=None):
    return R.blur_tokens(x, sigma, grid, layout, kernel_size, cap_to_grid=kernel_size is None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout,shape,grid", CASES, ids=lambda v: str(v))
def test_blur_matches_reference(lane, dtype, layout, shape, grid):
    backend, device = lane
    x = _x(shape, dtype, device)
    sigmas = SIGMAS
    if device == "cpu" and backend == "triton":
        # the interpreter runs every tap in Python: the σ that select distinct kernel paths only
        # (1 tap, a blur, a grid-capped blur, the mean)
        sigmas = [0.1, 1.0, 9999.0, math.inf] if dtype == torch.float32 else [1.0, math.inf]
    for sigma in sigmas:
        k = None if sigma > R.SEG_INF_SIGMA else blur_kernel_size(sigma, grid)
        out = gk.gaussian_blur_2d(x, sigma, grid=grid, layout=layout, backend=backend)
        assert out.shape == x.shape and out.dtype == dtype and out.device.type == device
        truth = _reference(to64(x), sigma, grid, layout, k)
        lowp = _reference(x.cpu(), sigma, grid, layout, k)
        assert_close_to_truth(out, lowp, truth, what=f"{backend} {layout} σ={sigma}")


@pytest.mark.parametrize("kind", ["permuted", "sliced", "transposed"])
def test_blur_strided_inputs_and_explicit_kernel(lane, kind):
    """Any strides in; the output keeps x's dense layout. An explicit kernel is used uncapped:
    9 taps on a 5-row grid is fine as long as the padding (4) stays below H and W."""
    backend, device = lane
    for layout, shape, grid in (("nchw", (1, 2, 5, 7), (5, 7)), ("bhnd", (2, 2, 35, 8), (5, 7)),
                                ("bnc", (1, 35, 6), (5, 7))):
        x = make_strided(_x(shape, torch.float32, device, seed=3), kind)
        out = gk.gaussian_blur_2d(x, 1.5, kernel_size=9, grid=grid, layout=layout, backend=backend)
        truth = _reference(to64(x), 1.5, grid, layout, 9)
        assert_close_to_truth(out, _reference(x.cpu(), 1.5, grid, layout, 9), truth, what=f"{kind} {layout}")


def test_channels_last_output_keeps_layout(lane):
    backend, device = lane
    x = _x((2, 4, 6, 5), torch.float16, device).contiguous(memory_format=torch.channels_last)
    out = gk.gaussian_blur_2d(x, 1.0, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_truth(out, _reference(x.cpu(), 1.0, (6, 5), "nchw"), _reference(to64(x), 1.0, (6, 5), "nchw"))


def test_kernel_of_one_tap_is_exact(lane):
    backend, device = lane
    x = _x((2, 3, 4, 5), torch.bfloat16, device)
    assert torch.equal(gk.gaussian_blur_2d(x, 0.1, backend=backend), x)  # ceil(0.6) → k = 1, weight 1


def test_empty_batch(lane):
    backend, device = lane
    x = torch.empty(0, 3, 4, 5, device=device)
    assert gk.gaussian_blur_2d(x, 1.0, backend=backend).shape == x.shape


# --------------------------------------------------------------------------- bad input


def _bad(exc, match, *args, **kw):
    with pytest.raises(exc, match=match):
        gk.gaussian_blur_2d(*args, **kw)


def test_bad_input_is_rejected_with_the_argument_name():
    x = torch.randn(2, 3, 5, 7)
    t = torch.randn(2, 35, 6)
    _bad(ValueError, "sigma: must be > 0", x, 0.0)
    _bad(ValueError, "sigma: must be > 0", x, -1.0)
    _bad(ValueError, r"sigma: must be > 0 \(and not NaN\), got nan", x, float("nan"))
    _bad(TypeError, "sigma: expected a Python number", x, torch.tensor(1.0))
    _bad(TypeError, "sigma: expected a real number", x, True)
    _bad(ValueError, "kernel_size: must be odd", x, 1.0, kernel_size=4)
    _bad(ValueError, "kernel_size: 11 needs reflect padding 5.*grid is too small", x, 1.0, kernel_size=11)
    _bad(ValueError, "kernel_size: must be >= 1", x, 1.0, kernel_size=0)
    _bad(TypeError, "kernel_size: expected an int", x, 1.0, kernel_size=3.0)
    _bad(ValueError, "layout: must be one of", x, 1.0, layout="nhwc")
    _bad(ValueError, "x: layout 'bnc' expects 3 dims", x, 1.0, layout="bnc", grid=(5, 7))
    _bad(ValueError, "grid: required for layout 'bnc'", t, 1.0, layout="bnc")
    _bad(ValueError, r"x: has 35 tokens but grid \(6, 6\) has H\*W = 36", t, 1.0, layout="bnc", grid=(6, 6))
    _bad(ValueError, r"grid: \(7, 5\) differs from x's spatial dims \(5, 7\)", x, 1.0, grid=(7, 5))
    _bad(TypeError, r"grid: expected \(H, W\)", t, 1.0, layout="bnc", grid=35)
    _bad(ValueError, r"grid\[0\]: must be >= 1", t, 1.0, layout="bnc", grid=(0, 35))
    _bad(ValueError, "heads: is 3 but x has 2 heads", torch.randn(2, 2, 35, 4), 1.0, layout="bhnd", grid=(5, 7),
         heads=3)
    _bad(ValueError, "heads: 4 does not divide", t, 1.0, layout="bnc", grid=(5, 7), heads=4)
    _bad(TypeError, "x: expected a floating-point tensor", torch.ones(2, 3, 5, 7, dtype=torch.int32), 1.0)
    _bad(ValueError, "backend='nope'", x, 1.0, backend="nope")


def test_forced_backend_that_cannot_serve_explains_why():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    gk.gaussian_blur_2d(x, 1.0)  # float64: the torch backend
    with pytest.raises(gk.BackendError, match="triton.*dtype torch.float64"):
        gk.gaussian_blur_2d(x, 1.0, backend="triton")
    with pytest.raises(gk.BackendError, match="has no cuda implementation"):
        gk.gaussian_blur_2d(x, 1.0, backend="cuda")


def test_raw_op_rejects_kernels_that_would_leave_the_grid(lane):
    """The op itself (bypassing the public checks) refuses a reflect padding that does not fit."""
    backend, device = lane
    x = torch.randn(1, 2, 3, 9, device=device)
    op = torch.ops.guidance_kernels.gaussian_blur_2d
    with pytest.raises((ValueError, RuntimeError), match="(reflect padding fits the grid|Padding size should be)"):
        op(x, 3, 9, "nchw", 9, 1.0, backend)


# --------------------------------------------------------------------------- opcheck and compile


def test_gradients_match_the_reference(lane):
    backend, device = lane
    for layout, shape, grid in CASES[:4]:
        x = _x(shape, torch.float32, device).requires_grad_()
        for sigma in (1.0, math.inf):
            out = gk.gaussian_blur_2d(x, sigma, grid=grid, layout=layout, backend=backend)
            grad = torch.randn_like(out)
            (got,) = torch.autograd.grad(out, x, grad)
            x64 = to64(x).requires_grad_()
            k = None if sigma > R.SEG_INF_SIGMA else blur_kernel_size(sigma, grid)
            (expect,) = torch.autograd.grad(_reference(x64, sigma, grid, layout, k), x64, to64(grad))
            torch.testing.assert_close(to64(got), expect, rtol=1e-5, atol=1e-6, msg=f"{backend} {layout} σ={sigma}")


def test_opcheck():
    op = torch.ops.guidance_kernels.gaussian_blur_2d
    torch.library.opcheck(op, (torch.randn(2, 3, 5, 7), 5, 7, "nchw", 5, 1.0, "torch"))
    torch.library.opcheck(op, (torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True), 5, 7, "nchw", 3,
                               0.8, "torch"))
    torch.library.opcheck(op, (torch.randn(2, 35, 6), 5, 7, "bnc", 0, 0.0, "torch"))
    torch.library.opcheck(op, (torch.randn(2, 35, 2, 4).transpose(1, 2), 5, 7, "bhnd", 3, 0.7, "torch"))


def test_compile_fullgraph():
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def f(x, tokens):
        return gk.gaussian_blur_2d(x, 1.0) + 1, gk.gaussian_blur_2d(tokens, 1e9, grid=(5, 7), layout="bnc")

    compiled = torch.compile(f, fullgraph=True, backend=counter)
    x, tokens = torch.randn(2, 3, 5, 7), torch.randn(2, 35, 4)
    for _ in range(2):
        got, expect = compiled(x, tokens), f(x, tokens)
        torch.testing.assert_close(got, expect)
    assert counter.frame_count == 1
