"""sag_degrade: the reference against diffusers' sag_masking (called directly) and ComfyUI's rule;
every backend against diffusers (fp32 tight, fp16/bf16 close), ComfyUI's non-divisible latents and
the float64 truth over masks, re-noise modes, layouts, kernel sizes and odd shapes; the mask
providers; bad input; opcheck; torch.compile. The CUDA kernel's compile lanes are
tests/nvcc/sag_degrade_kernels.cu and csrc/sag_degrade*.{cu,cpp} (tests/test_compile_lanes.py);
its arithmetic runs on the CPU in tests/test_sag_degrade_host.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import guidance_kernels as gk
from conftest import HAS_CUDA, LANES, lane_id
from guidance_kernels import _spec
from guidance_kernels import reference as R
from helpers import DTYPES, EPS, assert_close_to_truth, make_strided, to64

def _interpreted(lane) -> bool:
    """The Triton interpreter runs ~50 ms per program: its lane uses the small cases (GPU lanes all)."""
    return lane[0] == "triton" and lane[1] == "cpu"


def _randn(shape, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _bimodal_attention(batch, heads, tokens, seed, dtype=torch.float64):
    """Self-attention probabilities (B·heads, N, N) whose key masses sit far from SAG's threshold
    1.0: every query shares a direction u, and each key is aligned with ±u, so "popular" keys get
    masses ≫ 1 and the others ≪ 1 (no mask bit depends on rounding). Returns (probs, q, k, v) with
    q/k/v (B, heads, N, 16)."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    u = torch.randn(d, generator=g, dtype=torch.float64)
    u = u / u.norm()
    popular = max(1, min(tokens - 1, round(0.4 * tokens)))  # keys per sample aligned with +u
    rank = torch.rand(batch, 1, tokens, 1, generator=g).argsort(dim=2)
    sign = torch.where(rank < popular, 1.0, -1.0).double()
    q = 0.1 * torch.randn(batch, heads, tokens, d, generator=g, dtype=torch.float64) + 3.0 * u
    k = 0.1 * torch.randn(batch, heads, tokens, d, generator=g, dtype=torch.float64) + 2.0 * sign * u
    v = torch.randn(batch, heads, tokens, d, generator=g, dtype=torch.float64)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    probs = R.attention_probs(q.reshape(-1, tokens, d), k.reshape(-1, tokens, d), d**-0.5)
    mass = probs.double().reshape(batch, heads, tokens, tokens).mean(1).sum(1)
    assert ((mass - 1).abs() > 0.2).all() and (mass > 1).any() and (mass < 1).any()
    return probs, q, k, v


def _diffusers_sag_masking(heads):
    """diffusers' StableDiffusionSAGPipeline.sag_masking bound to a minimal object: the method only
    reads self.unet.config.attention_head_dim (the head count) and self.scheduler.add_noise."""
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
        StableDiffusionSAGPipeline,
    )

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    owner = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(attention_head_dim=heads)),
                            scheduler=scheduler)

    def call(original_latents, attn_map, map_size, t, eps):
        return StableDiffusionSAGPipeline.sag_masking(owner, original_latents, attn_map, map_size, t, eps)

    return call, scheduler


# --------------------------------------------------------------------------- references vs anchors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_is_diffusers_sag_masking(dtype):
    sag_masking, scheduler = _diffusers_sag_masking(heads=2)
    probs, *_ = _bimodal_attention(2, 2, 4 * 6, seed=0, dtype=dtype)
    x0 = _randn((2, 4, 20, 30), 1, dtype)
    eps = _randn((2, 4, 20, 30), 2, dtype)
    t = torch.tensor(501)
    theirs = sag_masking(x0, probs, (4, 6), t, eps)
    ours = R.sag_masking(x0, probs, (4, 6), 2, scheduler.alphas_cumprod[t], eps)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_comfy_map_grid_rule():
    # (latent h, w, tokens) -> ComfyUI's grid; the UNet's 3 stride-2 downsamples (ceil) give the tokens
    cases = {(64, 64, 64): (8, 8), (128, 128, 1024): (32, 32), (96, 64, 96): (12, 8), (65, 97, 117): (9, 13),
             (37, 53, 35): (5, 7), (128, 128, 256): (16, 16), (20, 30, 600): (20, 30), (5, 5, 1): (1, 1)}
    for (h, w, n), grid in cases.items():
        assert gk.sag_map_grid((h, w), n) == grid == R.sag_map_grid_comfy(h, w, n), (h, w, n)


