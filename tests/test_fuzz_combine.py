"""Fuzzing the combine family: NaN / ±inf injected into any branch, constant and all-zero samples,
extreme and per-sample scales, degenerate shapes (one sample, one element per sample, many
samples, odd inner sizes), fp32/fp16/bf16 — every op on every lane of this machine (torch, the
Triton interpreter or GPU, and the CUDA kernels: on a GPU, or emulated on the host through the real
glue) against a float64 truth cast to the output dtype. The NaN pattern must be exact and every
other element within the flash-attention bound (``helpers.assert_close_to_truth``). FDG's rule:
its non-finite elements are among the anchor's (it reads uncond exactly where the anchor does;
the anchor's level arithmetic, inf − inf in ``G − pyrup(G')``, can spread a non-finite value
wider than the pyramid's linear map, which the rebuild over the Gaussian levels does not).
Bounded examples and small shapes keep it fast."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import guidance_kernels as gk
from guidance_kernels import _extension, _spec, backends
from guidance_kernels import reference as R
import host_lane
from conftest import LANES
from helpers import assert_close_to_truth, to64
from test_fdg_combine_host import FdgFakeExtension
from test_guidance_combine_host import Host


def _settings(examples: int):
    # derandomized: CI sees the same cases every run (the generation still covers the space);
    # GK_FUZZ_EXAMPLES overrides every test's count (a longer local run, or a quick one)
    return settings(max_examples=int(os.environ.get("GK_FUZZ_EXAMPLES", examples)), deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


SCALES = [0.0, 1.0, 7.5, -3.0, 1e15, -1e15, 1e-20]
BAD = [float("nan"), float("inf"), float("-inf")]


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The CUDA kernels on the CPU (None when a real CUDA lane exists: it is in LANES then)."""
    if any(backend == "cuda" for backend, _ in LANES):
        return None
    directory = tmp_path_factory.mktemp("host")
    return FdgFakeExtension(Host(host_lane.build_gxx("guidance_combine_host", directory)),
                            host_lane.build_gxx("fdg_combine_host", directory))


def _lanes(emulated):
    return list(LANES) + ([("cuda-host", "cpu")] if emulated is not None else [])


def _run(lane, emulated, monkeypatch, fn):
    backend, device = lane
    if backend != "cuda-host":
        return fn("triton" if backend == "triton" else backend, device)
    with monkeypatch.context() as m:
        m.setattr(_extension, "load", lambda: emulated)
        m.setattr(backends, "select", lambda op, tensor, facts=(), backend=None: "cuda")
        return fn("cuda", "cpu")


@st.composite
def branches(draw, k: int, inner_shapes):
    """k float64 (B, *inner) branches: random, correlated, constant or zero samples, with 0-2
    non-finite values injected anywhere."""
    batch = draw(st.sampled_from([1, 2, 3, 9]))
    inner = draw(st.sampled_from(inner_shapes))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    base = torch.randn(batch, *inner, generator=g, dtype=torch.float64)
    out = []
    for _ in range(k):
        kind = draw(st.sampled_from(["correlated", "correlated", "random", "constant", "zero"]))
        if kind == "correlated":
            x = base + 0.3 * torch.randn(base.shape, generator=g, dtype=torch.float64)
        elif kind == "random":
            x = torch.randn(base.shape, generator=g, dtype=torch.float64)
        elif kind == "constant":
            x = torch.randn(batch, *([1] * len(inner)), generator=g, dtype=torch.float64).expand(base.shape).clone()
        else:
            x = torch.zeros(base.shape, dtype=torch.float64)
        out.append(x)
    for _ in range(draw(st.integers(0, 2))):
        which = draw(st.integers(0, k - 1))
        flat = out[which].view(-1)
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(BAD))
    return out


def _scale(draw, batch, tiny=True):
    """A number or a per-sample tensor. ``tiny=False`` leaves out 1e-20 where a rescale follows:
    those ops take the output's std from the co-moments (exact algebra), so where rounding makes
    the anchor's output exactly constant (a constant sample shifted by 1e-20·…) the anchor divides
    0/0 and the kernels do not — a rounding artefact, not a rule."""
    values = SCALES if tiny else [v for v in SCALES if abs(v) != 1e-20]
    if draw(st.booleans()):
        return draw(st.sampled_from(values))
    return torch.tensor([draw(st.sampled_from(values)) for _ in range(batch)], dtype=torch.float64)


