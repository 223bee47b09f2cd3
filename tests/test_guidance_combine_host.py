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
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import guidance_kernels as gk
from guidance_kernels import _layout
from guidance_kernels import reference as R
from guidance_kernels.cuda.guidance_combine import FORMULATIONS
from helpers import DTYPES, LAYOUTS, assert_close_to_truth, make_strided, needs, to64

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "host" / "guidance_combine_host.cpp"
INCLUDE = HERE.parent / "csrc" / "include"
CXX_FLAGS = ["-std=c++17", "-O2", "-ffp-contract=off", "-fno-strict-aliasing"]

FMT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
INT_VIEW = {4: torch.int32, 2: torch.int16}


class Host:
    """The compiled emulator: one request per call, text in, text out."""

    def __init__(self, exe: Path):
        self.exe = exe
        (line,) = self.run("constants")
        self.tile, self.group, self.threads, self.row = (int(x) for x in line.split()[1:])

    def run(self, request: str) -> list[str]:
        proc = subprocess.run([str(self.exe)], input=request, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return [line for line in proc.stdout.splitlines() if line]


def _compile(command: list[str]) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, " ".join(command) + "\n" + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Host:
    needs(shutil.which("g++") is not None, "g++ is not on PATH")
    exe = tmp_path_factory.mktemp("host") / "guidance_combine_host"
    _compile(["g++", *CXX_FLAGS, "-Wall", "-Wextra", "-Werror", f"-I{INCLUDE}", str(SOURCE), "-o", str(exe)])
    return Host(exe)


# --------------------------------------------------------------------------- serialising a launch


def _bits(flat: torch.Tensor) -> str:
    size = flat.element_size()
    ints = flat.contiguous().view(INT_VIEW[size]).to(torch.int64) & ((1 << (8 * size)) - 1)
    return " ".join(f"{v:x}" for v in ints.tolist())


def _from_bits(words: list[str], dtype: torch.dtype) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    ints = torch.tensor([int(w, 16) for w in words], dtype=torch.int64)
    ints = torch.where(ints >= 1 << (8 * size - 1), ints - (1 << (8 * size)), ints)
    return ints.to(INT_VIEW[size]).view(dtype)


def _storage(t: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` storage elements from ``t``'s data pointer on (what a kernel can address)."""
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset(), (count,), (1,))


def _max_offset(plan: _layout.Plan) -> int:
    n0, n1, n2 = plan.sizes
    s0, s1, s2 = plan.strides
    return (plan.batch - 1) * plan.batch_stride + (n0 - 1) * s0 + (n1 - 1) * s1 + (n2 - 1) * s2


def _tensor_field(t: torch.Tensor, plan: _layout.Plan) -> str:
    count = _max_offset(plan) + 1
    available = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
    assert count <= available, "the plan addresses elements outside the storage (the launcher rejects this)"
    return f"{count} {_bits(_storage(t, count))}"


def _geometry(plan: _layout.Plan) -> str:
    return "geometry " + " ".join(str(v) for v in (plan.batch, plan.inner, *plan.sizes, *plan.strides,
                                                    plan.batch_stride, plan.rank))


def _scale_field(value, batch: int) -> str:
    """As the launcher reads a scale: a number, or fp32 memory at ptr[b * stride]."""
    if not isinstance(value, torch.Tensor):
        return f"n {float(value).hex()}"
    t = value.reshape(-1).to(torch.float32)
    stride = 0 if t.numel() == 1 else t.stride(0)
    count = (batch - 1) * stride + 1 if stride else 1
    values = _storage(t, count).tolist()
    return f"t {count} {stride} " + " ".join(float(v).hex() for v in values)


def _vector_ok(host: Host, plan: _layout.Plan, pointers: list[torch.Tensor]) -> bool:
    """The launcher's choice of the vectorised path (csrc/guidance_combine.cu: vector_path)."""
    itemsize = pointers[0].element_size()
    return (plan.rank == 1 and plan.strides[2] == 1 and plan.inner % host.group == 0
            and (plan.batch == 1 or plan.batch_stride * itemsize % 16 == 0)
            and all(t.data_ptr() % 16 == 0 for t in pointers))


def _read_dense(words: list[str], like: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Values written at b * inner + idx of ``target``'s storage, viewed through its strides."""
    _storage(target, target.numel()).copy_(_from_bits(words, like.dtype))
    return target


def _paths(host: Host, plan, pointers, force_generic: bool) -> list[int]:
    return [0] + ([1] if not force_generic and _vector_ok(host, plan, pointers) else [])


def _parts(host: Host, plan, reduce: bool, target: int) -> tuple[int, int]:
    if not reduce:
        return -(-plan.inner // host.tile), host.tile
    return _layout.partitions(plan.batch, plan.inner, host.tile, target)


def emulate_combine(host: Host, branches, guidance: gk.Guidance, *, rescale=0.0, rescale_ref=None, target=4,
                    force_generic=False) -> dict[int, torch.Tensor]:
    """guidance_kernels.cuda.guidance_combine on the emulator: {vector path?: output}."""
    pos = [t.pos for t in guidance.terms]
    neg = [t.neg for t in guidance.terms]
    do_rescale = isinstance(rescale, torch.Tensor) or rescale > 0
    ref = (pos[0] if pos else guidance.base) if rescale_ref is None else rescale_ref
    used = sorted({guidance.base, *pos, *neg, *([ref] if do_rescale else [])})
    slot = {k: i for i, k in enumerate(used)}
    out = _layout.output_like(branches[0])
    plan = _layout.plan([branches[k] for k in used], out)
    parts, chunk = _parts(host, plan, do_rescale, target)
    batch = plan.batch
    lines = [f"plan {parts} {chunk}", f"slots {len(used)}"]
    lines += [_tensor_field(t, plan) for t in plan.tensors]
    lines.append(f"base {slot[guidance.base]}")
    lines.append(f"terms {len(pos)}")
    lines += [f"{slot[t.pos]} {slot[t.neg]} {_scale_field(t.scale, batch)}" for t in guidance.terms]
    lines.append(f"rescale {int(do_rescale)} {slot[ref] if do_rescale else 0} {_scale_field(rescale, batch)}")
    results = {}
    for vec in _paths(host, plan, [*plan.tensors, out], force_generic):
        request = "\n".join([f"combine fmt {FMT[out.dtype]} vec {vec}", _geometry(plan), *lines, "end"])
        (reply,) = host.run(request)
        results[vec] = _read_dense(reply.split()[2:], out, _layout.output_like(branches[0]))
    return results


def emulate_projected(host: Host, kind: str, cond: torch.Tensor, uncond: torch.Tensor, scale, *, eta=1.0,
                      threshold=0.0, momentum=0.0, buf=None, formulation="paper", original=False, rescale=0.0,
                      target=4) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """APG / CFG-Zero* (guidance_kernels.cuda.guidance_combine._projected) on the emulator."""
    out = _layout.output_like(cond)
    plan = _layout.plan([cond, uncond], out)
    parts, chunk = _parts(host, plan, True, target)
    do_rescale = isinstance(rescale, torch.Tensor) or rescale > 0
    code = FORMULATIONS[formulation] if kind == "apg" else int(original)
    lines = [f"plan {parts} {chunk}", f"cond {_tensor_field(plan.tensors[0], plan)}",
             f"uncond {_tensor_field(plan.tensors[1], plan)}"]
    if buf is not None:
        lines.append(f"buffer {buf.numel()} {_bits(_storage(buf, buf.numel()))}")
    lines += [f"formulation {code}", f"scale {_scale_field(scale, plan.batch)}", f"eta {float(eta).hex()}",
              f"threshold {float(threshold).hex()}", f"momentum {float(momentum).hex()}",
              f"rescale {int(do_rescale)} {_scale_field(rescale, plan.batch)}"]
    pointers = [*plan.tensors, out] + ([buf] if buf is not None else [])
    results = {}
    for vec in _paths(host, plan, pointers, False):
        head = f"projected kind {1 if kind == 'apg' else 2} fmt {FMT[out.dtype]} " \
               f"buf {FMT[buf.dtype] if buf is not None else 'none'} vec {vec}"
        replies = host.run("\n".join([head, _geometry(plan), *lines, "end"]))
        result = _read_dense(replies[0].split()[2:], out, _layout.output_like(cond))
        new_buf = None
        if buf is not None:
            new_buf = _read_dense(replies[1].split()[2:], buf, torch.empty_like(buf))
        results[vec] = (result, new_buf)
    return results


def _branches(k, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    return [(base + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype) for _ in range(k)]


SHAPES = [(1, 4, 5, 7), (2, 3, 9, 11), (3, 16, 33), (2, 1), (2, 4, 40, 41)]


# --------------------------------------------------------------------------- guidance_combine


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_plain_combine_fp32_is_bit_exact(host, shape, layout):
    """fp32 plain combine: one rounding per operation in the reference's order, so the kernels
    return exactly what the eager fp32 reference does, on both paths, stacked or separate."""
    branches = [make_strided(b, layout) for b in _branches(3, shape, torch.float32, seed=1)]
    per_sample = torch.linspace(2.0, 9.0, shape[0])
    guidance = gk.cfg(7.5) + gk.pag(per_sample, perturbed=2)
    expect = R.guidance_combine(branches, guidance)
    stacked = list(torch.cat([b.contiguous() for b in branches]).chunk(3))
    for inputs in (branches, stacked):
        for vec, out in emulate_combine(host, inputs, guidance).items():
            assert torch.equal(out, expect), f"vector path {vec}: max diff {(out - expect).abs().max()}"


def test_eight_branches_eight_terms_strided_scale(host):
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
    expect = R.guidance_combine(branches, guidance)
    results = emulate_combine(host, branches, guidance)
    assert set(results) == {0, 1}
    for out in results.values():
        assert torch.equal(out, expect)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_combine_with_rescale_matches_reference(host, dtype, layout):
    branches = [make_strided(b, layout) for b in _branches(4, (3, 5, 20, 33), dtype, seed=3)]
    guidance = gk.cfg(torch.tensor([2.0, 5.0, 9.0])) + gk.pag(1.5, perturbed=2) + gk.seg(2.5, perturbed=3)
    for phi in (0.0, 0.7, torch.tensor([0.0, 0.5, 1.0])):
        truth = R.guidance_combine(to64(branches), _guidance64(guidance), rescale=to64(phi))
        lowp = R.guidance_combine(branches, guidance, rescale=phi)
        for target in (4, 64):  # one chunk per sample, and several
            for vec, out in emulate_combine(host, branches, guidance, rescale=phi, target=target).items():
                assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"{layout} phi={phi} vec={vec} t={target}")


def _guidance64(g):
    return gk.Guidance(g.base, tuple(gk.Term(t.pos, t.neg, to64(t.scale)) for t in g.terms))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_tile_chunks_and_partial_groups(host, dtype):
    """Chunks of several tiles per block (the loop in pass 2) and samples whose size is not a
    multiple of the group (a partial group at each sample's end, strided path only)."""
    for shape in ((2, 3, 61, 67), (1, 4, 128, 128)):
        branches = _branches(3, shape, dtype, seed=4)
        guidance = gk.cfg(5.0) + gk.pag(2.0)
        truth = R.guidance_combine(to64(branches), guidance, rescale=0.5)
        lowp = R.guidance_combine(branches, guidance, rescale=0.5)
        for target in (1, 3, 1000):
            for vec, out in emulate_combine(host, branches, guidance, rescale=0.5, target=target).items():
                assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"{shape} target={target} vec={vec}")


def test_nan_inf_and_single_element(host):
    u, c, p = _branches(3, (2, 3, 4, 5), torch.float32, seed=5)
    c[0, 1, 2, 3] = float("nan")
    p[1, 0, 0, 0] = float("inf")
    g = gk.cfg(7.5) + gk.pag(3.0)
    for phi in (0.0, 0.5):
        expect = R.guidance_combine([u, c, p], g, rescale=phi)
        for out in emulate_combine(host, [u, c, p], g, rescale=phi).values():
            assert torch.equal(torch.isnan(out), torch.isnan(expect))
            assert torch.equal(torch.isinf(out), torch.isinf(expect))
            finite = torch.isfinite(expect)
            torch.testing.assert_close(out[finite], expect[finite], rtol=1e-6, atol=1e-6)
    one = list(torch.randn(2, 1).chunk(2))  # std of one element: NaN, as torch.std
    (out,) = emulate_combine(host, one, gk.cfg(5.0), rescale=0.5).values()
    assert torch.isnan(out).all()


# --------------------------------------------------------------------------- apg / cfg-zero*


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("formulation", gk.combine.APG_FORMULATIONS)
def test_apg_matches_reference(host, dtype, formulation):
    u, c = _branches(2, (3, 4, 19, 37), dtype, seed=6)
    for threshold, momentum, buf_dtype in ((0.0, 0.0, None), (15.0, 0.0, None), (3.0, -0.5, torch.float32),
                                           (3.0, 0.7, dtype)):
        scale = torch.tensor([5.0, 2.0, 8.0]) if threshold == 15.0 else 5.0
        buf = torch.randn(u.shape, generator=torch.Generator().manual_seed(7)).to(buf_dtype) if buf_dtype else None
        kw = dict(eta=0.3, norm_threshold=threshold, momentum=momentum, formulation=formulation, rescale=0.6)
        buf_truth = buf.double().clone() if buf is not None else None
        truth = R.apg_combine(to64(c), to64(u), to64(scale), momentum_buffer=buf_truth, **kw)
        lowp = R.apg_combine(c, u, scale, momentum_buffer=buf.to(dtype).clone() if buf is not None else None, **kw)
        results = emulate_projected(host, "apg", c, u, scale, eta=0.3, threshold=threshold, momentum=momentum,
                                    buf=buf, formulation=formulation, rescale=0.6)
        for vec, (out, new_buf) in results.items():
            what = f"thr={threshold} m={momentum} buf={buf_dtype} vec={vec}"
            assert_close_to_truth(out, lowp, truth, factor=4.0, what=what)
            if buf is not None:
                tol = 1e-6 if buf_dtype == torch.float32 else 2 * 2.0 ** -(8 if dtype == torch.bfloat16 else 11)
                torch.testing.assert_close(to64(new_buf), buf_truth, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("original", [False, True])
def test_cfg_zero_star_matches_reference(host, dtype, original):
    u, c = _branches(2, (3, 4, 21, 19), dtype, seed=8)
    scale = torch.tensor([3.0, 5.0, 7.0])
    for phi in (0.0, 0.4, torch.tensor([0.1, 0.0, 0.9])):
        truth = R.cfg_zero_star_combine(to64(c), to64(u), to64(scale), original_formulation=original,
                                        rescale=to64(phi))
        lowp = R.cfg_zero_star_combine(c, u, scale, original_formulation=original, rescale=phi)
        for target in (4, 40):
            for vec, (out, _) in emulate_projected(host, "cfg0", c, u, scale, original=original, rescale=phi,
                                                   target=target).items():
                assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"phi={phi} vec={vec} target={target}")


def test_projected_strided_and_channels_last(host):
    """The generic path of the two-pass kernels (sliced inputs) and a channels-last batch."""
    u, c = (make_strided(x, "sliced") for x in _branches(2, (2, 4, 9, 13), torch.float32, seed=9))
    for kind in ("apg", "cfg0"):
        ref = R.apg_combine if kind == "apg" else R.cfg_zero_star_combine
        truth, lowp = ref(to64(c), to64(u), 4.0, rescale=0.5), ref(c, u, 4.0, rescale=0.5)
        results = emulate_projected(host, kind, c, u, 4.0, rescale=0.5)
        assert set(results) == {0}  # rank > 1 strides: generic path only
        assert_close_to_truth(results[0][0], lowp, truth, factor=4.0, what=kind)
    pred = torch.cat(_branches(2, (2, 4, 6, 8), torch.bfloat16, seed=10)).contiguous(memory_format=torch.channels_last)
    u, c = pred[:2], pred[2:]
    truth, lowp = R.apg_combine(to64(c), to64(u), 5.0), R.apg_combine(c, u, 5.0)
    for vec, (out, _) in emulate_projected(host, "apg", c, u, 5.0).items():
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert_close_to_truth(out, lowp, truth, factor=4.0, what=f"channels-last vec={vec}")


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
    starts = [0, n2 - 3, n2 - 8, n1 * n2 - 5, inner - 8, inner - 3, inner - 1] + [rng.randrange(inner) for _ in range(40)]
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
        for (i, j), got, want in zip(pairs, values[4:], comoments):
            bound = factor * tolerance * math.sqrt(comoments[i] * comoments[j])
            assert abs(got - want) <= bound, (order, (i, j), got, want)


# --------------------------------------------------------------------------- nvcc's host pass


def test_nvcc_host_build_agrees_with_gxx(host, tmp_path):
    """The header compiled as CUDA (nvcc's host pass, __CUDACC__ defined) computes the same."""
    needs(shutil.which("nvcc") is not None, "nvcc is not on PATH")
    exe = tmp_path / "guidance_combine_host_nvcc"
    _compile(["nvcc", "-x", "cu", *CXX_FLAGS[:2], "-Xcompiler", "-ffp-contract=off,-fno-strict-aliasing",
              "--expt-relaxed-constexpr", f"-I{INCLUDE}", str(SOURCE), "-o", str(exe)])
    other = Host(exe)
    assert (other.tile, other.group, other.threads, other.row) == (host.tile, host.group, host.threads, host.row)
    u, c, p = _branches(3, (2, 4, 12, 10), torch.bfloat16, seed=11)
    g = gk.cfg(6.0) + gk.pag(torch.tensor([1.0, 2.0]))
    for kw in ({}, {"rescale": 0.7}):
        a, b = emulate_combine(host, [u, c, p], g, **kw), emulate_combine(other, [u, c, p], g, **kw)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = emulate_projected(host, "apg", c, u, 5.0, threshold=2.0, momentum=-0.5, buf=torch.ones(2, 4, 12, 10))
    b = emulate_projected(other, "apg", c, u, 5.0, threshold=2.0, momentum=-0.5, buf=torch.ones(2, 4, 12, 10))
    assert all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)
