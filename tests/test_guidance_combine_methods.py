"""tcfg_combine, mag_combine and the APG-mix formulations of apg_combine: the references against the
anchors' own functions (diffusers' guiders; ComfyUI's TCFG node written out from its code), every
backend against a float64 truth (flash-attention tolerance rule), TCFG's degenerate cases, bad
input, opcheck and torch.compile without recompiles when scales change."""

from __future__ import annotations

import pytest
import torch

import guidance_kernels as gk
from guidance_kernels import reference as R
from conftest import LANES, lane_id
from helpers import DTYPES, assert_close_to_truth, make_strided, to64

SHAPES = [(1, 4, 5, 7), (3, 16, 33)]


def _pair(shape, dtype, device, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(shape, generator=g, dtype=torch.float64)
    u = c + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    return c.to(device=device, dtype=dtype), u.to(device=device, dtype=dtype)


def _cpu(x):
    return x.cpu() if isinstance(x, torch.Tensor) else x


# --------------------------------------------------------------------------- references vs the anchors


def test_tcfg_reference_matches_diffusers_and_comfyui():
    pytest.importorskip("diffusers", reason="the anchor is diffusers' guider (pyproject [test])")
    from diffusers.guiders.tangential_classifier_free_guidance import TangentialClassifierFreeGuidance, normalized_guidance

    c, u = _pair((2, 4, 8, 8), torch.float32, "cpu", seed=1)
    for original in (False, True):
        torch.testing.assert_close(R.tcfg_combine(c, u, 5.0, original_formulation=original),
                                   normalized_guidance(c, u, 5.0, original), rtol=0, atol=0)
        guider = TangentialClassifierFreeGuidance(guidance_scale=5.0, guidance_rescale=0.4,
                                                  use_original_formulation=original)
        guider.set_state(step=2, num_inference_steps=10, timestep=torch.tensor(500))
        torch.testing.assert_close(R.tcfg_combine(c, u, 5.0, original_formulation=original, rescale=0.4),
                                   guider.forward(c, u).pred, rtol=0, atol=0)
    # ComfyUI's TCFG node (pre-CFG): scores x − D, the SVD of [uncond score; cond score], the uncond
    # score replaced by its projection on v1, uncond := x − projected score, then ComfyUI's CFG.
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    c64, u64 = c.double(), u.double()
    scores = torch.cat([(x - u64).reshape(2, 1, -1), (x - c64).reshape(2, 1, -1)], dim=1)
    v1 = torch.linalg.svd(scores, full_matrices=False)[2][:, 0:1, :]
    uncond_td = ((x - u64).reshape(2, 1, -1) @ v1.transpose(-2, -1)) * v1
    uncond_pred = x - uncond_td.reshape(x.shape)
    comfy = uncond_pred + 5.0 * (c64 - uncond_pred)
    # In our terms: x − tcfg(cond score, uncond score).
    ours = x - gk.tcfg_combine([x - u64, x - c64], 5.0)
    torch.testing.assert_close(ours, comfy, rtol=1e-12, atol=1e-12)


def test_mag_reference_matches_diffusers():
    pytest.importorskip("diffusers", reason="the anchor is diffusers' guider (pyproject [test])")
    from diffusers.guiders.magnitude_aware_guidance import MagnitudeAwareGuidance, mambo_guidance

    c, u = _pair((2, 16, 33), torch.float32, "cpu", seed=3)  # 3-D: the anchor's torch.norm(dim=[1, 2]) works
    for original in (False, True):
        torch.testing.assert_close(R.mag_combine(c, u, 7.0, alpha=2.0, original_formulation=original),
                                   mambo_guidance(c, u, 7.0, 2.0, original), rtol=0, atol=0)
        guider = MagnitudeAwareGuidance(guidance_scale=7.0, alpha=2.0, guidance_rescale=0.5,
                                        use_original_formulation=original)
        guider.set_state(step=1, num_inference_steps=10, timestep=torch.tensor(500))
        torch.testing.assert_close(R.mag_combine(c, u, 7.0, alpha=2.0, original_formulation=original, rescale=0.5),
                                   guider.forward(c, u).pred, rtol=0, atol=0)
    # The anchor's bug on 4-D latents: three dims make torch.norm a matrix norm, which raises.
    c4, u4 = _pair((2, 4, 8, 8), torch.float32, "cpu", seed=4)
    with pytest.raises(RuntimeError):
        mambo_guidance(c4, u4, 7.0)
    flat = mambo_guidance(c4.flatten(1), u4.flatten(1), 7.0).view_as(c4)  # its meaning: the Frobenius norm
    torch.testing.assert_close(R.mag_combine(c4, u4, 7.0), flat, rtol=0, atol=0)


def test_apg_mix_reference_matches_diffusers_over_steps():
    pytest.importorskip("diffusers", reason="the anchor is diffusers' guider (pyproject [test])")
    from diffusers.guiders.adaptive_projected_guidance_mix import AdaptiveProjectedMixGuidance, MomentumBuffer

    for original in (False, True):
        guider = AdaptiveProjectedMixGuidance(guidance_rescale=0.3, adaptive_projected_guidance_start_step=2,
                                              eta=0.25, use_original_formulation=original)
        c, u = _pair((2, 4, 8, 8), torch.float32, "cpu", seed=5)
        buf = torch.zeros_like(c)
        for step in range(6):
            guider.set_state(step=step, num_inference_steps=10, timestep=torch.tensor(900 - 100 * step))
            if step == 0:  # what prepare_inputs does at step 0
                guider.momentum_buffer = MomentumBuffer(guider.adaptive_projected_guidance_momentum)
            theirs = guider.forward(c, u).pred
            kw = gk.apg_mix(step, start_step=2, eta=0.25, original_formulation=original)
            ours = R.apg_combine(c, u, kw.pop("scale"), momentum_buffer=buf, rescale=0.3, **kw)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=f"step {step}")
            torch.testing.assert_close(buf, guider.momentum_buffer.running_average, rtol=0, atol=0)
            c, u = c * 0.9 + 0.05, u * 0.95 - 0.02


