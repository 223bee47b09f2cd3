"""fdg_combine: the reference against kornia's pyramid and diffusers' FrequencyDecoupledGuidance
(kornia is a test dependency), every backend against a float64 truth (flash-attention tolerance
rule) on padded and unpadded latents, video latents, per-sample and per-level scales, every
option; bad input; opcheck; torch.compile without recompiles when scales change."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import guidance_kernels as gk
from guidance_kernels import reference as R
from helpers import assert_close_to_truth, needs, to64


def _kornia():
    needs(importlib.util.find_spec("kornia") is not None, "kornia is not installed (the test extra)")
    import kornia

    return kornia


def _pair(shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(shape, generator=g, dtype=torch.float64)
    u = c + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)
    return c.to(device=device, dtype=dtype), u.to(device=device, dtype=dtype)


def _guider(**kw):
    pytest.importorskip("diffusers", reason="the anchor is diffusers' guider (pyproject [test])")
    from diffusers.guiders.frequency_decoupled_guidance import FrequencyDecoupledGuidance

    guider = FrequencyDecoupledGuidance(**kw)
    guider.set_state(step=3, num_inference_steps=10, timestep=torch.tensor(500))
    return guider


def _cpu(x):
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu(v) for v in x)
    return x.cpu() if isinstance(x, torch.Tensor) else x


# --------------------------------------------------------------------------- references vs the anchors


def test_pyramid_reference_is_kornias():
    kornia = _kornia()
    x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(1))
    assert torch.equal(R.pyrdown(x), kornia.geometry.pyrdown(x))
    assert torch.equal(R.pyrup(x), kornia.geometry.pyrup(x))
    for levels in (1, 2, 3, 4):
        ours = R.laplacian_pyramid(x, levels)
        theirs = kornia.geometry.transform.build_laplacian_pyramid(x, levels)
        assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("shape", [(2, 4, 32, 32), (2, 4, 24, 40)], ids=str)
def test_reference_matches_diffusers_guider(shape):
    """Every option of the guider; a latent kornia pads (24x40 -> 32x64) is compared on the crop,
    and its data-space rescale is the crop's (the guider would return the padded size)."""
    _kornia()
    c, u = _pair(shape, seed=2)
    h, w = shape[-2:]
    for kw in ({"guidance_scales": [10.0, 5.0]},
               {"guidance_scales": [8.0, 4.0, 2.0], "parallel_weights": [0.5, 1.0, 0.2]},
               {"guidance_scales": [8.0, 4.0], "guidance_rescale": [0.5, 0.7], "guidance_rescale_space": "freq"},
               {"guidance_scales": [6.0, 3.0], "use_original_formulation": True, "parallel_weights": 0.3}):
        theirs = _guider(**kw).forward(c, u).pred[..., :h, :w]
        ours = R.fdg_combine(c, u, kw["guidance_scales"], parallel_weights=kw.get("parallel_weights"),
                             rescale=kw.get("guidance_rescale", 0.0),
                             rescale_space=kw.get("guidance_rescale_space", "data"),
                             original_formulation=kw.get("use_original_formulation", False))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=str(kw))
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    plain = _guider(guidance_scales=[10.0, 5.0]).forward(c, u).pred
    with_rescale = _guider(guidance_scales=[10.0, 5.0], guidance_rescale=0.7).forward(c, u).pred
    if plain.shape == c.shape:
        torch.testing.assert_close(R.fdg_combine(c, u, [10.0, 5.0], rescale=0.7), with_rescale, rtol=0, atol=0)
    torch.testing.assert_close(R.fdg_combine(c, u, [10.0, 5.0], rescale=0.7),
                               rescale_noise_cfg(plain[..., :h, :w], c, 0.7), rtol=0, atol=0)


