"""Host lane for the CUDA backend: the kernels' arithmetic, run on the CPU.

``tests/host/guidance_combine_host.cpp`` emulates the kernels of
``csrc/include/guidance_kernels/guidance_combine.cuh`` with their own ``__host__ __device__``
functions over the same block / thread / group decomposition and merge order, compiled with g++
(the header needs no CUDA toolkit then). This module plans launches exactly as
``guidance_kernels/cuda/guidance_combine.py`` does (``_layout.output_like / plan / partitions``)
on CPU tensors, feeds the storage the plan addresses to the emulator and compares what comes back
with the references: bit-exact for the fp32 plain combine, within the flash-attention-style bound
of ``helpers.assert_close_to_truth`` otherwise. It also checks the building blocks directly:
64-bit division by invariants and strided offsets beyond 2**31, fp16/bf16 conversions against
torch, and Chan-merged moments against a two-pass float64 computation.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

import guidance_kernels as gk
from guidance_kernels import _extension, _layout, backends
from guidance_kernels import reference as R
from guidance_kernels._spec import APG_FORMULATIONS
import host_lane
from host_lane import FMT, from_bits, storage, to_bits
from helpers import DTYPES, LAYOUTS, assert_close_to_truth, make_strided, to64

NAME = "guidance_combine_host"


class Host:
    """The compiled emulator: one request per call, text in, text out."""

    def __init__(self, exe: Path):
        self.exe = exe
        (line,) = self.run("constants")
        self.tile, self.group, self.threads, self.row = (int(x) for x in line.split()[1:])

    def run(self, request: str) -> list[str]:
        return host_lane.run(self.exe, request)


@pytest.fixture(scope="session")
def host(tmp_path_factory) -> Host:
    return Host(host_lane.build_gxx(NAME, tmp_path_factory.mktemp("host")))


# --------------------------------------------------------------------------- serialising a launch


def _max_offset(geometry: list[int]) -> int:
    batch, _, n0, n1, n2, s0, s1, s2, batch_stride, _ = geometry
    return (batch - 1) * batch_stride + (n0 - 1) * s0 + (n1 - 1) * s1 + (n2 - 1) * s2


def _tensor_field(t: torch.Tensor, geometry: list[int]) -> str:
    count = _max_offset(geometry) + 1
    available = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
    assert count <= available, "the plan addresses elements outside the storage (the launcher rejects this)"
    return f"{count} {to_bits(storage(t, count))}"


def _dense_field(t: torch.Tensor) -> str:
    return f"{t.numel()} {to_bits(storage(t, t.numel()))}"


def _scale_field(number: float, tensor: torch.Tensor | None, batch: int) -> str:
    """As the launcher reads a scale: a number, or fp32 memory at ptr[b * stride]."""
    if tensor is None:
        return f"n {float(number).hex()}"
    stride = 0 if tensor.numel() == 1 else tensor.stride(0)
    count = (batch - 1) * stride + 1 if stride else 1
    return f"t {count} {stride} " + " ".join(float(v).hex() for v in storage(tensor, count).tolist())


class FakeExtension:
    """Stands in for ``guidance_kernels._C`` on CPU tensors: the entry points and arguments of
    csrc/guidance_combine_bindings.cpp, computed by the emulator. Like the launcher it takes the
    vectorised path when rank, strides and 16-byte alignment allow; it then also runs the strided
    path and requires both to agree bit for bit. ``paths`` records what ran."""

    def __init__(self, host: Host):
        self.host = host
        self.GUIDANCE_COMBINE_TILE = host.tile
        self.GUIDANCE_COMBINE_THREADS = host.threads
        self.paths: list[tuple[int, ...]] = []

    def _vector_ok(self, geometry: list[int], tensors: list[torch.Tensor]) -> bool:
        batch, inner, _, _, _, _, _, s2, batch_stride, rank = geometry
        itemsize = tensors[0].element_size()
        return (rank == 1 and s2 == 1 and inner % self.host.group == 0
                and (batch == 1 or batch_stride * itemsize % 16 == 0) and all(t.data_ptr() % 16 == 0 for t in tensors))

    def _run(self, head: str, geometry: list[int], lines: list[str], tensors: list[torch.Tensor]) -> list[str]:
        paths = (0, 1) if self._vector_ok(geometry, tensors) else (0,)
        self.paths.append(paths)
        replies = [self.host.run("\n".join([head.format(vec=vec), "geometry " + " ".join(map(str, geometry)),
                                             *lines, "end"])) for vec in paths]
        assert all(r == replies[0] for r in replies), "the vectorised and the strided path disagree"
        return replies[-1]

    def guidance_combine(self, out, xs, base, pos, neg, scales, scale_tensors, rescale, ref, phi, phi_tensor,
                         geometry, parts, chunk):
        batch = geometry[0]
        lines = [f"plan {parts} {chunk}", f"slots {len(xs)}", *(_tensor_field(t, geometry) for t in xs),
                 f"base {base}", f"terms {len(pos)}"]
        lines += [f"{p} {n} {_scale_field(v, t, batch)}" for p, n, v, t in zip(pos, neg, scales, scale_tensors)]
        lines.append(f"rescale {int(rescale)} {ref} {_scale_field(phi, phi_tensor, batch)}")
        (reply,) = self._run(f"combine fmt {FMT[out.dtype]} vec {{vec}}", geometry, lines, [*xs, out])
        storage(out, out.numel()).copy_(from_bits(reply.split()[2:], out.dtype))

    def projected_combine(self, out, cond, uncond, momentum_buffer, kind, formulation, scale, scale_tensor, eta,
                          norm_threshold, momentum, alpha, rescale, phi, phi_tensor, geometry, parts, chunk):
        batch = geometry[0]
        buf = momentum_buffer
        lines = [f"plan {parts} {chunk}", f"cond {_tensor_field(cond, geometry)}",
                 f"uncond {_tensor_field(uncond, geometry)}"]
        if buf is not None:
            lines.append(f"buffer {_dense_field(buf)}")
        lines += [f"formulation {formulation}", f"scale {_scale_field(scale, scale_tensor, batch)}",
                  f"eta {float(eta).hex()}", f"threshold {float(norm_threshold).hex()}",
                  f"momentum {float(momentum).hex()}", f"alpha {float(alpha).hex()}",
                  f"rescale {int(rescale)} {_scale_field(phi, phi_tensor, batch)}"]
        buf_fmt = FMT[buf.dtype] if buf is not None else "none"
        head = f"projected kind {kind} fmt {FMT[out.dtype]} buf {buf_fmt} vec {{vec}}"
        replies = self._run(head, geometry, lines, [cond, uncond, out] + ([buf] if buf is not None else []))
        storage(out, out.numel()).copy_(from_bits(replies[0].split()[2:], out.dtype))
        if buf is not None:
            storage(buf, buf.numel()).copy_(from_bits(replies[1].split()[2:], buf.dtype))


    def channel_combine(self, out, xs, base, pos, neg, scales, scale_tensors, kind, ref, strength, strength_tensor,
                        geometry, parts, chunk):
        batch, channels, p1, p2, bs, cs, s1, s2 = geometry[:8]
        count = (batch - 1) * bs + (channels - 1) * cs + (p1 - 1) * s1 + (p2 - 1) * s2 + 1
        fields = []
        for t in xs:
            assert count <= t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
            fields.append(f"{count} {to_bits(storage(t, count))}")
        lines = [f"channel kind {kind} fmt {FMT[out.dtype]}", "geometry " + " ".join(map(str, geometry)),
                 f"plan {parts} {chunk}", f"slots {len(xs)}", *fields, f"base {base}", f"terms {len(pos)}"]
        lines += [f"{p} {n} {_scale_field(v, t, batch)}" for p, n, v, t in zip(pos, neg, scales, scale_tensors)]
        lines += [f"ref {ref}", f"strength {_scale_field(strength, strength_tensor, batch)}", "end"]
        (reply,) = self.host.run("\n".join(lines))
        storage(out, out.numel()).copy_(from_bits(reply.split()[2:], out.dtype))


@pytest.fixture
def cuda_on_cpu(host, monkeypatch) -> FakeExtension:
    """The public API with backend "cuda" served on CPU tensors by the emulator: validation, the
    custom op, the real glue (guidance_kernels/cuda/guidance_combine.py) and its planning run as on
    a GPU; only the extension module is replaced."""
    fake = FakeExtension(host)
    monkeypatch.setattr(_extension, "load", lambda: fake)
    monkeypatch.setattr(backends, "select", lambda op, tensor, facts=(), backend=None: "cuda")
    return fake


def _branches(k, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    return [(base + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype) for _ in range(k)]


def _guidance64(g):
    return gk.Guidance(g.base, tuple(gk.Term(t.pos, t.neg, to64(t.scale)) for t in g.terms))


SHAPES = [(1, 4, 5, 7), (2, 3, 9, 11), (3, 16, 33), (2, 1), (2, 4, 40, 41)]


# --------------------------------------------------------------------------- guidance_combine


def _targets(monkeypatch, target: int) -> None:
    """Blocks the reduction planner aims for (4 x SMs on a GPU, 4 on CPU): varies the chunking."""
    monkeypatch.setattr(_layout, "target_programs", lambda device: target)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_plain_combine_fp32_is_bit_exact(cuda_on_cpu, shape, layout):
    """fp32 plain combine: one rounding per operation in the reference's order, so the kernels
    return exactly what the eager fp32 reference does, on both paths, stacked or separate."""
    branches = [make_strided(b, layout) for b in _branches(3, shape, torch.float32, seed=1)]
    per_sample = torch.linspace(2.0, 9.0, shape[0])
    guidance = gk.cfg(7.5) + gk.pag(per_sample, perturbed=2)
    expect = R.guidance_combine(branches, guidance)
    stacked = torch.cat([b.contiguous() for b in branches])
    for pred, first in ((branches, branches[0]), (stacked, stacked[: shape[0]])):
        out = gk.guidance_combine(pred, guidance)
        assert torch.equal(out, expect), f"max diff {(out - expect).abs().max()}"
        assert out.stride() == _layout.output_like(first).stride()


def test_both_paths_are_exercised(cuda_on_cpu):
    """The bit-exactness above covers the vectorised path too (aligned contiguous inputs) and the
    strided one (a one-element offset breaks the 16-byte alignment)."""
    u, c = _branches(2, (2, 4, 8, 8), torch.float32, seed=2)
    gk.guidance_combine([u, c], gk.cfg(3.0))
    shifted = torch.empty(2 * 2 * 256 + 1)[1:].view(4, 4, 8, 8).copy_(torch.cat([u, c]))
    out = gk.guidance_combine(shifted, gk.cfg(3.0))
    assert cuda_on_cpu.paths == [(0, 1), (0,)]
    assert torch.equal(out, R.guidance_combine([u, c], gk.cfg(3.0)))


def test_eight_branches_eight_terms_strided_scale(cuda_on_cpu):
    """Every slot and term position, branch indices in any order, repeated branches, and a
    per-sample scale read through a non-unit stride."""
    branches = _branches(8, (3, 2, 5, 8), torch.float32, seed=2)
    rng = random.Random(0)
    strided = torch.tensor([1.5, -7.0, 0.25, 9.0, -2.0, 3.0])[::2]  # stride 2
    terms = []
    for t in range(8):
        scale = strided if t == 3 else torch.tensor(0.5 * t - 1.0) if t == 5 else rng.uniform(-4, 8)
        terms.append(gk.Term(rng.randrange(8), rng.randrange(8), scale))
    guidance = gk.Guidance(5, tuple(terms))
    assert torch.equal(gk.guidance_combine(torch.cat(branches), guidance, num_branches=8),
                       R.guidance_combine(branches, guidance))
    assert cuda_on_cpu.paths == [(0, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_combine_with_rescale_matches_reference(cuda_on_cpu, monkeypatch, dtype, layout):
    branches = [make_strided(b, layout) for b in _branches(4, (3, 5, 20, 33), dtype, seed=3)]
    guidance = gk.cfg(torch.tensor([2.0, 5.0, 9.0])) + gk.pag(1.5, perturbed=2) + gk.seg(2.5, perturbed=3)
    for phi in (0.0, 0.7, torch.tensor([0.0, 0.5, 1.0])):
        truth = R.guidance_combine(to64(branches), _guidance64(guidance), rescale=to64(phi))
        lowp = R.guidance_combine(branches, guidance, rescale=phi)
        for target in (4, 64):  # one chunk per sample, and several
            _targets(monkeypatch, target)
            out = gk.guidance_combine(branches, guidance, rescale=phi)
            assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"{layout} phi={phi} target={target}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_tile_chunks_and_partial_groups(cuda_on_cpu, monkeypatch, dtype):
    """Chunks of several tiles per block (the loop in pass 2) and samples whose size is not a
    multiple of the group (a partial group at each sample's end, strided path only)."""
    for shape in ((2, 3, 61, 67), (1, 4, 128, 128)):
        branches = _branches(3, shape, dtype, seed=4)
        guidance = gk.cfg(5.0) + gk.pag(2.0)
        truth = R.guidance_combine(to64(branches), guidance, rescale=0.5)
        lowp = R.guidance_combine(branches, guidance, rescale=0.5)
        for target in (1, 3, 1000):
            _targets(monkeypatch, target)
            out = gk.guidance_combine(torch.cat(branches), guidance, rescale=0.5)
            assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"{shape} target={target}")


