"""Fuzzing the blur, attention and SAG ops with non-finite data and degenerate shapes: every lane's
backend against a float64 truth written from the definitions (not from torch's fused kernels).

NaN / ±inf (and large finite values) are injected at random positions into every input; shapes
go down to one sample, one channel, one token, one head and the smallest grids the blur allows.
A backend must reproduce the truth's NaN pattern exactly and its inf positions and signs, and be
within the tolerance rule (``helpers.assert_close_to_truth``) elsewhere. The rules every backend
follows (docstrings of the ops):

* blur: an output is non-finite exactly where a tap of non-zero weight reads a non-finite value
  (taps of weight 0 are dropped: ``_spec.blur_taps``); σ = ∞ is the mean;
* attention: ``softmax(scale·q kᵀ) v`` as written, row by row: a NaN in q_i makes row i NaN, a NaN
  in k or v every row of that (item, head) NaN, an inf logit NaN (inf − inf) or weight 0 (−inf);
* identity (PAG): v itself; joint identity: the softmax over the own key and the text keys only;
* SAG key mass: the column sums of those softmax rows; the degrade step: the blur, the float32
  threshold of the mass, ``blurred·m + x0·(1 − m)`` and the re-noise, as written.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import guidance_kernels as gk
from guidance_kernels import reference as R
from guidance_kernels._spec import blur_kernel_size, blur_taps
from conftest import LANES, lane_id
from helpers import assert_close_to_truth, to64

SETTINGS = settings(max_examples=int(__import__("os").environ.get("GK_FUZZ_EXAMPLES", 12)), deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ATTENTION_LANES = LANES + [("triton_sdpa", d) for b, d in LANES if b == "triton"]
POISON = (float("nan"), float("inf"), -float("inf"))


def _dtypes(backend: str) -> list[torch.dtype]:
    # bf16 tl.dot is wrong in the Triton interpreter (the GPU lane checks it)
    interpreted = backend.startswith("triton") and not torch.cuda.is_available()
    return [torch.float32, torch.float16] + ([] if interpreted else [torch.bfloat16])


@st.composite
def poisoned(draw, shape: tuple[int, ...], *, big: float = 1e4, poison=POISON):
    """A float64 tensor of ``shape`` with a few NaN / ±inf / large entries at random places."""
    seed = draw(st.integers(0, 2**16))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if x.numel():
        for _ in range(draw(st.integers(0, 3))):
            index = tuple(draw(st.integers(0, n - 1)) for n in shape)
            x[index] = draw(st.sampled_from(poison + (big, -big)))
    return x


def _sdpa_keys(backend: str, dtype: torch.dtype, k: torch.Tensor) -> torch.Tensor:
    """The triton_sdpa route hands plain and blurred items to torch's fused SDPA, which in fp16/bf16
    drops the rows an inf key logit should make NaN (documented on the route); the other
    backends follow the definition there, and are fuzzed with inf keys in every dtype."""
    if backend == "triton_sdpa" and dtype != torch.float32:
        return k.nan_to_num(nan=math.nan, posinf=1e4, neginf=-1e4)
    return k


def _no_inf_in_v(dtype: torch.dtype, v: torch.Tensor) -> torch.Tensor:
    """Half-precision attention multiplies the probabilities by V in the input dtype (as flash
    attention does): a probability that underflows there meets an inf in v as 0·inf = NaN where
    the definition gives inf. That case is left out for fp16/bf16 (documented in the ops)."""
    return v if dtype == torch.float32 else v.nan_to_num(nan=math.nan, posinf=1e4, neginf=-1e4)


def _check(out, lowp, truth, what, magnitude=None):
    out, lowp = out.cpu(), lowp.cpu()
    inf_out, inf_truth = torch.isinf(to64(out)), torch.isinf(truth)
    assert torch.equal(inf_out, inf_truth), f"{what}: inf positions differ from the truth"
    assert torch.equal(to64(out)[inf_out], truth[inf_truth]), f"{what}: inf signs differ from the truth"
    assert_close_to_truth(out, lowp, truth, what=what, magnitude=magnitude)


def _finite_max(*tensors) -> float:
    return max(float(t.abs().nan_to_num(0.0, 0.0, 0.0).max()) for t in tensors if t is not None and t.numel())


# --------------------------------------------------------------------------- truths from the definitions


def _softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """softmax as written: exp(s − max s) / Σ; a NaN or a +inf logit makes its row NaN."""
    p = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    return p / p.sum(dim=-1, keepdim=True)


def _attention(q, k, v, scale):
    return _softmax_rows(q @ k.transpose(-1, -2) * scale) @ v


def _joint_identity(q, k, v, scale, image: slice, text: slice):
    """Image query i over [key i, text keys]; text queries over everything."""
    out = _attention(q, k, v, scale)
    own = (q[:, :, image] * k[:, :, image]).sum(-1, keepdim=True) * scale
    logits = torch.cat([own, q[:, :, image] @ k[:, :, text].transpose(-1, -2) * scale], dim=-1)
    p = _softmax_rows(logits)
    out[:, :, image] = p[..., :1] * v[:, :, image] + p[..., 1:] @ v[:, :, text]
    return out


def guided_attention_truth(q, k, v, modes, sigmas, grid, text_tokens, text_before, scale):
    """guided_attention by its definition, item by item, in the dtype of q (float64: the truth)."""
    n = q.shape[2]
    image = slice(text_tokens, n) if text_before else slice(0, n - text_tokens)
    text = slice(0, text_tokens) if text_before else slice(n - text_tokens, n)
    outs = []
    for i, mode in enumerate(modes):
        qi, ki, vi = q[i:i + 1], k[i:i + 1], v[i:i + 1]
        if mode == "identity" and text_tokens == 0:
            outs.append(vi.clone())
            continue
        if mode == "identity":
            outs.append(_joint_identity(qi, ki, vi, scale, image, text))
            continue
        if mode == "blur":
            size = blur_kernel_size(sigmas[i], grid)
            qi = qi.clone()
            qi[:, :, image] = R.blur_tokens(qi[:, :, image], sigmas[i], grid, "bhnd", size or None)
        outs.append(_attention(qi, ki, vi, scale))
    return torch.cat(outs)


# --------------------------------------------------------------------------- gaussian_blur_2d


@st.composite
def blur_case(draw):
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    b, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    sigma = draw(st.sampled_from([0.3, 0.8, 2.0, 1e-50, math.inf]))
    explicit = None
    if draw(st.booleans()) and min(h, w) >= 2 and sigma <= 1e4:
        explicit = draw(st.sampled_from([k for k in (3, 5, 7) if k // 2 < min(h, w)]))
    return draw(poisoned((b, c, h, w))), sigma, explicit


@pytest.mark.parametrize("lane", LANES, ids=lane_id)
@SETTINGS
@given(case=blur_case())
def test_gaussian_blur_2d_non_finite(lane, case):
    backend, device = lane
    x, sigma, kernel_size = case
    size = kernel_size or blur_kernel_size(sigma, x.shape[-2:]) or None
    truth = R.seg_blur(x, sigma, size, cap_to_grid=False)
    for dtype in _dtypes(backend):
        out = gk.gaussian_blur_2d(x.to(device, dtype), sigma, kernel_size=kernel_size, backend=backend)
        lowp = R.seg_blur(x.to(dtype).float(), sigma, size, cap_to_grid=False).to(dtype)
        _check(out, lowp, truth, f"blur {backend} {dtype} σ={sigma} k={kernel_size}")


def test_blur_spreads_non_finite_values_over_its_footprint_only():
    """The issue's case: an inf at (6, 6), σ = 0.5 (3 taps): 9 non-finite outputs, all +inf, on
    every lane; a σ below float32's range is the identity."""
    x = torch.randn(1, 1, 12, 12)
    x[0, 0, 6, 6] = math.inf
    for backend, device in LANES:
        out = gk.gaussian_blur_2d(x.to(device), 0.5, backend=backend).cpu()
        assert int((~torch.isfinite(out)).sum()) == 9 and bool(torch.isposinf(out[0, 0, 5:8, 5:8]).all()), backend
        same = gk.gaussian_blur_2d(x.to(device), 1e-50, kernel_size=3, backend=backend).cpu()
        assert torch.equal(same, x), backend
    assert len(blur_taps(9, 0.25)) == 7 and blur_taps(9, 1e-50) == (1.0,) and blur_taps(9, 1.0) == blur_taps(9, 1.0)[::-1]