def test_apg_mix_arguments():
    cfg = gk.apg_mix(3, start_step=5)
    assert cfg == {"scale": 3.5, "formulation": "cfg", "eta": 1.0, "norm_threshold": 0.0, "momentum": -0.5}
    apg = gk.apg_mix(6, start_step=5, original_formulation=True)
    assert apg == {"scale": 10.0, "formulation": "diffusers_original", "eta": 0.0, "norm_threshold": 10.0,
                   "momentum": -0.5}
    assert gk.apg_mix(0, momentum=None)["momentum"] == 0.0
    with pytest.raises(ValueError, match="apg_mix: step: must be >= 0"):
        gk.apg_mix(-1)
    with pytest.raises(TypeError, match="apg_mix: original_formulation: expected a bool"):
        gk.apg_mix(1, original_formulation="no")


# --------------------------------------------------------------------------- backends vs the float64 truth


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tcfg_and_mag_match_truth(lane, dtype, shape):
    backend, device = lane
    c, u = _pair(shape, dtype, device, seed=6)
    scale = torch.linspace(2.0, 8.0, shape[0], device=device)
    per_sample_phi = torch.linspace(0.2, 0.9, shape[0], device=device)
    # (original formulation, φ, stacked): every option at least once, a number and a tensor φ
    for original, phi, stacked in ((False, 0.0, True), (True, 0.5, False), (False, per_sample_phi, False),
                                   (True, per_sample_phi, True)):
        pred = torch.cat([u, c]) if stacked else [u, c]
        truth = R.tcfg_combine(to64(c), to64(u), to64(scale), original_formulation=original, rescale=to64(phi))
        lowp = R.tcfg_combine(c.cpu(), u.cpu(), scale.cpu(), original_formulation=original, rescale=_cpu(phi))
        out = gk.tcfg_combine(pred, scale, original_formulation=original, rescale=phi, backend=backend)
        assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"tcfg {backend} orig={original} phi={phi}")
        truth = R.mag_combine(to64(c), to64(u), to64(scale), alpha=3.0, original_formulation=original,
                              rescale=to64(phi))
        lowp = R.mag_combine(c.cpu(), u.cpu(), scale.cpu(), alpha=3.0, original_formulation=original,
                             rescale=_cpu(phi))
        out = gk.mag_combine(pred, scale, alpha=3.0, original_formulation=original, rescale=phi, backend=backend)
        assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"mag {backend} orig={original} phi={phi}")