def _phi(draw, batch):
    choice = draw(st.sampled_from(["off", "number", "tensor"]))
    if choice == "off":
        return 0.0
    if choice == "number":
        return draw(st.sampled_from([0.3, 1.0]))
    return torch.tensor([draw(st.sampled_from([0.0, 0.5, 1.0])) for _ in range(batch)], dtype=torch.float64)


def _cast(x, dtype, device):
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32 if x.dtype == torch.float64 and x.dim() <= 1 else dtype)
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype, device) for v in x)
    return x


def _scalar_tensor(x, device):
    return x.to(device=device, dtype=torch.float32) if isinstance(x, torch.Tensor) else x


def _conditioned(pre: torch.Tensor) -> torch.Tensor:
    """Per sample: whether a rescale of ``pre`` (the value before it) is well conditioned. Its
    ratio std(ref)/std(pre) amplifies rounding noise when std(pre) is itself at rounding level
    against |pre| (a sample that cancels to a constant up to rounding): the float64 anchor and an
    fp32 kernel then legitimately disagree. Exactly constant samples (0/0 = NaN on every backend)
    are the deterministic tests' business; all-zero and non-finite samples are kept."""
    flat = pre.flatten(1).double()
    finite = torch.isfinite(flat).all(1)
    big = flat.abs().nan_to_num(0.0, 0.0, 0.0).amax(1)
    std = flat.std(1) if flat.shape[1] > 1 else torch.full((flat.shape[0],), math.inf, dtype=flat.dtype)
    return ~finite | (big == 0) | (std > 1e-4 * big)


def _check(out, truth64, lowp, what, subset_rule=False, keep=None):
    """``lowp``: the reference in fp32 (the kernels' compute precision) on the same rounded inputs,
    rounded to the output dtype — the bound stays meaningful where an fp16 formula would overflow.
    ``keep``: the samples compared (see _conditioned)."""
    if keep is not None:
        if not bool(keep.any()):
            return
        index = keep.nonzero().flatten()
        out, truth64, lowp = out.cpu()[index], truth64[index], lowp[index]
    truth = truth64.to(out.dtype).double()  # the output dtype's own overflow
    lowp = lowp.to(out.dtype)
    got = to64(out)
    if subset_rule:
        assert bool((~torch.isfinite(got) <= ~torch.isfinite(truth)).all()), f"{what}: non-finite beyond the anchor's"
        both = torch.isfinite(truth) & torch.isfinite(got)
        got, truth = got.where(both, 0.0), truth.where(both, 0.0)
        lowp = lowp.where(torch.isfinite(lowp), torch.zeros_like(lowp))
        out = got.to(out.dtype)
    assert_close_to_truth(out, lowp, truth, factor=4.0, ulps=16.0, what=what)


def _dtype(draw):
    return draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16]))


# --------------------------------------------------------------------------- guidance_combine (+ rescale, CFG-Norm, Mahiro)


@_settings(30)
@given(data=st.data())
def test_guidance_combine(emulated, monkeypatch, data):
    u, c, p = data.draw(branches(3, [(1,), (3,), (2, 3, 5), (4, 1, 7)]))
    batch = u.shape[0]
    g64 = gk.cfg(_scale(data.draw, batch)) + gk.pag(_scale(data.draw, batch))
    post = data.draw(st.sampled_from(["none", "rescale", "cfg_norm", "mahiro"]))
    kw64 = {}
    if post == "rescale":
        kw64["rescale"] = _phi(data.draw, batch)
    elif post == "cfg_norm":
        kw64["cfg_norm"] = data.draw(st.sampled_from([0.5, 1.0])) if data.draw(st.booleans()) else torch.tensor(
            [1.5] * batch, dtype=torch.float64)
    elif post == "mahiro":
        kw64["mahiro"] = True
    dtype = _dtype(data.draw)
    if post in ("rescale", "cfg_norm", "mahiro") and u.dim() < 2:
        return
    u, c, p = (x.to(dtype).double() for x in (u, c, p))  # what the kernels see

    def reference(bs, g, kw):
        out = R.guidance_combine(bs, g, rescale=kw.get("rescale", 0.0))
        if "cfg_norm" in kw:
            out = R.cfg_norm(out, bs[1], kw["cfg_norm"])
        if "mahiro" in kw:
            out = R.mahiro(out, bs[1], bs[0], g.terms[0].scale)
        return out

    truth = reference([u, c, p], g64, kw64)
    keep = _conditioned(R.guidance_combine([u, c, p], g64)) if post == "rescale" else None
    lowp_branches = [x.to(dtype) for x in (u, c, p)]
    g32 = gk.Guidance(g64.base, tuple(gk.Term(t.pos, t.neg, _scalar_tensor(t.scale, "cpu")) for t in g64.terms))
    lowp = reference([x.float() for x in (u, c, p)], g32, {k: _scalar_tensor(v, "cpu") for k, v in kw64.items()})
    for lane in _lanes(emulated):
        def call(backend, device):
            g = gk.Guidance(g64.base, tuple(gk.Term(t.pos, t.neg, _scalar_tensor(t.scale, device)) for t in g64.terms))
            kw = {k: _scalar_tensor(v, device) for k, v in kw64.items()}
            stacked = torch.cat([x.to(device) for x in lowp_branches])
            return gk.guidance_combine(stacked, g, backend=backend, **kw)
        _check(_run(lane, emulated, monkeypatch, call), truth, lowp, f"{lane} {post} {dtype}", keep=keep)