def test_nan_inf_and_single_element(cuda_on_cpu):
    u, c, p = _branches(3, (2, 3, 4, 5), torch.float32, seed=5)
    c[0, 1, 2, 3] = float("nan")
    p[1, 0, 0, 0] = float("inf")
    g = gk.cfg(7.5) + gk.pag(3.0)
    for phi in (0.0, 0.5):
        expect = R.guidance_combine([u, c, p], g, rescale=phi)
        out = gk.guidance_combine([u, c, p], g, rescale=phi)
        assert torch.equal(torch.isnan(out), torch.isnan(expect))
        assert torch.equal(torch.isinf(out), torch.isinf(expect))
        finite = torch.isfinite(expect)
        torch.testing.assert_close(out[finite], expect[finite], rtol=1e-6, atol=1e-6)
    one = torch.randn(2, 1)  # std of one element: NaN, as torch.std
    assert torch.isnan(gk.guidance_combine(one, gk.cfg(5.0), rescale=0.5)).all()


# --------------------------------------------------------------------------- apg / cfg-zero*


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("formulation", APG_FORMULATIONS)
def test_apg_matches_reference(cuda_on_cpu, dtype, formulation):
    u, c = _branches(2, (3, 4, 19, 40), dtype, seed=6)
    for threshold, momentum, buf_dtype in ((0.0, 0.0, None), (15.0, 0.0, None), (3.0, -0.5, torch.float32),
                                           (3.0, 0.7, dtype)):
        scale = torch.tensor([5.0, 2.0, 8.0]) if threshold == 15.0 else 5.0
        buf = None
        if buf_dtype is not None:
            buf = torch.randn(u.shape, generator=torch.Generator().manual_seed(7)).to(buf_dtype)
        kw = dict(eta=0.3, norm_threshold=threshold, momentum=momentum, formulation=formulation, rescale=0.6)
        buf_truth = buf.double().clone() if buf is not None else None
        truth = R.apg_combine(to64(c), to64(u), to64(scale), momentum_buffer=buf_truth, **kw)
        lowp = R.apg_combine(c, u, scale, momentum_buffer=buf.to(dtype).clone() if buf is not None else None, **kw)
        out = gk.apg_combine(torch.cat([u, c]), scale, momentum_buffer=buf, **kw)
        assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"thr={threshold} m={momentum} buf={buf_dtype}")
        if buf is not None:
            tol = 1e-6 if buf_dtype == torch.float32 else 2 * 2.0 ** -(8 if dtype == torch.bfloat16 else 11)
            torch.testing.assert_close(to64(buf), buf_truth, rtol=tol, atol=tol)
    assert (0, 1) in cuda_on_cpu.paths


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("original", [False, True])
def test_cfg_zero_star_matches_reference(cuda_on_cpu, monkeypatch, dtype, original):
    u, c = _branches(2, (3, 4, 21, 19), dtype, seed=8)
    scale = torch.tensor([3.0, 5.0, 7.0])
    for phi in (0.0, 0.4, torch.tensor([0.1, 0.0, 0.9])):
        truth = R.cfg_zero_star_combine(to64(c), to64(u), to64(scale), original_formulation=original,
                                        rescale=to64(phi))
        lowp = R.cfg_zero_star_combine(c, u, scale, original_formulation=original, rescale=phi)
        for target in (4, 40):
            _targets(monkeypatch, target)
            out = gk.cfg_zero_star_combine([u, c], scale, original_formulation=original, rescale=phi)
            assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"phi={phi} target={target}")