@pytest.mark.parametrize("layout", ["permuted", "sliced", "transposed"])
def test_tcfg_and_mag_any_layout(lane, layout):
    backend, device = lane
    c, u = (make_strided(x, layout) for x in _pair((2, 5, 6, 7), torch.float32, device, seed=7))
    pred = torch.cat([u, c]).contiguous(memory_format=torch.channels_last) if layout == "permuted" else [u, c]
    branches = list(pred.chunk(2)) if isinstance(pred, torch.Tensor) else pred
    out = gk.tcfg_combine(pred, 6.0, rescale=0.7, backend=backend)
    if isinstance(pred, torch.Tensor):
        assert out.is_contiguous(memory_format=torch.channels_last)
    uu, cc = branches
    truth = R.tcfg_combine(to64(cc), to64(uu), 6.0, rescale=0.7)
    assert_close_to_truth(out, R.tcfg_combine(cc.cpu(), uu.cpu(), 6.0, rescale=0.7), truth, factor=4.0)
    out = gk.mag_combine(pred, 6.0, alpha=1.0, rescale=0.7, backend=backend)
    truth = R.mag_combine(to64(cc), to64(uu), 6.0, alpha=1.0, rescale=0.7)
    assert_close_to_truth(out, R.mag_combine(cc.cpu(), uu.cpu(), 6.0, alpha=1.0, rescale=0.7), truth, factor=4.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apg_mix_over_steps_matches_truth(lane, dtype):
    """Several steps through the CFG phase into the APG phase, one momentum buffer (float32 and
    the prediction dtype)."""
    backend, device = lane
    c, u = _pair((2, 4, 9, 7), dtype, device, seed=8)
    for buf_dtype in (torch.float32, dtype):
        buf = torch.zeros(c.shape, dtype=buf_dtype, device=device)
        truth_buf = torch.zeros(c.shape, dtype=torch.float64)
        lowp_buf = torch.zeros(c.shape, dtype=dtype)
        for step in range(5):
            kw = gk.apg_mix(step, start_step=2, eta=0.5)
            scale = kw.pop("scale")
            truth = R.apg_combine(to64(c), to64(u), scale, momentum_buffer=truth_buf, rescale=0.2, **kw)
            lowp = R.apg_combine(c.cpu(), u.cpu(), scale, momentum_buffer=lowp_buf, rescale=0.2, **kw)
            out = gk.apg_combine([u, c], scale, momentum_buffer=buf, rescale=0.2, backend=backend, **kw)
            assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"step {step} buffer {buf_dtype}")
            tol = 1e-5 if buf_dtype == torch.float32 else 4 * 2.0 ** -(8 if dtype == torch.bfloat16 else 11)
            torch.testing.assert_close(to64(buf), truth_buf, rtol=tol, atol=tol)
            c, u = c * 0.9 + 0.05, u * 0.95 - 0.02


def test_tcfg_degenerate_cases(lane):
    """c ∥ u (rank 1): u' = u, TCFG is plain CFG; c = 0: u' = u; u = 0: u' = 0; c ⟂ u with equal
    norms (two equal singular values): cond's direction, u' = 0 (diffusers' SVD answer)."""
    backend, device = lane
    e = torch.zeros(4, 2, 3, 4, dtype=torch.float64)
    c = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    e[0], e[1] = c, -0.5 * c          # parallel
    e[2], e[3] = 0.0, c               # c = 0 (uncond nonzero)
    parallel_c = torch.stack([c, torch.zeros_like(c)])
    parallel_u = torch.stack([-0.5 * c, c])
    # batch of 2: sample 0 parallel, sample 1 zero cond
    cond = torch.stack([e[0], e[2]]).float().to(device)
    uncond = torch.stack([e[1], e[3]]).float().to(device)
    out = gk.tcfg_combine([uncond, cond], 3.0, backend=backend).cpu().double()
    expect = parallel_u + 3.0 * (parallel_c - parallel_u)  # u' = u: plain CFG
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    # u = 0 -> u' = 0 -> out = s·c; orthogonal equal norms -> u' = 0 -> out = s·c
    o1 = torch.zeros(2, 3, 4, dtype=torch.float64)
    o2 = torch.zeros(2, 3, 4, dtype=torch.float64)
    o1[0, 0, 0], o2[0, 1, 0] = 2.0, 2.0
    cond = torch.stack([c, o1]).float().to(device)
    uncond = torch.stack([torch.zeros_like(c), o2]).float().to(device)
    out = gk.tcfg_combine([uncond, cond], 3.0, backend=backend).cpu().double()
    torch.testing.assert_close(out, 3.0 * torch.stack([c, o1]), rtol=1e-6, atol=1e-6)
    assert torch.equal(R.tcfg_combine(torch.stack([c, o1]), torch.stack([torch.zeros_like(c), o2]), 3.0),
                       3.0 * torch.stack([c, o1]))  # the SVD agrees
    zeros = torch.zeros(2, 2, 3, device=device)
    assert torch.equal(gk.tcfg_combine(zeros, 5.0, backend=backend), torch.zeros(1, 2, 3, device=device))


