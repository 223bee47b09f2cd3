"""Host lane for sag_degrade's CUDA backend: the kernel's arithmetic, run on the CPU.

``tests/host/sag_degrade_host.cpp`` runs the kernel's own ``__host__ __device__`` stages
(csrc/include/guidance_kernels/sag_degrade.cuh) for every block and thread of the launch grid,
compiled with g++. ``FakeExtension`` stands in for ``guidance_kernels._C`` with the signature of
csrc/sag_degrade_bindings.cpp, so the public API, the custom op and the real glue
(guidance_kernels/cuda/sag_degrade.py) run as on a GPU; results are compared with the reference
(float64 truth, flash-attention-style bound). The index math is also checked on its own against
F.pad(mode="reflect") and F.interpolate(mode="nearest").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import guidance_kernels as gk
from guidance_kernels import _extension, backends
from guidance_kernels import reference as R
import host_lane
from host_lane import FMT, from_bits, storage, to_bits
from helpers import DTYPES, assert_close_to_truth, make_strided, to64

MAX_PLANES = 65535  # gridDim.z of the launcher


@pytest.fixture(scope="session")
def host(tmp_path_factory) -> Path:
    return host_lane.build_gxx("sag_degrade_host", tmp_path_factory.mktemp("host"))


# --------------------------------------------------------------------------- serialising a launch


def _span(t: torch.Tensor) -> int:
    """Storage elements a kernel can address through t's sizes and strides."""
    return sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1 if t.numel() else 0


def _field(t: torch.Tensor) -> str:
    count = _span(t)
    return f"{count} {to_bits(storage(t, count))} {' '.join(map(str, t.stride()))}"


class FakeExtension:
    """``guidance_kernels._C`` on CPU tensors: ``sag_degrade`` with the launcher's signature,
    computed by the emulator; ``grid_z`` (default: the launcher's min(B·C, 65535)) can be lowered
    to make blocks walk several planes."""

    def __init__(self, exe: Path):
        self.exe = exe
        self.grid_z: int | None = None
        self.calls = 0

    def sag_degrade(self, out, degraded, x0, mask_map, thresholded, threshold, weights, renoise, other, alpha,
                    alpha_value):
        self.calls += 1
        planes = x0.shape[0] * x0.shape[1]
        grid_z = min(planes, MAX_PLANES) if self.grid_z is None else self.grid_z
        if alpha is None:
            alpha_field = f"n {float(alpha_value).hex()}"
        else:
            stride = 0 if alpha.numel() == 1 else alpha.stride(0)
            count = (x0.shape[0] - 1) * stride + 1 if stride else 1
            alpha_field = f"t {count} {stride} " + " ".join(float(v).hex() for v in storage(alpha, count).tolist())
        lines = [f"degrade fmt {FMT[x0.dtype]} map {FMT[mask_map.dtype]} grid_z {grid_z}",
                 "shape " + " ".join(map(str, x0.shape)),
                 f"x0 {_field(x0)}",
                 f"other some {_field(other)}" if other is not None else "other none",
                 f"out {_span(out)} {' '.join(map(str, out.stride()))} degraded {int(degraded is not None)}",
                 f"mask {' '.join(map(str, mask_map.shape))} {' '.join(map(str, mask_map.stride()))} "
                 f"{_span(mask_map)} {to_bits(storage(mask_map, _span(mask_map)))}",
                 f"alpha {alpha_field}",
                 f"params {int(thresholded)} {float(threshold).hex()} {renoise} {len(weights)} "
                 + " ".join(float(w).hex() for w in weights),
                 "end"]
        replies = host_lane.run(self.exe, "\n".join(lines))
        targets = [out] + ([degraded] if degraded is not None else [])
        for reply, target in zip(replies, targets):
            words = reply.split()
            storage(target, int(words[1])).copy_(from_bits(words[2:], target.dtype))


@pytest.fixture
def cuda_on_cpu(host, monkeypatch) -> FakeExtension:
    """The public API with backend "cuda" served on CPU tensors by the emulator."""
    fake = FakeExtension(host)
    monkeypatch.setattr(_extension, "load", lambda: fake)
    monkeypatch.setattr(backends, "select", lambda op, tensor, facts=(), backend=None: "cuda")
    return fake