def test_reference_sag_degrade_composes_the_anchors():
    """reference.sag_degrade (the oracle of every backend) equals the transcriptions of diffusers'
    sag_masking and of ComfyUI's create_blur_map + re-noise, operation for operation."""
    probs, *_ = _bimodal_attention(2, 2, 9 * 13, seed=3, dtype=torch.float32)
    mass = probs.reshape(2, 2, 117, 117).mean(1).sum(1)
    x0, eps, x_t = (_randn((2, 4, 65, 97), s) for s in (4, 5, 6))
    want = R.sag_masking(x0, probs, (9, 13), 2, torch.tensor([0.3, 0.6]), eps, sigma=1.0)
    got = R.sag_degrade(x0, mass, grid=(9, 13), eps=eps, alpha_cumprod=torch.tensor([0.3, 0.6]))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    want_noised, want_degraded = R.sag_blur_map_comfy(x0, probs, x_t, sigma=2.0)
    got_noised, got_degraded = R.sag_degrade(x0, mass, sigma=2.0, x_t=x_t, return_degraded=True)
    torch.testing.assert_close(got_noised, want_noised, rtol=0, atol=0)
    torch.testing.assert_close(got_degraded, want_degraded, rtol=0, atol=0)


# --------------------------------------------------------------------------- backends vs the anchors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_diffusers_sag_masking(lane, dtype):
    """The whole SAG masking step: our key mass (never the map) + sag_degrade against diffusers'
    sag_masking fed with the explicit probability map, at an SD-like 8x8 mid-block map on a 64x64
    latent and a non-square 4x6 map on a 20x30 latent."""
    backend, device = lane
    sag_masking, scheduler = _diffusers_sag_masking(heads=2)
    mass_backend = backend if backend != "cuda" else "triton"
    cases = (((8, 8), (64, 64), 7), ((4, 6), (20, 30), 8))
    for (h, w), (lh, lw), seed in cases[1:] if _interpreted(lane) else cases:
        probs, q, k, v = _bimodal_attention(2, 2, h * w, seed=seed)
        x0 = _randn((2, 4, lh, lw), seed + 1)
        eps = _randn((2, 4, lh, lw), seed + 2)
        t = torch.tensor(701)
        alpha = scheduler.alphas_cumprod[t]
        truth = R.sag_masking(x0, probs, (h, w), 2, alpha, eps)  # float64 throughout
        lowp = sag_masking(x0.to(dtype), probs.to(dtype), (h, w), t, eps.to(dtype))
        kernel_dtype = torch.float32 if (dtype == torch.bfloat16 and mass_backend == "triton" and not HAS_CUDA) \
            else dtype  # the key mass of bf16 inputs is checked on the GPU lane
        _, mass = gk.attention_key_mass(*(t_.to(device, kernel_dtype) for t_ in (q, k, v)), items=[0, 1],
                                        backend=mass_backend)
        out = gk.sag_degrade(x0.to(device, dtype), mass, grid=(h, w), eps=eps.to(device, dtype),
                             alpha_cumprod=alpha.to(device), backend=backend)
        assert_close_to_truth(out, lowp, truth, what=f"{backend} {dtype} {h}x{w}->{lh}x{lw}")
        if dtype == torch.float32:
            torch.testing.assert_close(out.cpu(), lowp, rtol=1e-5, atol=1e-5)