def test_non_finite_samples(lane):
    """TCFG: a sample holding inf or NaN becomes NaN (the SVD anchor raises); MAG follows its formula
    (an inf in cond: ratio inf, s' = 1, out = cond there)."""
    backend, device = lane
    c, u = _pair((2, 3, 4, 5), torch.float32, device, seed=10)
    c[0, 1, 2, 3] = float("inf")
    out = gk.tcfg_combine([u, c], 4.0, backend=backend)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
    out = gk.mag_combine([u, c], 4.0, backend=backend).cpu()
    expect = R.mag_combine(c.cpu(), u.cpu(), 4.0)
    assert torch.equal(torch.isnan(out), torch.isnan(expect)) and torch.equal(torch.isinf(out), torch.isinf(expect))
    finite = torch.isfinite(expect)
    torch.testing.assert_close(out[finite], expect[finite], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bad input, opcheck, compile


def test_bad_input_names_the_argument():
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="mag_combine: alpha: must be >= 0"):
        gk.mag_combine(x, 5.0, alpha=-1.0)
    with pytest.raises(TypeError, match="mag_combine: alpha: expected a real number"):
        gk.mag_combine(x, 5.0, alpha=torch.tensor(1.0))
    with pytest.raises(TypeError, match="tcfg_combine: original_formulation: expected a bool"):
        gk.tcfg_combine(x, 5.0, original_formulation="no")
    with pytest.raises(ValueError, match="tcfg_combine: cond: branch index 2 implies num_branches=3"):
        gk.tcfg_combine(x, 5.0, cond=2)
    with pytest.raises(ValueError, match="tcfg_combine: pred: per-sample statistics"):
        gk.tcfg_combine(torch.randn(4), 5.0)
    with pytest.raises(ValueError, match=r"tcfg_combine: scale: scale tensor must have shape"):
        gk.tcfg_combine(x, torch.ones(3))
    with pytest.raises(ValueError, match="apg_combine: formulation: 'cfg' is plain CFG"):
        gk.apg_combine(x, 5.0, formulation="cfg", norm_threshold=15.0)


def test_opcheck():
    c, u = _pair((2, 3, 4, 5), torch.float32, "cpu", seed=11)
    scale = torch.tensor([2.0, 3.0])
    ops = torch.ops.guidance_kernels
    for args in (([torch.cat([u, c])], 2, 1, 0, 5.0, None, False, 0.0, None, "torch"),
                 ([u, c], 2, 1, 0, 0.0, scale, True, 0.4, None, "torch")):
        torch.library.opcheck(ops.tcfg_combine, args)
    for args in (([torch.cat([u, c])], 2, 1, 0, 5.0, None, 8.0, False, 0.0, None, "torch"),
                 ([u, c], 2, 1, 0, 0.0, scale, 2.0, True, 0.0, scale, "torch")):
        torch.library.opcheck(ops.mag_combine, args)
    torch.library.opcheck(ops.apg_combine_momentum, ([u, c], 2, 1, 0, 5.0, None, 1.0, 0.0, -0.5, torch.zeros_like(u),
                                                     "cfg", 0.0, None, "torch"))