def test_level_intervals_keep_the_cond_level():
    """diffusers' per-level start/stop: a disabled level is meant to keep cond's level (its code
    appends ``pred_cond_freq``, a variable only assigned for enabled levels — the previous level's
    tensor, so the guider raises or mixes levels: an anchor bug not copied). Here a disabled level
    is a scale of exactly 1, which keeps cond's level."""
    _kornia()
    c, u = _pair((1, 4, 32, 32), seed=3)
    pytest.importorskip("diffusers", reason="the anchor is diffusers' guider (pyproject [test])")
    from diffusers.guiders.frequency_decoupled_guidance import FrequencyDecoupledGuidance

    guider = FrequencyDecoupledGuidance(guidance_scales=[9.0, 4.0], start=[0.0, 0.5], stop=[1.0, 1.0])
    guider.set_state(step=2, num_inference_steps=10, timestep=torch.tensor(500))
    with pytest.raises(RuntimeError):  # level 1 disabled: the stale level-0 tensor does not fit
        guider.forward(c, u)
    scales = [gk.guidance_interval(9.0, step=2, num_steps=10, off=1.0),
              gk.guidance_interval(4.0, step=2, num_steps=10, start=0.5, off=1.0)]
    assert scales == [9.0, 1.0]
    lc, lu = R.laplacian_pyramid(c, 2), R.laplacian_pyramid(u, 2)
    meaning = R.pyrup(lc[1]) + (lu[0] + 9.0 * (lc[0] - lu[0]))
    torch.testing.assert_close(R.fdg_combine(c, u, scales), meaning, rtol=0, atol=0)
    torch.testing.assert_close(gk.fdg_combine([u, c], scales), meaning, rtol=1e-5, atol=1e-5)
    guider.set_state(step=7, num_inference_steps=10, timestep=torch.tensor(500))  # both enabled
    scales = [gk.guidance_interval(9.0, step=7, num_steps=10, off=1.0),
              gk.guidance_interval(4.0, step=7, num_steps=10, start=0.5, off=1.0)]
    torch.testing.assert_close(R.fdg_combine(c, u, scales), guider.forward(c, u).pred, rtol=0, atol=0)


# --------------------------------------------------------------------------- backends vs the float64 truth

CASES = [
    # shape, scales, options
    ((1, 4, 16, 16), [10.0, 5.0], {}),
    ((2, 3, 12, 20), [8.0, "per-sample", 2.0], {"parallel_weights": [0.5, 1.0, 0.25]}),
    ((2, 4, 16, 16), ["per-sample", 4.0], {"rescale": [0.5, "per-sample"], "rescale_space": "freq"}),
    ((1, 2, 3, 8, 12), [6.0, 3.0], {"rescale": "per-sample", "original_formulation": True, "parallel_weights": 0.5}),
    ((2, 4, 9, 13), [7.0], {"rescale": 0.6}),
]


def _materialise(value, batch, device):
    if value == "per-sample":
        return torch.tensor([1.0, 3.5][:batch], device=device) if batch > 1 else torch.tensor(2.5, device=device)
    if isinstance(value, list):
        return [_materialise(v, batch, device) for v in value]
    return value


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backends_match_truth(lane, case, dtype):
    backend, device = lane
    shape, scales, options = CASES[case]
    c, u = _pair(shape, dtype, device, seed=4 + case)
    scales = _materialise(scales, shape[0], device)
    options = {k: _materialise(v, shape[0], device) for k, v in options.items()}
    for pred in ((torch.cat([u, c]), [u, c]) if case % 2 == 0 else ([u, c],)):
        out = gk.fdg_combine(pred, scales, backend=backend, **options)
        truth = R.fdg_combine(to64(c), to64(u), to64(scales), **{k: to64(v) for k, v in options.items()})
        lowp = R.fdg_combine(c.cpu(), u.cpu(), _cpu(scales), **{k: _cpu(v) for k, v in options.items()})
        assert out.shape == c.shape and out.dtype == dtype
        assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"{backend} case {case}")