def test_matches_comfy_for_non_divisible_latents(lane):
    """ComfyUI's create_blur_map + k-diffusion re-noise for latents the map does not divide (the
    grid comes from the ratio rule), fp32 against its transcription; fp16 against the truth."""
    backend, device = lane
    cases = (((65, 97), (9, 13), 10), ((37, 53), (5, 7), 11), ((13, 21), (2, 3), 12))
    for (lh, lw), (h, w), seed in cases[2:] if _interpreted(lane) else cases:
        probs, *_ = _bimodal_attention(1, 2, h * w, seed=seed)
        mass = probs.reshape(1, 2, h * w, h * w).mean(1).sum(1)
        x0, x = _randn((1, 4, lh, lw), seed + 1), _randn((1, 4, lh, lw), seed + 2)
        want_noised, want_degraded = R.sag_blur_map_comfy(x0.float(), probs.float(), x.float(), sigma=2.0)
        got_noised, got_degraded = gk.sag_degrade(x0.float().to(device), mass.float().to(device), sigma=2.0,
                                                  x_t=x.float().to(device), return_degraded=True, backend=backend)
        torch.testing.assert_close(got_noised.cpu(), want_noised, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_degraded.cpu(), want_degraded, rtol=1e-5, atol=1e-5)
        truth, _ = R.sag_blur_map_comfy(x0, probs, x, sigma=2.0)
        lowp, _ = R.sag_blur_map_comfy(x0.half(), probs.half(), x.half(), sigma=2.0)
        out = gk.sag_degrade(x0.half().to(device), mass.float().to(device), sigma=2.0, x_t=x.half().to(device),
                             backend=backend)
        assert_close_to_truth(out, lowp, truth, what=f"{backend} fp16 {lh}x{lw}")


# --------------------------------------------------------------------------- backends vs the truth


def _compare(backend, device, x0, mask_or_mass, *, factor=2.0, **kw):
    """Backend vs reference.sag_degrade (float64 truth, input-dtype reference) for out and degraded."""
    dev = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out, degraded = gk.sag_degrade(x0.to(device), mask_or_mass.to(device), return_degraded=True, backend=backend,
                                   **dev)
    truth = R.sag_degrade(to64(x0), to64(mask_or_mass) if mask_or_mass.is_floating_point() else mask_or_mass,
                          return_degraded=True, **{k: to64(v) for k, v in kw.items()})
    lowp = R.sag_degrade(x0, mask_or_mass, return_degraded=True, **kw)
    what = f"{backend} {x0.dtype} {tuple(x0.shape)} {sorted(kw)}"
    assert_close_to_truth(out, lowp[0], truth[0], factor=factor, what=what)
    assert_close_to_truth(degraded, lowp[1], truth[1], factor=factor, what=what + " degraded")
    return out


# The interpreter lane runs these heavier sweeps in fp32/fp16 (bf16 differs only in the load/store
# conversions, which test_matches_diffusers_sag_masking covers there); every other lane in all dtypes.
LANE_DTYPES = [pytest.param(lane, dtype, id=f"{lane_id(lane)}-{dtype}") for lane in LANES for dtype in DTYPES
               if not (_interpreted(lane) and dtype == torch.bfloat16)]


@pytest.mark.parametrize("lane, dtype", LANE_DTYPES)
def test_key_mass_modes_and_odd_shapes(lane, dtype):
    """Thresholded key masses on awkward grids (odd ratios exercise the float32 nearest rule), one
    DDPM with per-sample ᾱ, one k-diffusion, one without re-noise; min(H, W) = 5."""
    backend, device = lane
    cases = [((2, 3, 33, 19), (7, 5), dict(eps=1, alpha_cumprod=torch.tensor([0.25, 0.9]))),
             ((1, 16, 5, 7), (2, 3), dict(x_t=1)),
             ((3, 2, 21, 40), (6, 11), dict())]
    for i, (shape, grid, extra) in enumerate(cases):
        x0 = _randn(shape, 20 + i, dtype)
        mass = _randn((shape[0], grid[0] * grid[1]), 30 + i).abs() * 1.4  # around the threshold
        kw = {k: (_randn(shape, 40 + i, dtype) if isinstance(v, int) else v) for k, v in extra.items()}
        _compare(backend, device, x0, mass, grid=grid, **kw)