# --------------------------------------------------------------------------- guided_attention


@st.composite
def attention_case(draw):
    heads, d = draw(st.integers(1, 2)), draw(st.sampled_from([1, 3, 8, 16]))
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    text = draw(st.sampled_from([0, 0, 2]))
    n = h * w + text
    batch = draw(st.integers(1, 4))
    modes = draw(st.lists(st.sampled_from(["none", "identity", "blur"]), min_size=batch, max_size=batch))
    sigmas = [draw(st.sampled_from([0.7, 2.0, math.inf])) for _ in modes]
    q, k, v = (draw(poisoned((batch, heads, n, d), big=30.0)) for _ in range(3))
    return q, k, v, modes, sigmas, (h, w), text, draw(st.booleans())


@pytest.mark.parametrize("lane", ATTENTION_LANES, ids=lane_id)
@SETTINGS
@given(case=attention_case())
def test_guided_attention_non_finite(lane, case):
    backend, device = lane
    q, k, v, modes, sigmas, grid, text, before = case
    scale = q.shape[-1] ** -0.5
    for dtype in _dtypes(backend):
        k, v = _sdpa_keys(backend, dtype, k), _no_inf_in_v(dtype, v)
        truth = guided_attention_truth(q, k, v, modes, sigmas, grid, text, before, scale)
        lowp = guided_attention_truth(*(t.to(dtype).float() for t in (q, k, v)), modes, sigmas, grid, text, before,
                                      scale).to(dtype)
        out = gk.guided_attention(*(t.to(device, dtype) for t in (q, k, v)), modes=modes, sigma=sigmas, grid=grid,
                                  text_tokens=text, text_position="before" if before else "after", backend=backend)
        _check(out, lowp, truth, f"attention {backend} {dtype} {modes} σ={sigmas} text={text}")