def test_projected_strided_and_channels_last(cuda_on_cpu):
    """The strided path of the two-pass kernels (sliced inputs) and a channels-last batch, whose
    output and momentum buffer keep the channels-last layout."""
    u, c = (make_strided(x, "sliced") for x in _branches(2, (2, 4, 9, 13), torch.float32, seed=9))
    for fn, ref in ((gk.apg_combine, R.apg_combine), (gk.cfg_zero_star_combine, R.cfg_zero_star_combine)):
        truth, lowp = ref(to64(c), to64(u), 4.0, rescale=0.5), ref(c, u, 4.0, rescale=0.5)
        assert_close_to_truth(fn([u, c], 4.0, rescale=0.5), lowp, truth, factor=4.0, what=fn.__name__)
    assert cuda_on_cpu.paths == [(0,), (0,)]
    pred = torch.cat(_branches(2, (2, 4, 6, 8), torch.bfloat16, seed=10)).contiguous(memory_format=torch.channels_last)
    buf = gk.apg_momentum_buffer(pred)
    buf_truth = torch.zeros(2, 4, 6, 8, dtype=torch.float64)
    out = gk.apg_combine(pred, 5.0, momentum=-0.5, momentum_buffer=buf)
    truth = R.apg_combine(to64(pred[2:]), to64(pred[:2]), 5.0, momentum=-0.5, momentum_buffer=buf_truth)
    lowp = R.apg_combine(pred[2:], pred[:2], 5.0, momentum=-0.5, momentum_buffer=torch.zeros(2, 4, 6, 8))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_truth(out, lowp, truth, factor=4.0, what="channels-last")
    torch.testing.assert_close(to64(buf), buf_truth, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("original", [False, True])
def test_tcfg_and_mag_match_reference(cuda_on_cpu, monkeypatch, dtype, original):
    u, c = _branches(2, (3, 4, 16, 19), dtype, seed=12)
    scale = torch.tensor([3.0, 5.0, 7.0])
    for phi in (0.0, torch.tensor([0.1, 0.0, 0.9])):
        for target in (4, 40):
            _targets(monkeypatch, target)
            truth = R.tcfg_combine(to64(c), to64(u), to64(scale), original_formulation=original, rescale=to64(phi))
            lowp = R.tcfg_combine(c, u, scale, original_formulation=original, rescale=phi)
            out = gk.tcfg_combine([u, c], scale, original_formulation=original, rescale=phi)
            assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"tcfg phi={phi} target={target}")
            truth = R.mag_combine(to64(c), to64(u), to64(scale), alpha=2.0, original_formulation=original,
                                  rescale=to64(phi))
            lowp = R.mag_combine(c, u, scale, alpha=2.0, original_formulation=original, rescale=phi)
            out = gk.mag_combine(torch.cat([u, c]), scale, alpha=2.0, original_formulation=original, rescale=phi)
            assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"mag phi={phi} target={target}")
    assert (0, 1) in cuda_on_cpu.paths


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apg_mix_cfg_phase_feeds_the_buffer(cuda_on_cpu, dtype):
    u, c = _branches(2, (2, 4, 9, 16), dtype, seed=13)
    for formulation in ("cfg", "cfg_original"):
        for buf_dtype in (torch.float32, dtype):
            buf = torch.randn(u.shape, generator=torch.Generator().manual_seed(14)).to(buf_dtype)
            buf_truth = buf.double().clone()
            kw = dict(momentum=-0.5, formulation=formulation, rescale=0.3)
            truth = R.apg_combine(to64(c), to64(u), 4.0, momentum_buffer=buf_truth, **kw)
            lowp = R.apg_combine(c, u, 4.0, momentum_buffer=buf.to(dtype).clone(), **kw)
            out = gk.apg_combine([u, c], 4.0, momentum_buffer=buf, **kw)
            assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"{formulation} {buf_dtype}")
            tol = 1e-6 if buf_dtype == torch.float32 else 2 * 2.0 ** -(8 if dtype == torch.bfloat16 else 11)
            torch.testing.assert_close(to64(buf), buf_truth, rtol=tol, atol=tol)