@pytest.mark.parametrize("lane, dtype", LANE_DTYPES)
def test_ready_masks_broadcast_and_layouts(lane, dtype):
    """Soft float masks, bool masks, batch-1 masks, full-resolution masks; channels-last, sliced and
    permuted x0 / eps; the output keeps x0's dense layout."""
    backend, device = lane
    shape = (2, 2, 18, 23)
    x0 = _randn(shape, 50, dtype)
    eps = _randn(shape, 51, dtype)
    soft = torch.rand(2, 1, 5, 6, generator=torch.Generator().manual_seed(52))
    _compare(backend, device, x0, soft, eps=eps, alpha_cumprod=0.5)
    hard = torch.rand(1, 18, 23, generator=torch.Generator().manual_seed(53)) > 0.5
    _compare(backend, device, x0, hard, x_t=eps)
    _compare(backend, device, x0, soft[:, 0].to(dtype))
    for layout in ("permuted", "sliced", "transposed"):
        xs, es = make_strided(x0, layout), make_strided(eps, layout)
        _compare(backend, device, xs, soft, eps=es, alpha_cumprod=torch.tensor(0.7))
    cl = x0.contiguous(memory_format=torch.channels_last).to(device)
    out = gk.sag_degrade(cl, soft.to(device), x_t=eps.to(device), backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    contiguous = gk.sag_degrade(x0.to(device), soft.to(device), x_t=eps.to(device), backend=backend)
    if backend == "torch":  # conv2d may pick another algorithm for channels-last input
        torch.testing.assert_close(out, contiguous, rtol=4 * EPS[dtype], atol=4 * EPS[dtype])
    else:  # the kernels: the layout changes addressing only
        assert torch.equal(out, contiguous)


def test_kernel_sizes_sigma_and_minimum_sizes(lane):
    backend, device = lane
    for k, sigma, (h, w) in ((1, 1.0, (3, 4)), (5, 2.0, (3, 9)), (15, 3.0, (8, 40)), (9, 0.5, (5, 5))):
        x0 = _randn((1, 4, h, w), 60 + k)
        mass = _randn((1, 6), 61).abs() * 1.4
        _compare(backend, device, x0, mass, grid=(2, 3), kernel_size=k, sigma=sigma)


def test_nan_propagates_like_the_reference(lane):
    """A NaN in x0 spreads over the blur window whatever the mask (blurred·0 is NaN), as in diffusers."""
    backend, device = lane
    x0 = _randn((1, 4, 16, 16), 70)
    x0[0, 1, 7, 3] = float("nan")
    mask = (torch.arange(16 * 16).reshape(1, 16, 16) % 3 == 0)
    out = gk.sag_degrade(x0.to(device), mask.to(device), backend=backend)
    want = R.sag_degrade(x0, mask)
    assert torch.equal(torch.isnan(out.cpu()), torch.isnan(want))
    finite = ~torch.isnan(want)
    torch.testing.assert_close(out.cpu()[finite], want[finite], rtol=1e-5, atol=1e-5)


def test_empty_batch(lane):
    backend, device = lane
    out = gk.sag_degrade(torch.empty(0, 4, 8, 8, device=device), torch.ones(1, 1, 1, device=device),
                         backend=backend)
    assert out.shape == (0, 4, 8, 8)


@pytest.mark.parametrize("lane", [x for x in LANES if x[0] != "torch"], ids=lane_id)
def test_large_offsets_use_int64(lane):
    """Channel stride 2**30 + 5 elements: plane (1, 1) starts past 2**31 (the storage stays virtual)."""
    backend, device = lane
    stride = 2**30 + 5
    storage = torch.empty(3 * stride + 64, dtype=torch.float16, device=device)
    x0 = storage.as_strided((2, 2, 6, 8), (2 * stride, stride, 8, 1))
    values = _randn((2, 2, 6, 8), 80, torch.float16)
    x0.copy_(values.to(device))
    mask = torch.tensor([[[True, False], [False, True]]], device=device)
    out = gk.sag_degrade(x0, mask, kernel_size=5, backend=backend)
    want = R.sag_degrade(values.double(), mask.cpu(), kernel_size=5)
    torch.testing.assert_close(out.cpu().double(), want, rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------- nearest rule


def test_nearest_scale_reproduces_f_interpolate():
    """The float32 source-index rule the kernels use equals F.interpolate(mode="nearest") for every
    (map, latent) size pair up to 70 — including ATen's special cases (equal sizes, exact 2x)."""
    for in_size in range(1, 71):
        src = torch.arange(in_size, dtype=torch.float32).view(1, 1, 1, -1)
        for out_size in range(1, 71):
            want = F.interpolate(src, (1, out_size), mode="nearest").view(-1).long()
            scale = torch.tensor(_spec.nearest_scale(in_size, out_size), dtype=torch.float32)
            got = torch.minimum(torch.floor(torch.arange(out_size, dtype=torch.float32) * scale).long(),
                                torch.tensor(in_size - 1))
            assert torch.equal(got, want), (in_size, out_size)


# --------------------------------------------------------------------------- mask providers


def test_providers_feed_the_same_kernel(lane):
    backend, device = lane
    x0 = _randn((1, 4, 24, 32), 90)
    eps = _randn((1, 4, 24, 32), 91)
    g = torch.Generator().manual_seed(92)
    masks = {"global": gk.global_mask(),
             "random": gk.random_patch_mask(1, (3, 4), fraction=0.5, generator=g),
             "square": gk.square_patch_mask(1, (24, 32), size=10, generator=g),
             "high_frequency": gk.high_frequency_mask(x0)}
    for name, mask in masks.items():
        assert mask.dtype == torch.float32 and mask.dim() == 4 and mask.shape[1] == 1, name
        out = gk.sag_degrade(x0.to(device), mask.to(device), eps=eps.to(device), alpha_cumprod=0.4, backend=backend)
        want = R.sag_degrade(x0, mask, eps=eps, alpha_cumprod=0.4)
        torch.testing.assert_close(out.cpu(), want, rtol=1e-5, atol=1e-5, msg=name)
    blur_all = gk.sag_degrade(x0.to(device), masks["global"].to(device), backend=backend)
    torch.testing.assert_close(blur_all.cpu(), R.gaussian_blur_2d(x0, 9, 1.0, cap_to_grid=False), rtol=1e-5,
                               atol=1e-5)
    # the attention provider: thresholding in the kernel equals passing the thresholded mask
    mass = _randn((1, 12), 93).abs() * 1.4
    via_mask = gk.sag_degrade(x0.to(device), gk.attention_mask(mass, (3, 4)).to(device), backend=backend)
    via_mass = gk.sag_degrade(x0.to(device), mass.to(device), grid=(3, 4), backend=backend)
    assert torch.equal(via_mask, via_mass)


def test_provider_masks_have_their_shape():
    g = torch.Generator().manual_seed(0)
    r = gk.random_patch_mask(5, (4, 6), fraction=0.25, generator=g)
    assert r.shape == (5, 1, 4, 6) and (r.sum(dim=(1, 2, 3)) == 6).all()
    assert not torch.equal(r[0], r[1])  # independent per sample
    assert torch.equal(gk.random_patch_mask(5, (4, 6), fraction=0.25, generator=torch.Generator().manual_seed(0)), r)
    s = gk.square_patch_mask(4, (9, 11), size=3, generator=g)
    for m in s[:, 0]:
        rows, cols = m.nonzero(as_tuple=True)
        assert m.sum() == 9 and rows.max() - rows.min() == 2 and cols.max() - cols.min() == 2
    # high-frequency energy: a smooth left half and a checkerboard right half
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(32.0), indexing="ij")
    img = torch.where(xx < 16, torch.sin(xx / 16), (-1.0) ** (xx + yy)).expand(1, 4, 16, 32)
    hf = gk.high_frequency_mask(img, cutoff=0.25)
    assert hf[..., 18:30].mean() == 1.0 and hf[..., 2:14].mean() == 0.0
    mass = torch.tensor([[0.5, 1.5, 1.0, 2.0]])
    assert torch.equal(gk.attention_mask(mass, (2, 2)), torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]]))
    with pytest.raises(ValueError, match="square_patch_mask: size: 5 does not fit"):
        gk.square_patch_mask(1, (4, 8), size=5)
    with pytest.raises(ValueError, match="random_patch_mask: fraction: must be in"):
        gk.random_patch_mask(1, (4, 8), fraction=1.5)
    with pytest.raises(ValueError, match="attention_mask: grid: 3x3 = 9 cells"):
        gk.attention_mask(mass, (3, 3))