def test_channels_last_and_strided_inputs(lane):
    backend, device = lane
    c, u = _pair((2, 4, 16, 24), torch.float32, device, seed=9)
    pred = torch.cat([u, c]).contiguous(memory_format=torch.channels_last)
    out = gk.fdg_combine(pred, [6.0, 3.0], parallel_weights=0.5, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    truth = R.fdg_combine(to64(c), to64(u), [6.0, 3.0], parallel_weights=0.5)
    assert_close_to_truth(out, R.fdg_combine(c.cpu(), u.cpu(), [6.0, 3.0], parallel_weights=0.5), truth, factor=4.0)
    wide = torch.zeros(2, 4, 16, 30, device=device)
    wide[..., 3:27] = u
    out = gk.fdg_combine([wide[..., 3:27], c], [6.0, 3.0], backend=backend)  # a sliced uncond
    truth = R.fdg_combine(to64(c), to64(u), [6.0, 3.0])
    assert_close_to_truth(out, R.fdg_combine(c.cpu(), u.cpu(), [6.0, 3.0]), truth, factor=4.0)


def test_per_sample_unit_scale_keeps_the_cond_level(lane):
    """A per-sample scale of exactly 1 at a level keeps cond's level for that sample only."""
    backend, device = lane
    c, u = _pair((2, 3, 16, 16), torch.float32, device, seed=10)
    scales = [torch.tensor([1.0, 1.0], device=device), torch.tensor([1.0, 5.0], device=device)]
    out = gk.fdg_combine([u, c], scales, parallel_weights=0.5, backend=backend).cpu()
    torch.testing.assert_close(out[0], c[0].cpu(), rtol=1e-5, atol=1e-5)  # every level cond's: cond itself
    truth = R.fdg_combine(to64(c), to64(u), to64(scales), parallel_weights=0.5)
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bad input, opcheck, compile


def test_bad_input_names_the_argument():
    x = torch.randn(4, 4, 8, 8)
    with pytest.raises(ValueError, match=r"fdg_combine: scales: 4 levels are too deep for a \(8, 8\) latent .* at most 3"):
        gk.fdg_combine(x, [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="fdg_combine: parallel_weights: has 3 entries but scales has 2 levels"):
        gk.fdg_combine(x, [5.0, 3.0], parallel_weights=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="fdg_combine: rescale: has 1 entries but scales has 2 levels"):
        gk.fdg_combine(x, [5.0, 3.0], rescale=[0.5], rescale_space="freq")
    with pytest.raises(TypeError, match="fdg_combine: rescale: one value per level needs rescale_space='freq'"):
        gk.fdg_combine(x, [5.0, 3.0], rescale=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"fdg_combine: rescale\[1\]: must be >= 0"):
        gk.fdg_combine(x, [5.0, 3.0], rescale=[0.5, -0.5], rescale_space="freq")
    with pytest.raises(ValueError, match="fdg_combine: rescale: must be >= 0"):
        gk.fdg_combine(x, [5.0, 3.0], rescale=-0.1)
    with pytest.raises(ValueError, match="fdg_combine: rescale_space: must be one of"):
        gk.fdg_combine(x, [5.0, 3.0], rescale_space="pixel")
    with pytest.raises(TypeError, match="fdg_combine: scales: expected a sequence of per-level scales"):
        gk.fdg_combine(x, 5.0)
    with pytest.raises(ValueError, match="fdg_combine: scales: expected 1 to 8 levels, got 0"):
        gk.fdg_combine(x, [])
    with pytest.raises(ValueError, match=r"fdg_combine: scales\[1\]: must be finite"):
        gk.fdg_combine(x, [5.0, float("nan")])
    with pytest.raises(ValueError, match="fdg_combine: pred: expected \\(B, …, H, W\\) predictions"):
        gk.fdg_combine(torch.randn(4, 8), [5.0])
    with pytest.raises(TypeError, match="fdg_combine: parallel_weights: expected a real number"):
        gk.fdg_combine(x, [5.0, 3.0], parallel_weights=torch.tensor(0.5))
    with pytest.raises(TypeError, match="fdg_combine: original_formulation: expected a bool"):
        gk.fdg_combine(x, [5.0, 3.0], original_formulation=1)
    assert gk.fdg_combine(x, [1.0, 2.0, 3.0]).shape == (2, 4, 8, 8)  # 3 levels fit: 8 -> 4 -> 2


def test_opcheck_and_compile():
    import torch._dynamo.testing

    c, u = _pair((2, 3, 16, 16), seed=11)
    scale = torch.tensor([2.0, 3.0])
    op = torch.ops.guidance_kernels.fdg_combine
    torch.library.opcheck(op, ([torch.cat([u, c])], 2, 1, 0, [5.0, 0.0], [None, scale], [1.0, 0.5], [0.7], [None],
                               "data", False, "torch"))
    torch.library.opcheck(op, ([u, c], 2, 1, 0, [5.0, 3.0], [None, None], [1.0, 1.0], [0.0, 0.5], [scale, None],
                               "freq", True, "torch"))
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda pred, s0, s1, phi: gk.fdg_combine(pred, [s0, s1], parallel_weights=0.5, rescale=phi),
                             fullgraph=True, backend=counter)
    pred = torch.cat([u, c])
    for i in range(3):
        s0, s1, phi = torch.tensor(8.0 - i), torch.tensor(4.0 + i), torch.tensor(0.2 * i)
        torch.testing.assert_close(compiled(pred, s0, s1, phi),
                                   gk.fdg_combine(pred, [s0, s1], parallel_weights=0.5, rescale=phi),
                                   rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