def test_decided_non_finite_rules(cuda_on_cpu, monkeypatch):
    """The rules every backend follows, on the emulated CUDA kernels: constant and all-zero samples
    rescale to NaN (exact zero co-moments, also across chunks), alpha's plain sum keeps ±inf per
    element, and NaN passes through min/max."""
    g = gk.cfg(7.5) + gk.pag(3.0)
    for target in (4, 64):
        _targets(monkeypatch, target)
        for value in (0.3, 0.0):
            pred = torch.full((6, 3, 40, 50), value)
            pred[2:4] = -0.7
            assert torch.isnan(gk.guidance_combine(pred, g, rescale=0.7)).all()
            for fn in (gk.apg_combine, gk.cfg_zero_star_combine, gk.tcfg_combine, gk.mag_combine):
                assert torch.isnan(fn(pred[:4], 5.0, rescale=0.5)).all(), fn.__name__
    u, c = _branches(2, (2, 3, 4, 5), torch.float32, seed=15)
    c[0, 0, 0, 0] = float("inf")
    for original in (True, False):
        expect = R.cfg_zero_star_combine(c, u, 5.0, original_formulation=original)
        out = gk.cfg_zero_star_combine([u, c], 5.0, original_formulation=original)
        assert torch.equal(torch.isnan(out), torch.isnan(expect))
        assert torch.equal(torch.isposinf(out), torch.isposinf(expect))
    c[0, 0, 0, 0] = float("nan")
    out = gk.apg_combine([u, c], 5.0, norm_threshold=2.0)
    assert torch.equal(torch.isnan(out), torch.isnan(R.apg_combine(c, u, 5.0, norm_threshold=2.0)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_cfg_norm_and_mahiro_match_reference(cuda_on_cpu, monkeypatch, dtype, layout):
    """Channel-wise kernels: per position over the channels, Mahiro's per-sample mean over chunks."""
    branches = _branches(3, (3, 5, 23, 24), dtype, seed=16)
    if layout == "channels_last":
        branches = [b.contiguous(memory_format=torch.channels_last) for b in branches]
    elif layout == "sliced":
        branches = [make_strided(b, "sliced") for b in branches]
    scale = torch.tensor([4.0, 6.0, 7.5])
    g = gk.cfg(scale) + gk.pag(2.0)
    g64 = _guidance64(g)
    truth_out = R.guidance_combine(to64(branches), g64)
    lowp_out = R.guidance_combine(branches, g)
    u, c = branches[0], branches[1]
    for strength in (1.0, torch.tensor([0.5, 1.0, 2.0])):
        truth = R.cfg_norm(truth_out, to64(c), to64(strength))
        lowp = R.cfg_norm(lowp_out, c, strength)
        out = gk.guidance_combine(branches, g, cfg_norm=strength)
        assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"cfg_norm {layout} {strength}")
        if layout == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)
    for target in (4, 64):
        _targets(monkeypatch, target)
        truth = R.mahiro(truth_out, to64(c), to64(u), to64(scale))
        lowp = R.mahiro(lowp_out, c, u, scale)
        out = gk.guidance_combine(branches, g, mahiro=True)
        assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"mahiro {layout} target={target}")