# --------------------------------------------------------------------------- bad input


def _bad(exc, match, *args, **kw):
    with pytest.raises(exc, match=match):
        gk.sag_degrade(*args, **kw)


def test_bad_input_is_rejected_with_the_argument_name():
    x0 = torch.randn(2, 4, 16, 16)
    eps = torch.randn_like(x0)
    mass = torch.rand(2, 16) * 2
    _bad(ValueError, r"x0: latent 4x16 is too small .* \(min\(H, W\) must be > 4", x0[:, :, :4], mass, grid=(4, 4))
    _bad(ValueError, r"x0: latent 16x2 is too small .* 5-tap", x0[..., :2], mass, grid=(4, 4), kernel_size=5)
    _bad(ValueError, "mask_or_mass: 15 keys match no map grid for the latent 16x16", x0, mass[:, :15])
    _bad(ValueError, "grid: 3x5 = 15 cells but the key mass has 16 keys", x0, mass, grid=(3, 5))
    _bad(ValueError, "grid: only applies to a key mass", x0, mass.view(2, 4, 4), grid=(4, 4))
    _bad(TypeError, r"grid: expected \(h, w\)", x0, mass, grid=16)
    _bad(ValueError, "alpha_cumprod: must be in \\(0, 1\\], got 0.0", x0, mass, eps=eps, alpha_cumprod=0.0)
    _bad(ValueError, "alpha_cumprod: must be in \\(0, 1\\], got 1.5", x0, mass, eps=eps, alpha_cumprod=1.5)
    _bad(ValueError, "alpha_cumprod: must be finite", x0, mass, eps=eps, alpha_cumprod=float("nan"))
    _bad(ValueError, "alpha_cumprod: values must be in \\(0, 1\\]", x0, mass, eps=eps,
         alpha_cumprod=torch.tensor([0.5, -0.1]))
    _bad(ValueError, r"alpha_cumprod: scale tensor must have shape \(\), \(1,\) or \(2,\)", x0, mass, eps=eps,
         alpha_cumprod=torch.tensor([0.5, 0.4, 0.3]))
    _bad(ValueError, "eps: required with alpha_cumprod", x0, mass, alpha_cumprod=0.5)
    _bad(ValueError, "alpha_cumprod: required with eps", x0, mass, eps=eps)
    _bad(ValueError, "x_t: give either x_t", x0, mass, eps=eps, alpha_cumprod=0.5, x_t=eps)
    _bad(TypeError, "eps: has dtype", x0, mass, eps=eps.half(), alpha_cumprod=0.5)
    _bad(ValueError, "x_t: shape", x0, mass, x_t=eps[:1])
    _bad(ValueError, "eps: is on meta", x0, mass, eps=eps.to("meta"), alpha_cumprod=0.5)
    _bad(ValueError, "mask_or_mass: is on meta", x0, mass.to("meta"))
    _bad(TypeError, "x0: expected a floating-point tensor", x0.int(), mass)
    _bad(ValueError, r"x0: expected a \(B, C, H, W\) latent", x0[0], mass)
    _bad(TypeError, "mask_or_mass: expected a floating-point or bool tensor", x0, mass.int())
    _bad(TypeError, "mask_or_mass: a bool map is a mask", x0, mass > 1)
    _bad(ValueError, "mask_or_mass: batch size 3 is neither 1 nor x0's 2", x0, torch.rand(3, 16))
    _bad(ValueError, r"mask_or_mass: a 4-d mask must be \(B, 1, h, w\)", x0, torch.rand(2, 4, 4, 4))
    _bad(ValueError, "mask_or_mass: expected a key mass", x0, torch.rand(16))
    _bad(ValueError, "kernel_size: must be odd", x0, mass, kernel_size=8)
    _bad(ValueError, "kernel_size: must be odd and <= 15", x0, mass, kernel_size=17)
    _bad(ValueError, "sigma: must be > 0", x0, mass, sigma=0.0)
    _bad(ValueError, "threshold: must be finite", x0, mass, threshold=float("inf"))
    _bad(TypeError, "return_degraded: expected a bool", x0, mass, return_degraded=1)
    _bad(ValueError, "backend='nope'", x0, mass, backend="nope")
    with pytest.raises(gk.BackendError, match="cuda"):
        gk.sag_degrade(x0, mass, backend="cuda")