# --------------------------------------------------------------------------- the two-branch ops


def _truth_tcfg(c, u, scale, **kw):
    """The SVD anchor in float64; a sample holding NaN or inf is NaN (the anchor raises). One
    element per sample: the anchor indexes a second singular vector that does not exist; the
    meaning is u' = u (the only direction), i.e. CFG."""
    bad = ~torch.isfinite(c.flatten(1)).all(1) | ~torch.isfinite(u.flatten(1)).all(1)
    clean = [x.masked_fill(bad.view(-1, *[1] * (x.dim() - 1)), 0.0) for x in (c, u)]
    if c[0].numel() == 1:
        out = _plain_cfg(*clean, scale, **kw)
    else:
        out = R.tcfg_combine(*clean, scale, **kw)
    return out.masked_fill(bad.view(-1, *[1] * (out.dim() - 1)), math.nan)


def _plain_cfg(c, u, scale, *, original_formulation=False, rescale=0.0):
    out = (c if original_formulation else u) + R._per_sample(scale, c) * (c - u)
    return R.rescale_noise_cfg(out, c, rescale) if isinstance(rescale, torch.Tensor) or rescale > 0 else out


TWO_BRANCH = {
    "apg": (gk.apg_combine, R.apg_combine),
    "cfg_zero_star": (gk.cfg_zero_star_combine, R.cfg_zero_star_combine),
    "tcfg": (gk.tcfg_combine, _truth_tcfg),
    "mag": (gk.mag_combine, R.mag_combine),
}


@_settings(40)
@given(data=st.data())
def test_two_branch_ops(emulated, monkeypatch, data):
    name = data.draw(st.sampled_from(sorted(TWO_BRANCH) + ["apg_momentum"]))
    u, c = data.draw(branches(2, [(1,), (3,), (2, 3, 5), (4, 1, 7)]))
    batch = u.shape[0]
    kw = {"rescale": _phi(data.draw, batch)}
    scale = _scale(data.draw, batch, tiny=not (isinstance(kw["rescale"], torch.Tensor) or kw["rescale"] > 0))
    buf64 = None
    if name in ("apg", "apg_momentum"):
        if name == "apg_momentum" or data.draw(st.booleans()):
            kw["formulation"] = data.draw(st.sampled_from(_spec.APG_FORMULATIONS + _spec.APG_CFG_FORMULATIONS))
        if kw.get("formulation", "paper") in _spec.APG_FORMULATIONS:
            kw["eta"] = data.draw(st.sampled_from([0.0, 0.5, 1.0]))
            kw["norm_threshold"] = data.draw(st.sampled_from([0.0, 2.0]))
        if name == "apg_momentum":
            kw["momentum"] = -0.5
            buf64 = torch.randn(u.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(batch))
    elif name == "mag":
        kw["alpha"] = data.draw(st.sampled_from([0.0, 2.0, 8.0]))
    if name in ("cfg_zero_star", "tcfg", "mag"):
        kw["original_formulation"] = data.draw(st.booleans())
    ours, reference = TWO_BRANCH["apg" if name == "apg_momentum" else name]
    dtype = _dtype(data.draw)
    u, c = u.to(dtype).double(), c.to(dtype).double()
    truth_buf = buf64.clone() if buf64 is not None else None
    keep = None
    if isinstance(kw["rescale"], torch.Tensor) or kw["rescale"] > 0:
        pre_buf = buf64.clone() if buf64 is not None else None
        keep = _conditioned(reference(c, u, scale, **(kw | {"rescale": 0.0}),
                                      **({"momentum_buffer": pre_buf} if buf64 is not None else {})))
    truth = reference(c, u, scale, **kw, **({"momentum_buffer": truth_buf} if buf64 is not None else {}))
    lowp_buf = buf64.float() if buf64 is not None else None
    lowp = reference(c.float(), u.float(), _scalar_tensor(scale, "cpu"),
                     **{k: _scalar_tensor(v, "cpu") for k, v in kw.items()},
                     **({"momentum_buffer": lowp_buf} if buf64 is not None else {}))
    for lane in _lanes(emulated):
        def call(backend, device):
            buf = buf64.float().to(device) if buf64 is not None else None
            out = ours([u.to(device, dtype), c.to(device, dtype)], _scalar_tensor(scale, device), backend=backend,
                       **{k: _scalar_tensor(v, device) for k, v in kw.items()},
                       **({"momentum_buffer": buf} if buf is not None else {}))
            return out, buf
        out, buf = _run(lane, emulated, monkeypatch, call)
        _check(out, truth, lowp, f"{lane} {name} {kw} {dtype}", keep=keep)
        if buf is not None:
            assert torch.equal(torch.isnan(buf.cpu()), torch.isnan(truth_buf)), f"{lane} buffer NaN pattern"