# --------------------------------------------------------------------------- building blocks


def test_divider_is_exact(host):
    rng = random.Random(1)
    divisors = [1, 2, 3, 5, 7, 10, 641, 2**31 - 1, 2**31, 2**31 + 1, 2**32 + 3, 2**40 - 5, 2**62 - 1, 2**62]
    divisors += [rng.randrange(1, 2**62) for _ in range(20)] + [rng.randrange(1, 2**20) for _ in range(20)]
    for d in divisors:
        ns = [0, 1, d - 1, d, d + 1, 2**31 - 1, 2**31, 2**32 + 1, 2**63 - 1, 2**63 - 2]
        ns += [rng.randrange(0, 2**63) for _ in range(30)] + [rng.randrange(0, 2**33) for _ in range(30)]
        q = rng.randrange(1, max(2, (2**63 - 1) // d))
        ns += [q * d - 1, q * d, min(q * d + 1, 2**63 - 1)]
        (line,) = host.run(f"divide {d} {len(ns)} " + " ".join(map(str, ns)))
        got = [int(x) for x in line.split()[1:]]
        assert got == [n // d for n in ns], d


@pytest.mark.parametrize("rank,sizes,strides,batch_stride", [
    (1, (1, 1, 3 * 2**31 + 5), (0, 0, 3), 2**36),
    (2, (1, 2**20 + 1, 2**13 - 3), (0, 2**35 + 1, 2**14), 2**60 // 7),
    (3, (5, 7, 2**31 + 11), (2**40, 2**34 + 9, 1), 0),
    (3, (3, 2, 3), (1, 9, 3), 54),  # permuted strides, groups crossing every wrap
])
def test_offsets_beyond_int32(host, rank, sizes, strides, batch_stride):
    """Generic-path offsets (one division per group, then stepping) for huge sizes and strides,
    including groups that wrap the inner and middle dims."""
    n0, n1, n2 = sizes
    inner = n0 * n1 * n2
    geometry = f"geometry 4 {inner} {n0} {n1} {n2} {strides[0]} {strides[1]} {strides[2]} {batch_stride} {rank}"
    rng = random.Random(2)
    starts = [0, n2 - 3, n2 - 8, n1 * n2 - 5, inner - 8, inner - 3, inner - 1]
    starts += [rng.randrange(inner) for _ in range(40)]
    starts = [s for s in starts if 0 <= s < inner]
    queries = [(rng.randrange(4), s) for s in starts]
    lines = host.run(f"offsets {geometry} {len(queries)} " + " ".join(f"{b} {s}" for b, s in queries))
    for (b, start), line in zip(queries, lines):
        valid = min(8, inner - start)
        expect = []
        for idx in range(start, start + valid):
            i0, rest = divmod(idx, n1 * n2)
            i1, i2 = divmod(rest, n2)
            expect.append(b * batch_stride + i0 * strides[0] + i1 * strides[1] + i2 * strides[2])
        words = line.split()
        assert words[0] == "offsets" and int(words[1]) == valid, line
        assert [int(x) for x in words[2:]] == expect, (b, start, line)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_host_conversions_match_torch(host, dtype):
    """The emulator's fp16 / bf16 rounding (round to nearest even, subnormals, overflow) is torch's,
    so emulated 16-bit results are the ones the device intrinsics give."""
    g = torch.Generator().manual_seed(3)
    special = [0.0, -0.0, 1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-11, 1.0 + 3 * 2**-11, 65504.0, 65519.99,
               65520.0, -65520.0, 2.0**-24, 2.0**-25, 1.5 * 2**-25, 3 * 2**-25, 2.0**-14 - 2**-25, 2.0**-15 + 2**-26,
               1e-40, 3.4e38, float("inf"), float("-inf"), float("nan")]
    values = torch.cat([torch.tensor(special), torch.randn(400, generator=g) * torch.logspace(-9, 6, 400)])
    values = values.float()
    lines = host.run(f"convert {FMT[dtype]} {values.numel()} " + " ".join(float(v).hex() for v in values.tolist()))
    bits = torch.tensor([int(w, 16) for w in lines[0].split()[1:]])
    back = torch.tensor([float.fromhex(w) if w not in ("nan", "-nan") else math.nan for w in lines[1].split()[1:]])
    expect = values.to(dtype)
    expect_bits = expect.view(torch.int16).to(torch.int64) & 0xFFFF
    nan = torch.isnan(values)
    assert torch.equal(bits[~nan], expect_bits[~nan])
    assert torch.isnan(back[nan]).all()
    assert torch.equal(back[~nan], expect.float()[~nan].double())


@pytest.mark.parametrize("offset,tolerance", [(0.1, 2e-6), (1e4, 5e-5)])
@pytest.mark.parametrize("parts", [1, 3, 8])
def test_moments_chan_merge_matches_two_pass(host, offset, tolerance, parts):
    """Count, means and co-moments of three fields, Chan-merged in the kernels' orders (threads of
    one chunk folded by block_total; chunk rows folded like pass 2), against a two-pass float64
    computation on the same fp32 values. With a 1e4 offset on unit-variance data, E[x^2] - E[x]^2
    in fp32 would be pure noise (relative error ~ 1e8 * 2**-24); the merged co-moments stay within
    ``tolerance`` of their scale, and a fully sequential fold (an order the kernels never use: at
    most chunk / tile groups per thread) within 20x that."""
    g = torch.Generator().manual_seed(4)
    n = 20000
    x = offset + torch.randn(n, generator=g, dtype=torch.float64)
    fields = torch.stack([x, 0.5 * x + 0.1 * torch.randn(n, generator=g, dtype=torch.float64), 3.0 - x]).float()
    lines = host.run(f"moments {n} {parts} " + " ".join(float(v).hex() for v in fields.flatten().tolist()))
    f = fields.double()
    mean = f.mean(dim=1)
    centred = f - mean[:, None]
    pairs = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]
    comoments = [float((centred[i] * centred[j]).sum()) for i, j in pairs]
    raw = [float((f[i] * f[j]).sum()) for i, j in pairs]
    assert [line.split()[0] for line in lines] == ["sequential", "block", "rows"]
    for line in lines:
        order = line.split()[0]
        values = [float.fromhex(v) for v in line.split()[1:]]
        if order == "block" and parts > 1:
            continue  # the first chunk only
        factor = 20.0 if order == "sequential" else 1.0
        assert values[0] == n
        for got, want in zip(values[1:4], mean.tolist()):
            assert abs(got - want) <= factor * 1e-7 * (abs(want) + 1.0), (order, got, want)
        for (i, j), got, want in zip(pairs, values[4:10], comoments):
            bound = factor * tolerance * math.sqrt(comoments[i] * comoments[j])
            assert abs(got - want) <= bound, (order, (i, j), got, want)
        for (i, j), got, want in zip(pairs, values[10:], raw):  # plain fp32 sums: relative accuracy
            assert abs(got - want) <= factor * 1e-5 * math.sqrt(raw[i] * raw[j]), (order, "raw", (i, j), got, want)


# --------------------------------------------------------------------------- nvcc's host pass


@pytest.mark.nvcc
def test_nvcc_host_build_agrees_with_gxx(host, tmp_path, monkeypatch):
    """The header compiled as CUDA (nvcc's host pass, __CUDACC__ defined) computes the same bits."""
    other = Host(host_lane.build_nvcc_host(NAME, tmp_path))
    assert (other.tile, other.group, other.threads, other.row) == (host.tile, host.group, host.threads, host.row)
    monkeypatch.setattr(backends, "select", lambda op, tensor, facts=(), backend=None: "cuda")
    u, c, p = _branches(3, (2, 4, 12, 10), torch.bfloat16, seed=11)
    g = gk.cfg(6.0) + gk.pag(torch.tensor([1.0, 2.0]))
    results = []
    for emulator in (host, other):
        monkeypatch.setattr(_extension, "load", lambda e=emulator: FakeExtension(e))
        buf = torch.ones(2, 4, 12, 10)
        results.append([gk.guidance_combine([u, c, p], g), gk.guidance_combine([u, c, p], g, rescale=0.7),
                        gk.apg_combine([u, c], 5.0, norm_threshold=2.0, momentum=-0.5, momentum_buffer=buf), buf,
                        gk.cfg_zero_star_combine([u, c], 5.0, rescale=0.2)])
    assert all(torch.equal(a, b) for a, b in zip(*results))