@pytest.mark.parametrize("lane", ATTENTION_LANES, ids=lane_id)
def test_guided_attention_nan_query_row_is_nan(lane):
    """The issue's case: a NaN in a query gave a zero output row (torch's fused SDPA kernel);
    attention_key_mass and the definition give NaN."""
    backend, device = lane
    q, k, v = (torch.randn(3, 2, 12, 8) for _ in range(3))
    q[1, 0, 5, 3] = math.nan
    out = gk.guided_attention(q.to(device), k.to(device), v.to(device), backend=backend).cpu()
    assert torch.isnan(out[1, 0, 5]).all() and int(torch.isnan(out).sum()) == 8


@pytest.mark.parametrize("lane", ATTENTION_LANES, ids=lane_id)
def test_guided_attention_text_only_and_single_token(lane):
    """Every token text (joint PAG has no image rows: plain attention); one token, one head."""
    backend, device = lane
    q, k, v = (torch.randn(3, 2, 6, 4, device=device) for _ in range(3))
    plain = gk.guided_attention(q, k, v, backend=backend)
    torch.testing.assert_close(gk.guided_attention(q, k, v, modes=[0, 1, 0], text_tokens=6, backend=backend), plain)
    one = torch.randn(2, 1, 1, 3, device=device)
    out = gk.guided_attention(one, one, one, modes=["none", "blur"], sigma=1.0, grid=(1, 1), backend=backend)
    torch.testing.assert_close(out, one)  # a softmax over one key is 1


# --------------------------------------------------------------------------- attention_key_mass


@st.composite
def key_mass_case(draw):
    heads, d = draw(st.integers(1, 3)), draw(st.sampled_from([1, 5, 16]))
    batch, n, m = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    q = draw(poisoned((batch, heads, n, d), big=30.0))
    k, v = (draw(poisoned((batch, heads, m, d), big=30.0)) for _ in range(2))
    items = draw(st.none() | st.lists(st.integers(0, batch - 1), min_size=1, max_size=3))
    return q, k, v, items