# --------------------------------------------------------------------------- opcheck and compile


def test_opcheck():
    x0 = torch.randn(2, 4, 9, 11)
    other = torch.randn(2, 4, 9, 11)
    op = torch.ops.guidance_kernels.sag_degrade
    mass = torch.rand(2, 3, 4) * 2
    torch.library.opcheck(op, (x0, mass, True, 1.0, 9, 1.0, "ddpm", 0.0, torch.tensor([0.3, 0.8]), other, False,
                               "torch"))
    torch.library.opcheck(op, (x0, torch.rand(1, 9, 11), False, 1.0, 5, 2.0, "kdiff", 0.0, None, other, True,
                               "torch"))
    torch.library.opcheck(op, (x0.contiguous(memory_format=torch.channels_last), mass > 1, False, 1.0, 9, 1.0,
                               "none", 0.0, None, None, True, "torch"))


def test_compile_fullgraph_no_recompile_when_alpha_changes():
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

    def step(q, k, v, x0, eps, alpha):
        _, mass = gk.attention_key_mass(q, k, v, items=[0])
        return gk.sag_degrade(x0, mass, grid=(3, 4), eps=eps, alpha_cumprod=alpha)

    compiled = torch.compile(step, fullgraph=True, backend=counter)
    q, k, v = (_randn((1, 2, 12, 16), s) for s in (1, 2, 3))
    x0, eps = _randn((1, 4, 12, 16), 4), _randn((1, 4, 12, 16), 5)
    for alpha in (0.9, 0.5, 0.1):
        a = torch.tensor(alpha)
        torch.testing.assert_close(compiled(q, k, v, x0, eps, a), step(q, k, v, x0, eps, a))
    assert counter.frame_count == 1

    counter_floats = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(lambda x, m, e, a: gk.sag_degrade(x, m, grid=(3, 4), eps=e, alpha_cumprod=a),
                             fullgraph=True, backend=counter_floats)
    mass = _randn((1, 12), 6).abs() * 1.4
    for alpha in (0.9, 0.5, 0.3, 0.1):
        torch.testing.assert_close(compiled(x0, mass, eps, alpha),
                                   gk.sag_degrade(x0, mass, grid=(3, 4), eps=eps, alpha_cumprod=alpha))
    assert counter_floats.frame_count <= 2