def _randn(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _compare(x0, mask_or_mass, *, factor=2.0, **kw):
    out, degraded = gk.sag_degrade(x0, mask_or_mass, return_degraded=True, **kw)
    truth = R.sag_degrade(to64(x0), to64(mask_or_mass) if mask_or_mass.is_floating_point() else mask_or_mass,
                          return_degraded=True, **{k: to64(v) for k, v in kw.items()})
    lowp = R.sag_degrade(x0, mask_or_mass, return_degraded=True, **kw)
    what = f"{x0.dtype} {tuple(x0.shape)} {sorted(kw)}"
    assert_close_to_truth(out, lowp[0], truth[0], factor=factor, what=what)
    assert_close_to_truth(degraded, lowp[1], truth[1], factor=factor, what=what + " degraded")
    return out


# --------------------------------------------------------------------------- index math


def test_index_math_matches_torch(host):
    """reflect_index equals F.pad(mode="reflect") within one reflection (in bounds beyond it);
    nearest_source_index equals F.interpolate(mode="nearest") for every size pair up to 40 → 80."""
    reflect, nearest = {}, {}
    for line in host_lane.run(host, "index"):
        kind, *vals = line.split()
        vals = [int(v) for v in vals]
        if kind == "r":
            reflect[(vals[0], vals[1])] = vals[2]
        elif kind == "n":
            nearest[(vals[0], vals[1])] = vals[2:]
        else:
            assert vals == [1, 1, 2]
    for n in range(1, 41):
        padded = F.pad(torch.arange(n, dtype=torch.float32).view(1, 1, n), (n - 1, n - 1), mode="reflect").view(-1) \
            if n > 1 else torch.zeros(1)
        for i in range(-8, n + 8):
            if -(n - 1) <= i <= 2 * (n - 1):
                assert reflect[(n, i)] == int(padded[i + n - 1]), (n, i)
            else:
                assert 0 <= reflect[(n, i)] < n, (n, i)
    assert len(nearest) == 40 * 80
    for (in_size, out_size), got in nearest.items():
        src = torch.arange(in_size, dtype=torch.float32).view(1, 1, 1, -1)
        assert got == F.interpolate(src, (1, out_size), mode="nearest").view(-1).long().tolist(), (in_size, out_size)


# --------------------------------------------------------------------------- the kernel, emulated


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_mass_modes_multi_tile(cuda_on_cpu, dtype):
    """Several 32x32 tiles with partial ones at both edges, awkward map grids, every re-noise
    mode, per-sample ᾱ and a number."""
    cases = [((2, 3, 70, 45), (9, 7), dict(eps=1, alpha_cumprod=torch.tensor([0.25, 0.9]))),
             ((1, 16, 5, 7), (2, 3), dict(x_t=1)),
             ((3, 2, 33, 64), (5, 8), dict(eps=1, alpha_cumprod=0.6)),
             ((1, 4, 40, 32), (20, 16), dict())]  # an exact 2x upscale (ATen's special case)
    for i, (shape, grid, extra) in enumerate(cases):
        x0 = _randn(shape, 20 + i, dtype)
        mass = _randn((shape[0], grid[0] * grid[1]), 30 + i).abs() * 1.4
        kw = {k: (_randn(shape, 40 + i, dtype) if isinstance(v, int) else v) for k, v in extra.items()}
        _compare(x0, mass, grid=grid, **kw)
    assert cuda_on_cpu.calls == len(cases)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masks_layouts_and_map_formats(cuda_on_cpu, dtype):
    """Soft fp32 / fp16 / bf16 masks, bool masks (bytes), batch-1 broadcast, strided and
    channels-last latents, a strided key mass."""
    shape = (2, 4, 36, 23)
    x0, eps = _randn(shape, 50, dtype), _randn(shape, 51, dtype)
    soft = torch.rand(2, 1, 5, 6, generator=torch.Generator().manual_seed(52))
    for map_dtype in (torch.float32, torch.float16, torch.bfloat16):
        _compare(x0, soft.to(map_dtype), eps=eps, alpha_cumprod=0.5)
    hard = torch.rand(1, 36, 23, generator=torch.Generator().manual_seed(53)) > 0.5
    _compare(x0, hard, x_t=eps)
    for layout in ("permuted", "sliced", "transposed"):
        _compare(make_strided(x0, layout), soft, eps=make_strided(eps, layout), alpha_cumprod=torch.tensor(0.7))
    mass = _randn((2, 2 * 30), 54).abs()[:, ::2] * 1.4  # strided (2, 30)
    out = _compare(x0.contiguous(memory_format=torch.channels_last), mass, grid=(5, 6), x_t=eps)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_kernel_sizes_minimum_latents_and_plane_loop(cuda_on_cpu):
    """1, 5, 9 and 15 taps down to min(H, W) = taps // 2 + 1; a launch grid with fewer planes than
    B·C (each block walks several planes, as beyond 65535 planes on a GPU)."""
    for k, sigma, (h, w) in ((1, 1.0, (3, 4)), (5, 2.0, (3, 9)), (15, 3.0, (8, 40)), (9, 0.5, (5, 5))):
        _compare(_randn((1, 4, h, w), 60 + k), _randn((1, 6), 61).abs() * 1.4, grid=(2, 3), kernel_size=k, sigma=sigma)
    cuda_on_cpu.grid_z = 3
    _compare(_randn((2, 5, 20, 40), 62), torch.rand(2, 4, 4), eps=_randn((2, 5, 20, 40), 63),
             alpha_cumprod=torch.tensor([0.3, 0.8]))


def test_matches_the_triton_and_torch_backends_closely(cuda_on_cpu, monkeypatch):
    """The three implementations agree to a few fp32 ulps (different tap order only)."""
    x0, eps = _randn((2, 4, 24, 32), 70), _randn((2, 4, 24, 32), 71)
    mass = _randn((2, 12), 72).abs() * 1.4
    out = gk.sag_degrade(x0, mass, grid=(3, 4), eps=eps, alpha_cumprod=0.4)
    monkeypatch.undo()
    torch_out = gk.sag_degrade(x0, mass, grid=(3, 4), eps=eps, alpha_cumprod=0.4, backend="torch")
    torch.testing.assert_close(out, torch_out, rtol=2e-6, atol=2e-6)


def test_nan_propagates_like_the_reference(cuda_on_cpu):
    x0 = _randn((1, 4, 40, 40), 80)
    x0[0, 1, 31, 3] = float("nan")  # next to a tile edge: the NaN reaches the neighbouring tile's halo
    mask = (torch.arange(40 * 40).reshape(1, 40, 40) % 3 == 0)
    out = gk.sag_degrade(x0, mask)
    want = R.sag_degrade(x0, mask)
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    finite = ~torch.isnan(want)
    torch.testing.assert_close(out[finite], want[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma", [0.2, 1.0])
def test_non_finite_values_follow_the_definition(cuda_on_cpu, sigma):
    """NaN and ±inf in x0, eps and a soft mask (a NaN weight included), with a σ whose outer
    float32 weights are exactly 0 (dropped taps): the same NaN pattern and inf signs as the float64
    truth, like the torch and triton backends (tests/test_fuzz_attention.py)."""
    x0, eps = _randn((2, 3, 13, 11), 90), _randn((2, 3, 13, 11), 91)
    x0[0, 0, 6, 5], x0[1, 2, 0, 0], x0[1, 1, 12, 10] = float("inf"), float("-inf"), float("nan")
    eps[0, 1, 3, 3] = float("inf")
    mask = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(92))
    mask[1, 2, 1] = float("nan")
    out = gk.sag_degrade(x0, mask, sigma=sigma, eps=eps, alpha_cumprod=0.5)
    truth = R.sag_degrade(to64(x0), to64(mask), sigma=sigma, eps=to64(eps), alpha_cumprod=0.5)
    assert torch.equal(torch.isnan(out), torch.isnan(truth))
    assert torch.equal(torch.isinf(out), torch.isinf(truth))
    assert torch.equal(to64(out)[torch.isinf(out)], truth[torch.isinf(truth)])
    finite = torch.isfinite(truth)
    torch.testing.assert_close(to64(out)[finite], truth[finite], rtol=1e-5, atol=1e-5)
