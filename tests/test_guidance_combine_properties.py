"""Property-based tests of the combine family: random shapes, strides, offsets, branch layouts,
term structures and per-sample scales, every usable backend against the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import guidance_kernels as gk
from conftest import LANES, lane_id
from guidance_kernels import reference as R
from guidance_kernels._spec import APG_FORMULATIONS

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def strided_batch(draw, k: int, min_dims: int = 0):
    """K branches of shape (B, *S) with a random layout: stacked or separate, permuted storage,
    offsets and gaps."""
    batch = draw(st.integers(1, 3))
    sample = draw(st.lists(st.integers(1, 7), min_size=min_dims, max_size=3))
    shape = (batch, *sample)
    seed = draw(st.integers(0, 2**16))
    stacked = draw(st.booleans())
    perm = draw(st.permutations(range(len(shape)))) if draw(st.booleans()) else list(range(len(shape)))
    pad = draw(st.integers(0, 2))
    g = torch.Generator().manual_seed(seed)
    lead = k * batch if stacked else batch
    full = (lead, *sample)
    # Storage laid out in `perm` order with `pad` extra elements on the innermost stored dim.
    stored = [full[i] for i in perm]
    stored[-1] += pad
    count = 1 if stacked else k
    tensors = []
    for _ in range(count):
        base = torch.randn(stored, generator=g)
        view = base[..., : stored[-1] - pad] if pad else base
        inverse = [perm.index(i) for i in range(len(full))]
        tensors.append(view.permute(*inverse))
    pred = tensors[0] if stacked else tensors
    return pred, shape


@st.composite
def guidance_spec(draw, k: int, batch: int):
    n_terms = draw(st.integers(0, 4))
    terms = []
    for _ in range(n_terms):
        pos, neg = draw(st.integers(0, k - 1)), draw(st.integers(0, k - 1))
        if draw(st.booleans()):
            scale = draw(st.floats(-10, 10, allow_nan=False, width=32))
        else:
            values = draw(st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=batch, max_size=batch))
            scale = torch.tensor(values) if draw(st.booleans()) else torch.tensor(values[:1]).reshape(())
        terms.append(gk.Term(pos, neg, scale))
    return gk.Guidance(draw(st.integers(0, k - 1)), tuple(terms))


@pytest.mark.parametrize("lane", LANES, ids=lane_id)
@SETTINGS
@given(data=st.data())
def test_guidance_combine_any_layout(lane, data):
    backend, device = lane
    k = data.draw(st.integers(1, 4), label="branches")
    pred, shape = data.draw(strided_batch(k))
    guidance = data.draw(guidance_spec(k, shape[0]))
    rescale = data.draw(st.sampled_from([0.0, 0.5]))
    if not guidance.terms or len(shape) < 2:
        rescale = 0.0  # rescale needs a term (its reference branch) and non-batch dims
    to = (lambda t: t.to(device)) if device != "cpu" else (lambda t: t)
    moved = to(pred) if isinstance(pred, torch.Tensor) else [to(t) for t in pred]
    moved_guidance = gk.Guidance(guidance.base, tuple(
        gk.Term(t.pos, t.neg, to(t.scale) if isinstance(t.scale, torch.Tensor) else t.scale)
        for t in guidance.terms))
    out = gk.guidance_combine(moved, moved_guidance, num_branches=k, rescale=rescale, backend=backend)
    branches = list(pred.double().chunk(k)) if isinstance(pred, torch.Tensor) else [t.double() for t in pred]
    expect = R.guidance_combine(branches, gk.Guidance(guidance.base, tuple(
        gk.Term(t.pos, t.neg, t.scale.double() if isinstance(t.scale, torch.Tensor) else t.scale)
        for t in guidance.terms)), rescale=rescale)
    assert out.shape == shape and out.dtype == torch.float32
    got = out.cpu().double()
    # fp32 arithmetic vs float64 truth; rescale divides by a std that can be tiny for 1-2 elements
    tol = 1e-5 * (1 + expect.abs().nan_to_num(0, 0, 0).max().item())
    finite = torch.isfinite(expect)
    assert torch.equal(torch.isnan(got), torch.isnan(expect))
    torch.testing.assert_close(got[finite], expect[finite], rtol=1e-4, atol=tol)


@pytest.mark.parametrize("lane", LANES, ids=lane_id)
@SETTINGS
@given(data=st.data())
def test_apg_and_cfg_zero_star_any_layout(lane, data):
    backend, device = lane
    pred, shape = data.draw(strided_batch(2, min_dims=1))
    scale = data.draw(st.floats(0.5, 10, width=32))
    to = (lambda t: t.to(device)) if device != "cpu" else (lambda t: t)
    moved = to(pred) if isinstance(pred, torch.Tensor) else [to(t) for t in pred]
    branches = list(pred.double().chunk(2)) if isinstance(pred, torch.Tensor) else [t.double() for t in pred]
    u, c = branches
    threshold = data.draw(st.sampled_from([0.0, 1.0, 15.0]))
    eta = data.draw(st.floats(0, 1, width=32))
    form = data.draw(st.sampled_from(APG_FORMULATIONS))
    out = gk.apg_combine(moved, scale, eta=eta, norm_threshold=threshold, formulation=form, backend=backend)
    expect = R.apg_combine(c, u, scale, eta=eta, norm_threshold=threshold, formulation=form)
    torch.testing.assert_close(out.cpu().double(), expect, rtol=1e-4, atol=1e-4 * (1 + expect.abs().max().item()))
    orig = data.draw(st.booleans())
    out = gk.cfg_zero_star_combine(moved, scale, original_formulation=orig, backend=backend)
    expect = R.cfg_zero_star_combine(c, u, scale, original_formulation=orig)
    torch.testing.assert_close(out.cpu().double(), expect, rtol=1e-4, atol=1e-4 * (1 + expect.abs().max().item()))