def _key_mass_truth(q, k, v, items, scale):
    p = _softmax_rows(q @ k.transpose(-1, -2) * scale)
    mass = p.mean(1).sum(1)
    return p @ v, mass if items is None else mass[items]


@pytest.mark.parametrize("lane", LANES, ids=lane_id)
@SETTINGS
@given(case=key_mass_case())
def test_attention_key_mass_non_finite(lane, case):
    backend, device = lane
    q, k, v, items = case
    scale = q.shape[-1] ** -0.5
    for dtype in _dtypes(backend):
        v = _no_inf_in_v(dtype, v)
        out_truth, mass_truth = _key_mass_truth(q, k, v, items, scale)
        out_low, mass_low = _key_mass_truth(*(t.to(dtype).float() for t in (q, k, v)), items, scale)
        out, mass = gk.attention_key_mass(*(t.to(device, dtype) for t in (q, k, v)), items=items, backend=backend)
        _check(out, out_low.to(dtype), out_truth, f"key mass out {backend} {dtype}")
        _check(mass, mass_low.float(), mass_truth, f"key mass {backend} {dtype}")


# --------------------------------------------------------------------------- sag_degrade


@st.composite
def degrade_case(draw):
    h, w = draw(st.integers(5, 11)), draw(st.integers(5, 11))
    b, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    x0 = draw(poisoned((b, c, h, w)))
    gh, gw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["mass", "mask", "bool"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if kind == "mass":
        grid_map = draw(poisoned((draw(st.sampled_from([1, b])), gh * gw))).abs().float() * 1.3
    elif kind == "mask":
        grid_map = torch.rand(draw(st.sampled_from([1, b])), gh, gw, generator=g)
        if draw(st.booleans()):
            grid_map[0, 0, 0] = math.nan
    else:
        grid_map = torch.rand(b, gh, gw, generator=g) > 0.5
    renoise = draw(st.sampled_from(["none", "ddpm", "kdiff"]))
    other = draw(poisoned((b, c, h, w))) if renoise != "none" else None
    sigma = draw(st.sampled_from([0.2, 1.0, 2.0]))
    return x0, grid_map, (gh, gw) if kind == "mass" else None, renoise, other, sigma


def _degrade_truth(x0, grid_map, grid, renoise, other, sigma, alpha=0.6):
    """sag_degrade by its definition in float64, the mass thresholded in float32 as documented."""
    if grid is not None:
        mask = (grid_map.float() > 1.0).double().reshape(-1, 1, *grid)
    else:
        mask = grid_map.double().reshape(grid_map.shape[0], 1, *grid_map.shape[-2:])
    kw = {"ddpm": dict(eps=other, alpha_cumprod=alpha), "kdiff": dict(x_t=other), "none": {}}[renoise]
    return R.sag_degrade(x0, mask, sigma=sigma, **kw)


@pytest.mark.parametrize("lane", LANES, ids=lane_id)
@SETTINGS
@given(case=degrade_case())
def test_sag_degrade_non_finite(lane, case):
    backend, device = lane
    x0, grid_map, grid, renoise, other, sigma = case
    truth = _degrade_truth(to64(x0), grid_map, grid, renoise, to64(other) if other is not None else None, sigma)
    for dtype in _dtypes(backend):
        low = _degrade_truth(x0.to(dtype).float(), grid_map, grid, renoise,
                             other.to(dtype).float() if other is not None else None, sigma).to(dtype)
        kw = {"ddpm": dict(eps=other, alpha_cumprod=0.6), "kdiff": dict(x_t=other), "none": {}}[renoise]
        kw = {key: val.to(device, dtype) if isinstance(val, torch.Tensor) else val for key, val in kw.items()}
        out = gk.sag_degrade(x0.to(device, dtype), grid_map.to(device), grid=grid, sigma=sigma, backend=backend, **kw)
        # the k-diffusion re-noise (degraded + x_t) − x0 cancels: x0's magnitude sets the rounding
        _check(out, low, truth, f"degrade {backend} {dtype} {renoise} σ={sigma}", magnitude=_finite_max(x0, other))
