"""guidance_combine, apg_combine, cfg_zero_star_combine: reference vs independent float64 and
diffusers; every backend vs the reference on odd shapes, layouts and dtypes; bad input; opcheck;
torch.compile (no graph breaks, no recompiles when scales change)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import guidance_kernels as gk
from guidance_kernels import reference as R
from guidance_kernels._spec import APG_FORMULATIONS
from conftest import LANES, lane_id
from helpers import DTYPES, LAYOUTS, assert_close_to_truth, make_strided, to64

SHAPES = [(1, 4, 5, 7), (2, 3, 9, 11), (3, 16, 33), (2, 1)]


def _branches(k, shape, dtype, device, seed=0, correlated=True):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    out = []
    for _ in range(k):
        noise = torch.randn(shape, generator=g, dtype=torch.float64)
        out.append((base + 0.3 * noise) if correlated else noise)
    return [b.to(device=device, dtype=dtype) for b in out]


# --------------------------------------------------------------------------- reference vs independent


def _np_std(x):
    flat = x.reshape(x.shape[0], -1)
    return flat.std(axis=1, ddof=1).reshape(-1, *([1] * (x.ndim - 1)))


def test_reference_matches_independent_float64():
    rng = np.random.default_rng(0)
    u, c, p = (rng.standard_normal((2, 4, 6, 5)) for _ in range(3))
    s, ps, phi = 7.5, 3.0, 0.7
    out = u + s * (c - u) + ps * (c - p)
    out = phi * out * (_np_std(c) / _np_std(out)) + (1 - phi) * out
    got = R.guidance_combine([torch.from_numpy(x) for x in (u, c, p)], gk.cfg(s) + gk.pag(ps), rescale=phi)
    np.testing.assert_allclose(got.numpy(), out, rtol=1e-12, atol=1e-12)

    # APG, paper formulation, with threshold and eta
    w, eta, r = 4.0, 0.4, 1.5
    diff = c - u
    norms = np.sqrt((diff.reshape(2, -1) ** 2).sum(1)).reshape(2, 1, 1, 1)
    diff = diff * np.minimum(1.0, r / norms)
    v = c / np.sqrt((c.reshape(2, -1) ** 2).sum(1)).reshape(2, 1, 1, 1)
    par = (diff * v).reshape(2, -1).sum(1).reshape(2, 1, 1, 1) * v
    expect = c + (w - 1) * ((diff - par) + eta * par)
    got = R.apg_combine(torch.from_numpy(c), torch.from_numpy(u), w, eta=eta, norm_threshold=r)
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-12, atol=1e-12)

    # CFG-Zero*
    alpha = (c * u).reshape(2, -1).sum(1) / ((u * u).reshape(2, -1).sum(1) + 1e-8)
    alpha = alpha.reshape(2, 1, 1, 1)
    expect = alpha * u + s * (c - alpha * u)
    got = R.cfg_zero_star_combine(torch.from_numpy(c), torch.from_numpy(u), s)
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-12, atol=1e-12)


def test_reference_matches_diffusers():
    pytest.importorskip("diffusers")
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance
    from diffusers.guiders.classifier_free_zero_star_guidance import ClassifierFreeZeroStarGuidance
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    u, c, p = _branches(3, (2, 4, 8, 8), torch.float32, "cpu")
    cfg = u + 7.5 * (c - u)
    torch.testing.assert_close(R.rescale_noise_cfg(cfg, c, 0.7), rescale_noise_cfg(cfg, c, 0.7), rtol=0, atol=0)
    torch.testing.assert_close(R.guidance_combine([u, c, p], gk.cfg(7.5), rescale=0.7),
                               rescale_noise_cfg(cfg, c, 0.7), rtol=0, atol=0)

    for original in (False, True):
        for momentum in (None, -0.5):
            ours_buf = torch.zeros_like(c) if momentum is not None else None
            theirs_buf = MomentumBuffer(momentum) if momentum is not None else None
            for _step in range(3):  # the buffer persists across steps
                theirs = normalized_guidance(c, u, 5.0, theirs_buf, 0.5, 15.0, original)
                ours = R.apg_combine(c, u, 5.0, eta=0.5, norm_threshold=15.0, momentum=momentum or 0.0,
                                     momentum_buffer=ours_buf,
                                     formulation="diffusers_original" if original else "diffusers")
                torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
                c, u = c + 0.1, u - 0.05

    for original in (False, True):
        guider = ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=0, guidance_rescale=0.3,
                                                use_original_formulation=original)
        guider.set_state(step=3, num_inference_steps=10, timestep=torch.tensor(500))
        theirs = guider.forward(c, u).pred
        ours = R.cfg_zero_star_combine(c, u, 5.0, original_formulation=original, rescale=0.3)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


# --------------------------------------------------------------------------- backends vs reference


def _truth_and_lowp(fn, inputs, **kw):
    return fn(to64(inputs), **kw), fn(inputs, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_guidance_combine_matches_reference(lane, dtype, shape):
    backend, device = lane
    branches = _branches(3, shape, dtype, device)
    stacked = torch.cat(branches)
    guidance = gk.cfg(7.5) + gk.pag(3.0)
    truth = R.guidance_combine(to64(branches), guidance)
    lowp = R.guidance_combine([b.cpu() for b in branches], guidance)
    for pred in (stacked, branches):
        out = gk.guidance_combine(pred, guidance, backend=backend)
        assert out.device.type == device and out.is_contiguous()  # dense inputs: their layout
        assert_close_to_truth(out, lowp, truth, what=f"{backend} {dtype}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_guidance_combine_layouts_and_rescale(lane, layout, dtype):
    backend, device = lane
    branches = [make_strided(b, layout) for b in _branches(4, (3, 5, 6, 7), dtype, device, seed=1)]
    scale = torch.tensor([2.0, 5.0, 9.0], device=device)
    guidance = gk.cfg(scale) + gk.pag(torch.tensor(1.5, device=device), perturbed=2) + gk.seg(2.5, perturbed=3)
    for phi in (0.0, 0.7, torch.tensor([0.0, 0.5, 1.0], device=device)):
        truth = R.guidance_combine(to64(branches), guidance_to64(guidance), rescale=to64(phi))
        lowp = R.guidance_combine([b.cpu() for b in branches], guidance_cpu(guidance), rescale=to_cpu(phi))
        out = gk.guidance_combine(branches, guidance, rescale=phi, backend=backend)
        assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"{backend} {layout} rescale={phi}")


def to_cpu(x):
    return x.cpu() if isinstance(x, torch.Tensor) else x


def _map_guidance(g, fn):
    return gk.Guidance(g.base, tuple(gk.Term(t.pos, t.neg, fn(t.scale)) for t in g.terms))


def guidance_to64(g):
    return _map_guidance(g, to64)


def guidance_cpu(g):
    return _map_guidance(g, to_cpu)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last_output_keeps_the_layout(lane, dtype):
    """A channels-last stacked batch (diffusers' recommended UNet memory format) gives a
    channels-last result, computed in memory order; the APG buffer follows the same layout."""
    backend, device = lane
    pred = torch.cat(_branches(3, (2, 4, 6, 5), dtype, device, seed=6)).contiguous(memory_format=torch.channels_last)
    g = gk.cfg(7.5) + gk.pag(3.0)
    out = gk.guidance_combine(pred, g, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    truth = R.guidance_combine(list(to64(pred).chunk(3)), g)
    assert_close_to_truth(out, R.guidance_combine(list(pred.cpu().chunk(3)), g), truth)
    buf = gk.apg_momentum_buffer(pred[:4])
    assert buf.is_contiguous(memory_format=torch.channels_last) and buf.dtype == torch.float32
    out = gk.apg_combine(pred[:4], 5.0, momentum=-0.5, momentum_buffer=buf, backend=backend)
    ref_buf = torch.zeros(2, 4, 6, 5, dtype=torch.float64)
    truth = R.apg_combine(to64(pred[2:4]), to64(pred[:2]), 5.0, momentum=-0.5, momentum_buffer=ref_buf)
    assert out.is_contiguous(memory_format=torch.channels_last)
    lowp = R.apg_combine(pred[2:4].cpu(), pred[:2].cpu(), 5.0, momentum=-0.5,
                         momentum_buffer=torch.zeros(2, 4, 6, 5, dtype=dtype))
    assert_close_to_truth(out, lowp, truth, factor=4.0)
    torch.testing.assert_close(to64(buf), ref_buf, rtol=1e-5, atol=1e-5)


def test_strided_per_sample_scale_tensors(lane):
    """A per-sample scale that is itself a strided view (e.g. every other entry of a schedule)."""
    backend, device = lane
    u, c, p = _branches(3, (3, 4, 5, 6), torch.float32, device, seed=7)
    schedule = torch.tensor([1.0, 9.0, 2.0, 9.0, 3.0, 9.0], device=device)
    g = gk.cfg(schedule[::2]) + gk.pag(schedule[1::2])
    out = gk.guidance_combine([u, c, p], g, rescale=schedule[::2] / 4, backend=backend)
    expect = R.guidance_combine([u.cpu(), c.cpu(), p.cpu()], guidance_cpu(g), rescale=schedule[::2].cpu() / 4)
    torch.testing.assert_close(out.cpu(), expect, rtol=1e-5, atol=1e-5)
    out = gk.apg_combine([u, c], schedule[::2], backend=backend)
    torch.testing.assert_close(out.cpu(), R.apg_combine(c.cpu(), u.cpu(), schedule[::2].cpu()), rtol=1e-5, atol=1e-5)


def test_stacked_views_and_offsets(lane):
    """A stacked batch taken as a slice of a bigger buffer (offset, batch stride > inner)."""
    backend, device = lane
    big = torch.randn(8, 3, 10, 12, dtype=torch.float32, device=device)
    pred = big[1:7, :, 1:9, 2:11]  # 6 = 3 branches × 2, strided inner dims
    out = gk.guidance_combine(pred, gk.cfg(4.0) + gk.pag(2.0), backend=backend)
    expect = R.guidance_combine(list(pred.cpu().chunk(3)), gk.cfg(4.0) + gk.pag(2.0))
    torch.testing.assert_close(out.cpu(), expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("formulation", APG_FORMULATIONS)
def test_apg_matches_reference(lane, dtype, formulation):
    backend, device = lane
    u, c = _branches(2, (3, 4, 9, 7), dtype, device, seed=2)
    for threshold, momentum in ((0.0, 0.0), (15.0, 0.0), (3.0, -0.5)):
        buf = torch.randn(u.shape, dtype=torch.float32, device=device) if momentum else None
        buf_ref = buf.cpu().double().clone() if buf is not None else None
        buf_lowp = buf.cpu().to(dtype).clone() if buf is not None else None
        kw = dict(eta=0.3, norm_threshold=threshold, momentum=momentum, formulation=formulation, rescale=0.6)
        truth = R.apg_combine(to64(c), to64(u), 5.0, momentum_buffer=buf_ref, **kw)
        lowp = R.apg_combine(c.cpu(), u.cpu(), 5.0, momentum_buffer=buf_lowp, **kw)
        out = gk.apg_combine([u, c], 5.0, momentum_buffer=buf, backend=backend, **kw)
        assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"{backend} thr={threshold} m={momentum}")
        if buf is not None:
            # the buffer is float32 and the inputs are exact in float64: only fp32 rounding remains
            torch.testing.assert_close(to64(buf), buf_ref, rtol=1e-5, atol=1e-5)


def test_apg_momentum_over_steps_matches_diffusers_buffer(lane):
    backend, device = lane
    u, c = _branches(2, (2, 4, 8, 8), torch.float32, device, seed=3)
    buf = gk.apg_momentum_buffer([u, c])
    buf_ref = torch.zeros_like(c, device="cpu")
    for step in range(4):
        out = gk.apg_combine([u, c], 7.5, momentum=-0.5, momentum_buffer=buf, norm_threshold=15.0,
                             formulation="diffusers", backend=backend)
        expect = R.apg_combine(c.cpu(), u.cpu(), 7.5, momentum=-0.5, momentum_buffer=buf_ref, norm_threshold=15.0,
                               formulation="diffusers")
        torch.testing.assert_close(out.cpu(), expect, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(buf.cpu(), buf_ref, rtol=1e-6, atol=1e-6)
        u, c = u * 0.9 + 0.05 * step, c * 0.95


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("original", [False, True])
def test_cfg_zero_star_matches_reference(lane, dtype, original):
    backend, device = lane
    u, c = _branches(2, (3, 4, 5, 9), dtype, device, seed=4)
    scale = torch.tensor([3.0, 5.0, 7.0], device=device)
    for phi in (0.0, 0.4):
        truth = R.cfg_zero_star_combine(to64(c), to64(u), to64(scale), original_formulation=original, rescale=phi)
        lowp = R.cfg_zero_star_combine(c.cpu(), u.cpu(), scale.cpu(), original_formulation=original, rescale=phi)
        out = gk.cfg_zero_star_combine(torch.cat([u, c]), scale, original_formulation=original, rescale=phi,
                                       backend=backend)
        assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"{backend} {dtype} phi={phi}")
    zeros = gk.cfg_zero_star_combine(torch.cat([u, c]), 5.0, zero_init=True, rescale=0.7, backend=backend)
    assert torch.equal(zeros, torch.zeros_like(c))


def test_nan_and_inf_propagate_like_reference(lane):
    backend, device = lane
    u, c, p = _branches(3, (2, 3, 4, 5), torch.float32, device, seed=5)
    c[0, 1, 2, 3] = float("nan")
    p[1, 0, 0, 0] = float("inf")
    g = gk.cfg(7.5) + gk.pag(3.0)
    for phi in (0.0, 0.5):
        out = gk.guidance_combine([u, c, p], g, rescale=phi, backend=backend)
        expect = R.guidance_combine([u.cpu(), c.cpu(), p.cpu()], g, rescale=phi)
        assert torch.equal(torch.isnan(out.cpu()), torch.isnan(expect))
        assert torch.equal(torch.isinf(out.cpu()), torch.isinf(expect))
        finite = torch.isfinite(expect)
        torch.testing.assert_close(out.cpu()[finite], expect[finite], rtol=1e-5, atol=1e-5)


def test_empty_batch_and_single_element(lane):
    backend, device = lane
    empty = torch.empty(0, 4, 8, 8, device=device)
    assert gk.guidance_combine(empty, gk.cfg(5.0), num_branches=2, backend=backend).shape == (0, 4, 8, 8)
    one = torch.randn(2, 1, device=device)  # one element per sample
    out = gk.guidance_combine(one, gk.cfg(5.0), rescale=0.5, backend=backend)  # std of 1 element: NaN
    expect = R.guidance_combine(list(one.cpu().chunk(2)), gk.cfg(5.0), rescale=0.5)
    assert torch.equal(torch.isnan(out.cpu()), torch.isnan(expect))


@pytest.mark.parametrize("lane", [x for x in LANES if x[0] != "torch"], ids=lane_id)
def test_large_offsets_use_int64(lane):
    """Element offsets beyond 2**31 inside one launch (video latents): a batch stride of 2**30 + 7
    puts sample 2 past 2**31 elements. Only ~100 elements are touched, so the storage stays virtual.
    (Kernel lanes only: the torch backend indexes with int64 natively.)"""
    backend, device = lane
    stride = 2**30 + 7
    storage = torch.empty(2 * 3 * stride + 64, dtype=torch.float16, device=device)
    pred = storage.as_strided((6, 16), (stride, 1))
    values = torch.randn(6, 16, dtype=torch.float16)
    pred.copy_(values.to(device))
    out = gk.guidance_combine(pred, gk.cfg(3.0), backend=backend)
    expect = R.guidance_combine(list(values.float().chunk(2)), gk.cfg(3.0)).half()
    torch.testing.assert_close(out.cpu(), expect, rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------- bad input


def _bad(exc, match, *args, fn=gk.guidance_combine, **kw):
    with pytest.raises(exc, match=match):
        fn(*args, **kw)


def test_bad_input_is_rejected_with_the_argument_name():
    x = torch.randn(6, 4, 8, 8)
    g = gk.cfg(7.5) + gk.pag(3.0)
    _bad(ValueError, "pred: leading dimension 5", torch.randn(5, 4), g)
    _bad(ValueError, "num_branches: at most 8", torch.randn(18, 4), gk.cfg(2.0), num_branches=9)
    _bad(ValueError, "guidance: refers to branch 2", x[:4], g, num_branches=2)
    _bad(ValueError, "guidance: refers to branch 7 but only 3 branches", x,
         gk.cfg(2.0) + gk.pag(1.0, perturbed=7), num_branches=3)
    _bad(ValueError, r"guidance.terms\[1\].neg: branch index -1 out of range", x,
         gk.cfg(2.0) + gk.pag(1.0, perturbed=-1), num_branches=3)
    _bad(TypeError, "pred: expected a floating-point tensor", torch.ones(6, 4, dtype=torch.int64), g)
    _bad(TypeError, r"pred\[1\]: has dtype", [x[:2], x[2:4].half(), x[4:]], g)
    _bad(ValueError, r"pred\[2\]: shape", [x[:2], x[2:4], x[4:, :2]], g)
    _bad(ValueError, "must be finite", x, gk.cfg(float("nan")))
    _bad(ValueError, "must be finite", x, gk.cfg(float("inf")))
    _bad(ValueError, "scale tensor contains NaN", x, gk.cfg(torch.tensor([1.0, float("nan")])), num_branches=3)
    _bad(ValueError, r"scale tensor must have shape \(\), \(1,\) or \(2,\)", x, gk.cfg(torch.ones(3)),
         num_branches=3)
    _bad(TypeError, "scale tensor must be floating point", x, gk.cfg(torch.tensor(3)))
    _bad(ValueError, "rescale: must be finite", x, g, rescale=float("nan"))
    _bad(ValueError, "pred: per-sample statistics", torch.randn(6), g, rescale=0.5)
    _bad(ValueError, "pred: per-sample statistics", torch.randn(4), 5.0, fn=gk.apg_combine)
    _bad(ValueError, "pred: per-sample statistics", torch.randn(4), 5.0, fn=gk.cfg_zero_star_combine)
    _bad(TypeError, "guidance: expected a Guidance", x, [(1, 0, 7.5)])
    _bad(ValueError, "guidance: at most 8 terms", x, gk.Guidance(0, tuple(gk.Term(1, 0, 1.0) for _ in range(9))))
    _bad(ValueError, "backend='nope'", x, g, backend="nope")
    _bad(ValueError, "momentum_buffer: required", x[:4], 5.0, momentum=0.5, fn=gk.apg_combine)
    _bad(ValueError, "momentum_buffer: shape", x[:4], 5.0, momentum_buffer=torch.zeros(3, 4, 8, 8),
         fn=gk.apg_combine)
    _bad(ValueError, "momentum_buffer: strides .* create it with apg_momentum_buffer", x[:4], 5.0,
         momentum_buffer=torch.zeros(2, 8, 8, 4).permute(0, 3, 1, 2), fn=gk.apg_combine)
    _bad(ValueError, "formulation: must be one of", x[:4], 5.0, formulation="comfy", fn=gk.apg_combine)
    _bad(ValueError, "norm_threshold: must be >= 0", x[:4], 5.0, norm_threshold=-1.0, fn=gk.apg_combine)
    _bad(ValueError, "uncond: branch index 4 out of range", x, 5.0, uncond=4, num_branches=3,
         fn=gk.cfg_zero_star_combine)
    _bad(TypeError, "zero_init: expected a bool", x[:4], 5.0, zero_init=1, fn=gk.cfg_zero_star_combine)


def test_mixed_devices_are_rejected():
    meta = torch.empty(2, 4, device="meta")
    with pytest.raises(ValueError, match=r"pred\[1\]: is on meta"):
        gk.guidance_combine([torch.randn(2, 4), meta], gk.cfg(2.0))
    with pytest.raises(ValueError, match="scale tensor is on meta"):
        gk.guidance_combine(torch.randn(4, 4), gk.cfg(torch.empty((), device="meta")))


def test_forced_backend_that_cannot_serve_explains_why():
    x = torch.randn(4, 8)
    with pytest.raises(gk.BackendError, match="cuda.*(not built|device type)"):
        gk.guidance_combine(x, gk.cfg(2.0), backend="cuda")
    with gk.use_backend("cuda"):
        with pytest.raises(gk.BackendError):
            gk.guidance_combine(x, gk.cfg(2.0))
    with gk.use_backend(guidance_combine="torch"):
        gk.guidance_combine(x, gk.cfg(2.0))
    x64 = x.double()  # float64 is served by the torch backend only
    gk.guidance_combine(x64, gk.cfg(2.0))
    with pytest.raises(gk.BackendError, match="dtype torch.float64"):
        gk.guidance_combine(x64, gk.cfg(2.0), backend="triton")


# --------------------------------------------------------------------------- opcheck and compile


def _opcheck_cases(device):
    u, c, p = _branches(3, (2, 3, 4, 5), torch.float32, device)
    stacked = torch.cat([u, c, p])
    scale = torch.tensor([2.0, 3.0], device=device)
    ops = torch.ops.guidance_kernels
    yield ops.guidance_combine, ([stacked], 3, 0, [1, 1], [0, 2], [7.5, 0.0], [None, scale], 0.5, None, 1, "torch")
    yield ops.guidance_combine, ([u, c, p], 3, 0, [1], [0], [7.5], [None], 0.0, scale, 1, "torch")
    yield ops.apg_combine, ([u, c], 2, 1, 0, 5.0, scale, 0.5, 15.0, "paper", 0.3, None, "torch")
    yield ops.apg_combine_momentum, ([u, c], 2, 1, 0, 5.0, None, 0.5, 15.0, -0.5, torch.randn_like(u), "diffusers",
                                     0.0, None, "torch")
    yield ops.cfg_zero_star_combine, ([torch.cat([u, c])], 2, 1, 0, 0.0, scale, False, 0.0, None, "torch")


def test_opcheck_every_op():
    for op, args in _opcheck_cases("cpu"):
        torch.library.opcheck(op, args)


def test_compile_fullgraph_no_recompile_when_scales_change():
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

    buf = torch.zeros(2, 4, 8, 8)  # APG momentum buffer, updated in place by every call

    def step(pred, s, pag_scale, phi, w):
        out = gk.guidance_combine(pred, gk.cfg(s) + gk.pag(pag_scale), rescale=phi)
        out2 = gk.apg_combine(pred[:4], w, norm_threshold=15.0) + gk.apg_combine(
            pred[2:], w, momentum=-0.5, momentum_buffer=buf)
        out3 = gk.cfg_zero_star_combine(pred[:4], w)
        return out + out2 + out3

    compiled = torch.compile(step, fullgraph=True, backend=counter)
    pred = torch.randn(6, 4, 8, 8)
    for i in range(4):
        s, ps, phi, w = (torch.tensor(v) for v in (7.5 - i, 3.0 * i, 0.1 * i, 4.0 + i))
        saved = buf.clone()
        got = compiled(pred, s, ps, phi, w)
        after = buf.clone()
        buf.copy_(saved)
        torch.testing.assert_close(got, step(pred, s, ps, phi, w), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(after, buf, rtol=1e-6, atol=1e-6)  # the in-place update happened once
    assert counter.frame_count == 1


def test_compile_python_float_scales_recompile_at_most_once():
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(lambda pred, s: gk.guidance_combine(pred, gk.cfg(s) + gk.pag(s / 2)), fullgraph=True,
                             backend=counter)
    pred = torch.randn(6, 4, 8, 8)
    for s in (7.5, 6.0, 5.0, 4.0, 3.0):
        torch.testing.assert_close(compiled(pred, s), gk.guidance_combine(pred, gk.cfg(s) + gk.pag(s / 2)))
    assert counter.frame_count <= 2


# --------------------------------------------------------------------------- decided rules for bad and non-finite input


def _constant_samples(device, dtype=torch.float32):
    """Three branches whose every sample is constant (0.3, −0.7, 1.1) plus an all-zero batch."""
    return torch.cat([torch.full((2, 3, 4, 5), v, dtype=dtype, device=device) for v in (0.3, -0.7, 1.1)])


def test_rescale_of_constant_samples_is_nan_on_every_backend(lane):
    """std of a constant sample is exactly 0 (torch.std's Welford): the rescale ratio is 0/0 = NaN,
    as torch, the reference and diffusers give — for constant and for all-zero samples alike."""
    backend, device = lane
    g = gk.cfg(7.5) + gk.pag(3.0)
    for pred in (_constant_samples(device), torch.zeros(6, 3, 4, 5, device=device)):
        expect = R.guidance_combine(list(pred.cpu().chunk(3)), g, rescale=0.7)
        assert torch.isnan(expect).all()
        assert torch.isnan(gk.guidance_combine(pred, g, rescale=0.7, backend=backend)).all()
        two = pred[:4]
        for fn in (gk.apg_combine, gk.cfg_zero_star_combine, gk.tcfg_combine, gk.mag_combine):
            out = fn(two, 5.0, rescale=0.5, backend=backend)
            assert torch.isnan(out).all(), fn.__name__


def test_cfg_zero_star_inf_propagates_per_element(lane):
    """alpha is a plain sum: an inf in cond makes it ±inf and the original formulation gives ±inf
    per element (not a NaN sample), exactly as torch."""
    backend, device = lane
    u, c = _branches(2, (2, 3, 4, 5), torch.float32, "cpu", seed=11)
    c[0, 0, 0, 0] = float("inf")
    for original in (True, False):
        expect = R.cfg_zero_star_combine(c, u, 5.0, original_formulation=original)
        out = gk.cfg_zero_star_combine([u.to(device), c.to(device)], 5.0, original_formulation=original,
                                       backend=backend).cpu()
        assert torch.equal(torch.isnan(out), torch.isnan(expect)), original
        assert torch.equal(torch.isposinf(out), torch.isposinf(expect)) and torch.equal(torch.isneginf(out),
                                                                                        torch.isneginf(expect))
        finite = torch.isfinite(expect)
        torch.testing.assert_close(out[finite], expect[finite], rtol=1e-5, atol=1e-5)


def test_nan_propagates_through_min_max(lane):
    """APG's min(1, r/‖d‖) and F.normalize's max(‖c‖, eps) keep a NaN (torch.minimum semantics)."""
    backend, device = lane
    u, c = _branches(2, (2, 3, 4, 5), torch.float32, device, seed=12)
    c[1, 0, 0, 0] = float("nan")
    out = gk.apg_combine([u, c], 5.0, norm_threshold=2.0, backend=backend).cpu()
    expect = R.apg_combine(c.cpu(), u.cpu(), 5.0, norm_threshold=2.0)
    assert torch.equal(torch.isnan(out), torch.isnan(expect)) and torch.isnan(out[1]).all()


def test_fp32_plain_combine_is_bit_exact(lane):
    """One rounding per operation in the anchors' order (``u + s·(c − u) + p·(c − perturbed)``):
    fp32 results equal the eager formula bit for bit, numbers and per-sample tensors alike."""
    backend, device = lane
    u, c, p = _branches(3, (3, 4, 5, 7), torch.float32, device, seed=13)
    per_sample = torch.tensor([2.5, 7.5, -1.25], device=device)
    for g in (gk.cfg(7.5) + gk.pag(3.0), gk.cfg(per_sample) + gk.pag(torch.tensor(1.7, device=device)),
              gk.autoguidance(2.0) + gk.pag(-1.5)):
        out = gk.guidance_combine([u, c, p], g, backend=backend)
        assert torch.equal(out, R.guidance_combine([u, c, p], g)), backend


def test_rescale_sign_rule():
    """A negative Python number is refused; a tensor φ is applied as given on CUDA (never read on
    the host) and checked on the CPU."""
    x = torch.randn(6, 4, 8, 8)
    g = gk.cfg(7.5) + gk.pag(3.0)
    with pytest.raises(ValueError, match="guidance_combine: rescale: must be >= 0"):
        gk.guidance_combine(x, g, rescale=-0.5)
    with pytest.raises(ValueError, match="guidance_combine: rescale: scale tensor values must be >= 0"):
        gk.guidance_combine(x, g, rescale=torch.tensor(-0.5))
    for fn in (gk.apg_combine, gk.cfg_zero_star_combine, gk.tcfg_combine, gk.mag_combine):
        with pytest.raises(ValueError, match=f"{fn.__name__}: rescale: must be >= 0"):
            fn(x[:4], 5.0, rescale=-0.1)


def test_zero_init_keeps_the_layout(lane):
    backend, device = lane
    pred = torch.randn(4, 3, 5, 6, device=device).contiguous(memory_format=torch.channels_last)
    zeros = gk.cfg_zero_star_combine(pred, 5.0, zero_init=True, backend=backend)
    assert zeros.is_contiguous(memory_format=torch.channels_last) and not zeros.any()
    assert zeros.stride() == gk.cfg_zero_star_combine(pred, 5.0, backend=backend).stride()


def test_momentum_buffer_aliasing_an_input_is_refused():
    p2 = torch.randn(4, 3, 5, 6)
    for buf in (p2[2:4], p2[:2], p2.view(-1)[7:7 + 180].view(2, 3, 5, 6)):
        with pytest.raises(ValueError, match="apg_combine: momentum_buffer: shares memory with pred"):
            gk.apg_combine(p2, 5.0, momentum=-0.5, momentum_buffer=buf)
    separate = [p2[:2].clone(), p2[2:].clone()]
    with pytest.raises(ValueError, match="momentum_buffer: shares memory with pred"):
        gk.apg_combine(separate, 5.0, momentum=-0.5, momentum_buffer=separate[0])
    before = p2.clone()
    gk.apg_combine(p2, 5.0, momentum=-0.5, momentum_buffer=gk.apg_momentum_buffer(p2))
    assert torch.equal(p2, before)


def test_errors_name_the_argument_the_caller_passed():
    p = torch.randn(6, 3, 4, 5)
    p2 = p[:4]
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=r"guidance_combine: guidance.terms\[0\].scale: 1e\+39 is beyond the float32"):
            gk.guidance_combine(p, gk.cfg(1e39), backend=backend)
    with pytest.raises(ValueError, match="apg_combine: eta: .* beyond the float32 range"):
        gk.apg_combine(p2, 5.0, eta=1e39)
    with pytest.raises(ValueError, match=r"scale tensor contains NaN or inf \(in float32\)"):
        gk.guidance_combine(p, gk.cfg(torch.tensor(1e39, dtype=torch.float64)))
    with pytest.raises(TypeError, match="Term: pos: branch index must be an int, got 1.0"):
        gk.Term(1.0, 0, 1.0)
    with pytest.raises(TypeError, match="Term: neg: branch index must be an int, got tensor"):
        gk.Term(1, torch.tensor(0), 1.0)
    with pytest.raises(TypeError, match="Guidance: base: branch index must be an int, got 1.5"):
        gk.Guidance(1.5)
    with pytest.raises(TypeError, match="Term: pos: branch index must be an int, got 'a'"):
        gk.Term("a", 0, 1.0)
    with pytest.raises(TypeError, match="Term: neg: branch index must be an int, got None"):
        gk.Term(1, None, 1.0)
    with pytest.raises(TypeError, match="Term: scale: expected a real number or a tensor, got str"):
        gk.Term(1, 0, "7.5")
    with pytest.raises(TypeError, match=r"Guidance: terms\[0\]: expected a Term"):
        gk.Guidance(0, ((1, 0, 7.5),))
    for fn in (gk.apg_combine, gk.cfg_zero_star_combine, gk.tcfg_combine, gk.mag_combine):
        with pytest.raises(ValueError, match=f"{fn.__name__}: cond: branch index 2 implies num_branches=3"):
            fn(p2, 5.0, cond=2)
        with pytest.raises(ValueError, match=f"{fn.__name__}: cond: branch index 2 out of range for 2 branches"):
            fn([p2[:2], p2[2:]], 5.0, cond=2)
        with pytest.raises(TypeError, match=f"{fn.__name__}: cond: branch index must be an int"):
            fn(p2, 5.0, cond=1.0)
    with pytest.raises(TypeError, match="cfg_zero_star_combine: original_formulation: expected a bool"):
        gk.cfg_zero_star_combine(p2, 5.0, original_formulation="no")
    with pytest.raises(ValueError, match="apg_momentum_buffer: pred: leading dimension 5 is not divisible"):
        gk.apg_momentum_buffer(torch.randn(5, 3), num_branches=2)
    with pytest.raises(ValueError, match="apg_momentum_buffer: num_branches: must be a positive int"):
        gk.apg_momentum_buffer(p2, num_branches=0)
    with pytest.raises(TypeError, match="apg_momentum_buffer: pred: expected a tensor or a sequence"):
        gk.apg_momentum_buffer("x")
    assert gk.apg_momentum_buffer([p2[:2], p2[2:]]).shape == (2, 3, 4, 5)
    with pytest.raises(ValueError, match="adaptive_pag_scale: adaptive_scale: must be finite"):
        gk.adaptive_pag_scale(3.0, float("nan"), 500)
    with pytest.raises(ValueError, match="adaptive_pag_scale: timestep: must be finite"):
        gk.adaptive_pag_scale(3.0, 0.1, float("inf"))


# --------------------------------------------------------------------------- the memo of validated calls


def test_a_repeated_call_is_validated_once_and_the_memo_keeps_no_tensor(monkeypatch):
    import gc
    import weakref

    from guidance_kernels.ops import guidance_combine as module

    plans = []
    real = module._combine_plan
    monkeypatch.setattr(module, "_combine_plan", lambda *a: plans.append(a[0].shape) or real(*a))
    monkeypatch.setattr(module, "_PLANS", module._plans.Memo())
    pred = torch.randn(3, 2, 5, 4)
    first = gk.guidance_combine(pred, gk.cfg(7.5) + gk.pag(3.0), backend="torch")
    again = gk.guidance_combine(pred.clone(), gk.cfg(7.5) + gk.pag(3.0), backend="torch")  # a new, equal guidance
    assert torch.equal(first, again) and len(plans) == 1
    gk.guidance_combine(pred[:, :, :4], gk.cfg(7.5) + gk.pag(3.0), backend="torch")  # another layout
    gk.guidance_combine(pred, gk.cfg(7.0) + gk.pag(3.0), backend="torch")  # another scale
    gk.guidance_combine(pred, gk.cfg(torch.tensor(7.5)) + gk.pag(3.0), backend="torch")  # tensor scale: no memo
    gk.guidance_combine(pred, gk.cfg(torch.tensor(7.5)) + gk.pag(3.0), backend="torch")
    assert len(plans) == 5
    alive = weakref.ref(pred)
    del pred, first, again
    gc.collect()
    assert alive() is None


def test_a_memoised_call_still_rejects_what_its_first_call_did_not_see():
    pred = torch.randn(3, 2, 5, 4)
    gk.guidance_combine(pred, gk.cfg(7.5) + gk.pag(3.0))
    with pytest.raises(ValueError, match=r"guidance_combine: guidance.terms\[0\].scale: must be finite"):
        gk.guidance_combine(pred, gk.cfg(float("nan")) + gk.pag(3.0))
    with pytest.raises(ValueError, match="guidance_combine: pred: leading dimension 4"):
        gk.guidance_combine(torch.randn(4, 2, 5, 4), gk.cfg(7.5) + gk.pag(3.0))
    with pytest.raises(TypeError, match="guidance_combine: pred: expected a floating-point tensor"):
        gk.guidance_combine(torch.ones(3, 2, 5, 4, dtype=torch.int32), gk.cfg(7.5) + gk.pag(3.0))
    with pytest.raises(gk.backends.BackendError, match="guidance_combine: backend 'cuda' cannot serve"):
        with gk.use_backend(guidance_combine="cuda"):  # the forcing in effect is part of the memo's key
            gk.guidance_combine(pred, gk.cfg(7.5) + gk.pag(3.0))
    grad = pred.clone().requires_grad_(True)  # the memo's call still dispatches what needs autograd
    assert gk.guidance_combine(grad, gk.cfg(7.5) + gk.pag(3.0)).shape == (1, 2, 5, 4)
