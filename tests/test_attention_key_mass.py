"""attention_key_mass: the reference against diffusers' attention and SAG's mass; every backend
against a float64 truth (output and mass) for the issue's head dims, both layouts, cross-attention,
chosen items; SDPA parity; the mass's invariants; memory (never the N×N map); int64 offsets; bad
input; opcheck; torch.compile."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import guidance_kernels as gk
from conftest import HAS_CUDA, LANES, lane_id
from guidance_kernels import reference as R
from helpers import assert_close_to_truth, max_err, needs, to64

HEAD_DIMS = (40, 64, 80, 128, 160)
# attention_key_mass has triton and torch backends (no CUDA C++ one): the lanes that can serve it.
KEY_MASS_LANES = [lane for lane in LANES if lane[0] in ("triton", "torch")]
on_key_mass_lanes = pytest.mark.parametrize("lane", KEY_MASS_LANES, ids=lane_id)


def _qkv(batch, heads, n_q, n_k, head_dim, dtype, device, *, layout="bhnd", seed=0, spread=1.5):
    """Random q, k, v; ``spread`` scales q so that the softmax is neither flat nor one-hot."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n_q, head_dim, generator=g, dtype=torch.float64) * spread
    k = torch.randn(batch, heads, n_k, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, heads, n_k, head_dim, generator=g, dtype=torch.float64)
    if layout == "bnd":
        q, k, v = (t.transpose(1, 2).flatten(2) for t in (q, k, v))
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def _kernel_dtypes(backend):
    # bf16 tl.dot is wrong in the Triton interpreter; the GPU lane checks it.
    if backend == "triton" and not HAS_CUDA:
        return (torch.float32, torch.float16)
    return (torch.float32, torch.float16, torch.bfloat16)


def _check(out, mass, q, k, v, *, layout="bhnd", heads=None, scale=None, items=None, factor=2.0, what=""):
    truth_out, truth_mass = R.attention_key_mass(to64(q), to64(k), to64(v), layout=layout, heads=heads, scale=scale)
    lowp_out, _ = R.attention_key_mass(q.cpu(), k.cpu(), v.cpu(), layout=layout, heads=heads, scale=scale)
    assert out.is_contiguous() and out.dtype == q.dtype and out.device == q.device
    assert_close_to_truth(out, lowp_out, truth_out, factor=factor, what=f"{what} out")
    if items is not None:
        truth_mass = truth_mass[list(items)]
    assert mass.dtype == torch.float32 and mass.shape == truth_mass.shape, (mass.shape, truth_mass.shape)
    # The mass is accumulated in fp32 from exact-ish probabilities whatever the input dtype (the
    # inputs' own rounding is in the truth): a few fp32 ulps per summed probability.
    n_q = q.shape[2] if layout == "bhnd" else q.shape[1]
    err = max_err(mass, truth_mass)
    assert err <= 1e-5 * max(1.0, float(truth_mass.abs().max())) * max(1.0, n_q / 64), f"{what} mass error {err:.3e}"


# --------------------------------------------------------------------------- reference vs diffusers


def test_reference_matches_diffusers_attention_and_sag_mass():
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
        CrossAttnStoreProcessor,
    )

    torch.manual_seed(0)
    attn = Attention(query_dim=64, heads=4, dim_head=16).eval()
    store = CrossAttnStoreProcessor()
    attn.set_processor(store)
    hidden = torch.randn(2, 24, 64)
    with torch.no_grad():
        expected = attn(hidden)
        q, k, v = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
        out, mass = R.attention_key_mass(q, k, v, layout="bnd", heads=4, scale=attn.scale)
        torch.testing.assert_close(attn.to_out[0](out), expected, rtol=0, atol=0)
        # sag_masking's reduction of the stored map, for the whole batch
        probs = store.attention_probs
        torch.testing.assert_close(mass, probs.reshape(2, 4, 24, 24).mean(1).sum(1), rtol=0, atol=0)
        # every CPU backend against the float64 truth, within the reference's own fp32 error bound
        truth_out, truth_mass = R.attention_key_mass(q.double(), k.double(), v.double(), layout="bnd", heads=4,
                                                     scale=attn.scale)
        for backend, device in LANES:
            if device != "cpu":
                continue
            got_out, got_mass = gk.attention_key_mass(q, k, v, layout="bnd", heads=4, scale=attn.scale,
                                                      backend=backend)
            assert_close_to_truth(got_out, out, truth_out, what=f"{backend} out")
            assert_close_to_truth(got_mass, mass, truth_mass, what=f"{backend} mass")