def test_compile_fullgraph_no_recompile_when_scales_change():
    import torch._dynamo.testing

    # aot_eager: dynamo's guards (what recompiles) and the fakes; inductor is covered for the family
    # in test_guidance_combine.py.
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    buf = torch.zeros(2, 4, 8, 8)

    def step(pred, s, phi):
        return (gk.tcfg_combine(pred, s, rescale=phi) + gk.mag_combine(pred, s, alpha=4.0)
                + gk.apg_combine(pred, s, formulation="cfg", momentum=-0.5, momentum_buffer=buf))

    compiled = torch.compile(step, fullgraph=True, backend=counter)
    pred = torch.randn(4, 4, 8, 8)
    for i in range(3):
        s, phi = torch.tensor(5.0 + i), torch.tensor(0.1 * i)
        saved = buf.clone()
        got = compiled(pred, s, phi)
        buf.copy_(saved)
        torch.testing.assert_close(got, step(pred, s, phi), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.parametrize("lane", [x for x in LANES if x[0] != "torch"], ids=lane_id)
def test_kernel_lanes_agree_with_torch_backend(lane):
    """The same inputs through a kernel backend and the torch backend (which runs the same closed
    forms): close in fp32, and NaN where the torch backend is."""
    backend, device = lane
    c, u = _pair((3, 4, 6, 10), torch.float32, device, seed=12, spread=1.0)
    for fn, kw in ((gk.tcfg_combine, {}), (gk.mag_combine, {"alpha": 0.5})):
        for original in (False, True):
            a = fn([u, c], 2.5, original_formulation=original, rescale=0.3, backend=backend, **kw).cpu()
            b = fn([u.cpu(), c.cpu()], 2.5, original_formulation=original, rescale=0.3, backend="torch", **kw)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- guidance intervals


def test_guidance_interval_follows_diffusers_start_stop():
    pytest.importorskip("diffusers", reason="the anchor is diffusers' guider (pyproject [test])")
    from diffusers.guiders.classifier_free_guidance import ClassifierFreeGuidance

    for n, start, stop in ((10, 0.2, 0.75), (7, 0.0, 0.5), (25, 0.33, 1.0), (3, 0.5, 0.5)):
        guider = ClassifierFreeGuidance(guidance_scale=7.5, start=start, stop=stop)
        schedule = gk.interval_schedule(7.5, n, start=start, stop=stop)
        assert schedule.dtype == torch.float32 and schedule.shape == (n,)
        for step in range(n):
            guider.set_state(step=step, num_inference_steps=n, timestep=torch.tensor(999))
            on = guider._is_cfg_enabled()
            assert gk.guidance_interval(7.5, step=step, num_steps=n, start=start, stop=stop) == (7.5 if on else 0.0)
            assert float(schedule[step]) == (7.5 if on else 0.0)
            t = gk.guidance_interval(torch.tensor([7.5, 5.0]), step=step, num_steps=n, start=start, stop=stop, off=1.0)
            assert torch.equal(t, torch.tensor([7.5, 5.0]) if on else torch.ones(2))
    per_step = torch.linspace(8.0, 4.0, 5)
    assert torch.equal(gk.interval_schedule(per_step, 5, start=0.2, stop=0.8),
                       torch.tensor([0.0, per_step[1], per_step[2], per_step[3], 0.0]))


def test_sigma_interval_follows_comfyui_ranges():
    """ComfyUI's guidance nodes: on where sigma_end <= sigma <= sigma_start (inclusive)."""
    import torch._dynamo.testing

    sigma_start, sigma_end = 10.0, 0.5
    sigma = torch.tensor([14.6, 10.0, 3.0, 0.5, 0.2])
    expect = torch.tensor([float(sigma_end <= s <= sigma_start) for s in sigma.tolist()]) * 3.0
    assert torch.equal(gk.sigma_interval(3.0, sigma, sigma_start=sigma_start, sigma_end=sigma_end), expect)
    per_sample = gk.sigma_interval(torch.tensor([2.0, 4.0]), torch.tensor([11.0, 1.0]), sigma_start=10.0,
                                   sigma_end=0.5, off=1.0)
    assert torch.equal(per_sample, torch.tensor([1.0, 4.0]))
    # a compiled step with the gated scale as input compiles once over a whole schedule
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(lambda pred, s: gk.guidance_combine(pred, gk.cfg(7.5) + gk.pag(s)), fullgraph=True,
                         backend=counter)
    pred = torch.randn(6, 2, 4, 4)
    for s in torch.tensor([14.0, 9.0, 4.0, 0.4]):
        scale = gk.sigma_interval(3.0, s, sigma_start=10.0, sigma_end=0.5)
        torch.testing.assert_close(step(pred, scale), gk.guidance_combine(pred, gk.cfg(7.5) + gk.pag(scale)))
    assert counter.frame_count == 1


def test_interval_bad_input():
    with pytest.raises(ValueError, match="guidance_interval: start: must be in \\[0, 1\\)"):
        gk.guidance_interval(3.0, step=0, num_steps=10, start=1.0)
    with pytest.raises(ValueError, match="interval_schedule: stop: must be in \\[start, 1\\]"):
        gk.interval_schedule(3.0, 10, start=0.5, stop=0.4)
    with pytest.raises(ValueError, match="interval_schedule: scale: expected a number or a tensor of shape"):
        gk.interval_schedule(torch.ones(3), 10)
    with pytest.raises(ValueError, match="sigma_interval: sigma_end: must be <= sigma_start"):
        gk.sigma_interval(3.0, torch.tensor(1.0), sigma_start=0.5, sigma_end=1.0)
    with pytest.raises(TypeError, match="sigma_interval: sigma: expected a floating-point tensor"):
        gk.sigma_interval(3.0, 1.0, sigma_start=2.0, sigma_end=0.5)
    with pytest.raises(ValueError, match="guidance_interval: step: must be >= 0"):
        gk.guidance_interval(3.0, step=-1, num_steps=10)


# --------------------------------------------------------------------------- CFG-Norm and Mahiro (ComfyUI)


def _comfy_cfg_norm(cond_p, pred_text, strength):
    """ComfyUI's CFGNorm post-CFG function, written out."""
    norm_full_cond = torch.norm(cond_p, dim=1, keepdim=True)
    norm_pred_text = torch.norm(pred_text, dim=1, keepdim=True)
    scale = (norm_full_cond / (norm_pred_text + 1e-8)).clamp(min=0.0, max=1.0)
    return pred_text * scale * strength


def _comfy_mahiro(scale, cond_p, uncond_p, cfg):
    """ComfyUI's Mahiro post-CFG function, written out (its similarity is a mean over the batch)."""
    leap = cond_p * scale
    u_leap = uncond_p * scale
    merge = (leap + cfg) / 2
    normu = torch.sqrt(u_leap.abs()) * u_leap.sign()
    normm = torch.sqrt(merge.abs()) * merge.sign()
    sim = torch.nn.functional.cosine_similarity(normu, normm).mean()
    simsc = 2 * (sim + 1)
    return (simsc * cfg + (4 - simsc) * leap) / 4


def test_cfg_norm_and_mahiro_references_match_comfyui():
    g = torch.Generator().manual_seed(20)
    u, c = (torch.randn(3, 4, 6, 5, generator=g) for _ in range(2))
    cfg = u + 6.0 * (c - u)
    ours = gk.guidance_combine([u, c], gk.cfg(6.0), cfg_norm=0.8)
    torch.testing.assert_close(R.cfg_norm(cfg, c, 0.8), _comfy_cfg_norm(c, cfg, 0.8), rtol=0, atol=0)
    torch.testing.assert_close(ours, _comfy_cfg_norm(c, cfg, 0.8), rtol=1e-6, atol=1e-6)
    # Mahiro: identical to ComfyUI for a batch of one; per sample otherwise (ComfyUI mixes the batch).
    for b in range(3):
        one = slice(b, b + 1)
        torch.testing.assert_close(R.mahiro(cfg[one], c[one], u[one], 6.0),
                                   _comfy_mahiro(6.0, c[one], u[one], cfg[one]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gk.guidance_combine([u, c], gk.cfg(6.0), mahiro=True)[one],
                                   _comfy_mahiro(6.0, c[one], u[one], cfg[one]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 7, 9), (1, 16, 3, 5, 6), (3, 7)], ids=str)
def test_cfg_norm_and_mahiro_match_truth(lane, dtype, shape):
    """4-D latents, a 5-D video latent (dim 1 = channels) and (B, C) with a single position."""
    backend, device = lane
    g = torch.Generator().manual_seed(21)
    u, c, p = (torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for _ in range(3))
    scale = torch.linspace(3.0, 7.0, shape[0], device=device)
    guidance = gk.cfg(scale) + gk.pag(1.5)
    g64 = gk.Guidance(guidance.base, tuple(gk.Term(t.pos, t.neg, to64(t.scale)) for t in guidance.terms))
    gcpu = gk.Guidance(guidance.base, tuple(gk.Term(t.pos, t.neg, _cpu(t.scale)) for t in guidance.terms))
    branches = [u, c, p]
    pred = torch.cat(branches)
    if len(shape) == 4:
        pred = pred.contiguous(memory_format=torch.channels_last)
    truth_out = R.guidance_combine(to64(branches), g64)
    lowp_out = R.guidance_combine([x.cpu() for x in branches], gcpu)
    strength = torch.linspace(0.5, 1.5, shape[0], device=device)
    out = gk.guidance_combine(pred, guidance, cfg_norm=strength, backend=backend)
    if len(shape) == 4:
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_truth(out, R.cfg_norm(lowp_out, c.cpu(), strength.cpu()),
                          R.cfg_norm(truth_out, to64(c), to64(strength)), factor=4.0, what=f"cfg_norm {backend}")
    out = gk.guidance_combine(branches, guidance, mahiro=True, backend=backend)
    assert_close_to_truth(out, R.mahiro(lowp_out, c.cpu(), u.cpu(), scale.cpu()),
                          R.mahiro(truth_out, to64(c), to64(u), to64(scale)), factor=4.0, what=f"mahiro {backend}")


def test_cfg_norm_and_mahiro_bad_input():
    x = torch.randn(6, 4, 5, 5)
    g = gk.cfg(7.5) + gk.pag(3.0)
    with pytest.raises(ValueError, match="guidance_combine: cfg_norm: rescale, cfg_norm and mahiro are alternative"):
        gk.guidance_combine(x, g, rescale=0.7, cfg_norm=1.0)
    with pytest.raises(ValueError, match="guidance_combine: mahiro: rescale, cfg_norm and mahiro are alternative"):
        gk.guidance_combine(x, g, cfg_norm=1.0, mahiro=True)
    with pytest.raises(ValueError, match="guidance_combine: cfg_norm: must be >= 0"):
        gk.guidance_combine(x, g, cfg_norm=-1.0)
    with pytest.raises(TypeError, match="guidance_combine: mahiro: expected a bool"):
        gk.guidance_combine(x, g, mahiro=1)
    with pytest.raises(ValueError, match="guidance_combine: mahiro: needs a guidance term"):
        gk.guidance_combine(x, gk.Guidance(0), num_branches=3, mahiro=True)
    with pytest.raises(ValueError, match="guidance_combine: pred: CFG-Norm and Mahiro need a channel dimension"):
        gk.guidance_combine(torch.randn(6), g, mahiro=True)


def test_cfg_norm_and_mahiro_opcheck_and_compile():
    import torch._dynamo.testing

    g = torch.Generator().manual_seed(22)
    u, c, p = (torch.randn(2, 3, 4, 5, generator=g) for _ in range(3))
    ops = torch.ops.guidance_kernels
    scale = torch.tensor([2.0, 3.0])
    torch.library.opcheck(ops.guidance_combine_cfg_norm, ([u, c, p], 3, 0, [1, 1], [0, 2], [7.5, 0.0], [None, scale],
                                                          0.0, scale, 1, "torch"))
    torch.library.opcheck(ops.guidance_combine_mahiro, ([torch.cat([u, c, p])], 3, 0, [1, 1], [0, 2], [0.0, 3.0],
                                                        [scale, None], "torch"))
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def step(pred, s, strength):
        g = gk.cfg(s) + gk.pag(2.0)
        return gk.guidance_combine(pred, g, cfg_norm=strength) + gk.guidance_combine(pred, g, mahiro=True)

    compiled = torch.compile(step, fullgraph=True, backend=counter)
    pred = torch.cat([u, c, p])
    for i in range(3):
        s, strength = torch.tensor(5.0 + i), torch.tensor(0.5 + 0.25 * i)
        torch.testing.assert_close(compiled(pred, s, strength), step(pred, s, strength), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