# --------------------------------------------------------------------------- fdg_combine


def _fdg_conditioned(c, u, scales, kw) -> torch.Tensor:
    """_conditioned for FDG's rescales: the data-space value before it, or every frequency-rescaled
    level's guided value (the anchor's own level arithmetic, written out)."""
    if kw.get("rescale_space", "data") == "data":
        return _conditioned(R.fdg_combine(c, u, scales, **(kw | {"rescale": 0.0})))
    levels = len(scales)
    c4, u4 = (x.reshape(x.shape[0], -1, *x.shape[-2:]) for x in (c, u))
    lc, lu = R.laplacian_pyramid(c4, levels), R.laplacian_pyramid(u4, levels)
    weight = kw.get("parallel_weights", 1.0)
    keep = torch.ones(c.shape[0], dtype=torch.bool)
    for i, phi in enumerate(kw["rescale"]):
        if not (isinstance(phi, torch.Tensor) or phi > 0):
            continue
        shift = lc[i] - lu[i]
        if weight != 1.0:
            parallel, orthogonal = R._project(shift, lc[i])
            shift = weight * parallel + orthogonal
        base = lc[i] if kw["original_formulation"] else lu[i]
        keep &= _conditioned(base + R._per_sample(scales[i], base) * shift)
    return keep


@_settings(15)
@given(data=st.data())
def test_fdg_combine(emulated, monkeypatch, data):
    u, c = data.draw(branches(2, [(1, 4, 4), (2, 6, 10), (3, 8, 8), (1, 5, 3)]))
    batch, height, width = u.shape[0], u.shape[-2], u.shape[-1]
    deepest = max(n for n in (1, 2, 3) if _spec.fdg_level_sizes(height, width, n) is not None)
    levels = data.draw(st.integers(1, deepest))
    kw = {"original_formulation": data.draw(st.booleans())}
    if data.draw(st.booleans()):
        kw["parallel_weights"] = data.draw(st.sampled_from([0.5, 0.0]))
    if data.draw(st.booleans()):
        kw["rescale_space"] = "freq"
        kw["rescale"] = [_phi(data.draw, batch) for _ in range(levels)]
        phis = kw["rescale"]
    else:
        kw["rescale"] = _phi(data.draw, batch)
        phis = [kw["rescale"]]
    rescaling = any(isinstance(phi, torch.Tensor) or phi > 0 for phi in phis)
    scales = [_scale(data.draw, batch, tiny=not rescaling) for _ in range(levels)]
    dtype = _dtype(data.draw)
    u, c = u.to(dtype).double(), c.to(dtype).double()
    truth = R.fdg_combine(c, u, scales, **kw)
    keep = _fdg_conditioned(c, u, scales, kw) if rescaling else None
    lowp = R.fdg_combine(c.float(), u.float(), _cast(scales, torch.float32, "cpu"), **_cast(kw, torch.float32, "cpu"))
    for lane in _lanes(emulated):
        def call(backend, device):
            return gk.fdg_combine(torch.cat([u, c]).to(device, dtype), _cast(scales, dtype, device), backend=backend,
                                  **_cast(kw, dtype, device))
        _check(_run(lane, emulated, monkeypatch, call), truth, lowp, f"{lane} fdg L={levels} {kw} {dtype}",
               subset_rule=True, keep=keep)