# --------------------------------------------------------------------------- backends vs truth


@on_key_mass_lanes
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_matches_reference_for_every_head_dim(lane, head_dim):
    backend, device = lane
    for dtype in _kernel_dtypes(backend):
        q, k, v = _qkv(2, 2, 37, 37, head_dim, dtype, device, seed=head_dim)
        out, mass = gk.attention_key_mass(q, k, v, backend=backend)
        _check(out, mass, q, k, v, what=f"{backend} {dtype} d={head_dim}")


@on_key_mass_lanes
def test_bnd_layout_cross_attention_and_items(lane):
    backend, device = lane
    for dtype in _kernel_dtypes(backend):
        q, k, v = _qkv(3, 3, 70, 45, 40, dtype, device, layout="bnd", seed=1)
        for items in (None, [2], [1, 0], [0, 2, 2, 1], range(1, 3)):
            out, mass = gk.attention_key_mass(q, k, v, layout="bnd", heads=3, items=items, backend=backend)
            assert out.shape == q.shape
            _check(out, mass, q, k, v, layout="bnd", heads=3, items=items, what=f"{backend} {dtype} items={items}")


@on_key_mass_lanes
def test_strided_views_and_custom_scale(lane):
    """q/k/v sliced out of one fused (B, N, 3·heads·d) projection (non-contiguous views), a
    (B, heads, N, d) permuted view, and an explicit softmax scale."""
    backend, device = lane
    g = torch.Generator().manual_seed(2)
    fused = torch.randn(2, 33, 3 * 2 * 64, generator=g).to(device)
    q, k, v = fused.chunk(3, dim=-1)
    out, mass = gk.attention_key_mass(q, k, v, layout="bnd", heads=2, scale=0.3, backend=backend)
    _check(out, mass, q, k, v, layout="bnd", heads=2, scale=0.3, what="fused bnd")
    q4, k4, v4 = (t.unflatten(-1, (2, 64)).transpose(1, 2) for t in (q, k, v))
    out4, mass4 = gk.attention_key_mass(q4, k4, v4, scale=0.3, backend=backend)
    torch.testing.assert_close(out4, out.unflatten(-1, (2, 64)).transpose(1, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mass4, mass, rtol=1e-5, atol=1e-6)


@on_key_mass_lanes
def test_output_matches_sdpa_and_mass_sums_to_queries(lane):
    backend, device = lane
    q, k, v = _qkv(2, 4, 50, 31, 64, torch.float32, device, seed=3)
    out, mass = gk.attention_key_mass(q, k, v, backend=backend)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
    # every query row of P sums to 1, so Σ_keys mean_heads Σ_queries P = N per item
    torch.testing.assert_close(mass.sum(1), torch.full((2,), 50.0, device=device), rtol=1e-5, atol=0)
    assert (mass >= 0).all()


@on_key_mass_lanes
def test_one_query_one_key_and_extreme_scores(lane):
    """N = M = 1 (mass 1 exactly), and scores around ±1e4 (the online softmax must not overflow)."""
    backend, device = lane
    q, k, v = _qkv(1, 2, 1, 1, 64, torch.float32, device, seed=4)
    out, mass = gk.attention_key_mass(q, k, v, backend=backend)
    torch.testing.assert_close(out, v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mass, torch.ones(1, 1, device=device), rtol=1e-6, atol=0)
    q, k, v = _qkv(1, 2, 40, 40, 64, torch.float32, device, seed=5, spread=120.0)
    out, mass = gk.attention_key_mass(q, k, v, backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(mass).all()
    # scores of ~1e3 carry fp32 rounding of ~1e-4 into the exponent: both sides are that noisy
    _check(out, mass, q, k, v, factor=4.0, what="large scores")


@pytest.mark.parametrize("lane", [x for x in KEY_MASS_LANES if x[0] != "torch"], ids=lane_id)
def test_large_offsets_use_int64(lane):
    """Batch stride 2**30 + 7 elements: sample 2 starts past 2**31 (the storage stays virtual)."""
    backend, device = lane
    stride = 2**30 + 7
    storage = torch.empty(2 * stride + 3 * 8 * 16, dtype=torch.float16, device=device)
    q = storage.as_strided((3, 1, 8, 16), (stride, 128, 16, 1))
    values = torch.randn(3, 1, 8, 16, dtype=torch.float16)
    q.copy_(values.to(device))
    out, mass = gk.attention_key_mass(q, q, q, items=[2], backend=backend)
    ref_out, ref_mass = R.attention_key_mass(values.double(), values.double(), values.double())
    torch.testing.assert_close(out.cpu().double(), ref_out, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(mass.cpu().double(), ref_mass[2:], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- memory


_MEMORY_PROBE = textwrap.dedent("""
    import gc, resource, sys
    import torch
    import guidance_kernels as gk
    from guidance_kernels import reference as R

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def peak_extra(fn):
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            peak = lambda: status("VmHWM")
        except OSError:  # no reset: the process-lifetime peak (ours runs first, below the reference)
            peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        base = status("VmRSS")
        result = fn()
        return peak() - base

    n = int(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 32, generator=g) for _ in range(3))
    small = [t[:, :, :64].contiguous() for t in (q, k, v)]
    gk.attention_key_mass(*small, backend="torch")
    R.attention_key_mass(*small)
    ours = peak_extra(lambda: gk.attention_key_mass(q, k, v, backend="torch"))
    ref = peak_extra(lambda: R.attention_key_mass(q, k, v))
    print(ours, ref)
""")


def test_cpu_path_never_holds_the_attention_map():
    """N = 4096, 2 heads: the reference's probability map alone is 2·N²·4 B = 128 MiB; the chunked
    torch path's peak extra resident memory stays at a few MiB of score chunks plus the outputs.
    Measured as the peak-RSS − RSS delta in a fresh process (large allocations mmapped, so freed
    memory leaves the resident set)."""
    needs(os.path.exists("/proc/self/status"), "needs Linux /proc/self/status")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, "4096"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, ref = (int(x) for x in proc.stdout.split())
    n, heads = 4096, 2
    assert ref >= heads * n * n * 4, f"reference peak {ref / 2**20:.1f} MiB: the probe measures nothing"
    assert ours <= 40 * 2**20, f"chunked key mass used {ours / 2**20:.1f} MiB extra"
    assert ours * 5 <= ref


@pytest.mark.gpu
def test_gpu_extra_memory_is_linear_in_n():
    """N = 4096, 8 heads, fp16: beyond the inputs, the key-mass path allocates the output, the
    (B·heads, N) row statistics and the (items, heads, N) column partials, never N²."""
    q, k, v = _qkv(2, 8, 4096, 4096, 64, torch.float16, "cuda", seed=6)
    for backend in [b for b, d in LANES if d == "cuda" and b in ("triton", "torch")]:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out, mass = gk.attention_key_mass(q, k, v, items=[0], backend=backend)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        linear = out.numel() * 2 + 2 * 8 * 4096 * 4 + 8 * 4096 * 4 + mass.numel() * 4
        budget = linear + 2**20 if backend == "triton" else linear + 64 * 2**20  # torch: score chunks
        assert extra <= budget, f"{backend}: {extra / 2**20:.1f} MiB extra (budget {budget / 2**20:.1f} MiB)"
        del out, mass
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    R.attention_key_mass(q, k, v)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before >= 2 * 8 * 4096 * 4096 * 2  # the reference's map


# --------------------------------------------------------------------------- bad input


def _bad(exc, match, *args, **kw):
    with pytest.raises(exc, match=match):
        gk.attention_key_mass(*args, **kw)


def test_bad_input_is_rejected_with_the_argument_name():
    q, k, v = _qkv(2, 2, 8, 8, 16, torch.float32, "cpu")
    qb, kb, vb = _qkv(2, 2, 8, 8, 16, torch.float32, "cpu", layout="bnd")
    _bad(ValueError, "layout: must be one of", q, k, v, layout="nhd")
    _bad(ValueError, r"q: layout 'bhnd' needs \(B, heads, N, d\)", qb, kb, vb)
    _bad(ValueError, "heads: required with layout 'bnd'", qb, kb, vb, layout="bnd")
    _bad(ValueError, "heads: 3 does not divide the last dim 32", qb, kb, vb, layout="bnd", heads=3)
    _bad(ValueError, "heads: is 4 but q has 2 heads", q, k, v, heads=4)
    _bad(ValueError, "k: shape .* does not match q", q, k[:, :, :, :8], v)
    _bad(ValueError, "k: shape .* does not match q", q, k[:1], v[:1])
    _bad(ValueError, "v: shape .* differs from k", q, k, v[:, :, :5])
    _bad(ValueError, "needs at least one query", q[:, :, :0], k, v)
    _bad(TypeError, "k: has dtype", q, k.half(), v)
    _bad(TypeError, "q: expected a floating-point tensor", q.int(), k, v)
    _bad(TypeError, "v: expected a torch.Tensor", q, k, None)
    _bad(ValueError, "k: is on meta", q, k.to("meta"), v)
    _bad(ValueError, "scale: must be finite", q, k, v, scale=float("nan"))
    _bad(ValueError, "items: batch index 2 out of range", q, k, v, items=[0, 2])
    _bad(ValueError, "items: is empty", q, k, v, items=[])
    _bad(TypeError, "items: expected an int", q, k, v, items=[0.5])
    _bad(TypeError, "items: expected a sequence of Python ints", q, k, v, items=torch.tensor([0]))
    big = torch.zeros(1, 1, 4, 300)
    with pytest.raises(gk.BackendError, match="head dim 300 > 256"):
        gk.attention_key_mass(big, big, big, backend="triton")
    gk.attention_key_mass(big, big, big)  # automatic choice falls back to the torch backend


# --------------------------------------------------------------------------- opcheck and compile


def test_opcheck():
    q, k, v = _qkv(2, 2, 9, 7, 16, torch.float32, "cpu")
    qb, kb, vb = _qkv(2, 2, 9, 7, 16, torch.float32, "cpu", layout="bnd")
    op = torch.ops.guidance_kernels.attention_key_mass
    torch.library.opcheck(op, (q, k, v, 2, "bhnd", 0.25, None, "torch"))
    torch.library.opcheck(op, (qb, kb, vb, 2, "bnd", 0.25, [1], "torch"))


def test_compile_fullgraph():
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

    def step(q, k, v):
        out, mass = gk.attention_key_mass(q, k, v, layout="bnd", heads=2, items=[0])
        return out * 2, mass

    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for seed in range(3):
        q, k, v = _qkv(2, 2, 12, 12, 16, torch.float32, "cpu", layout="bnd", seed=seed)
        got, want = compiled(q, k, v), step(q, k, v)
        torch.testing.assert_close(got, want)
    assert counter.frame_count == 1
