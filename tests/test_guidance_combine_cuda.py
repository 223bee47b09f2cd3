"""GPU lane, CUDA backend specifics (the shared backend tests are in test_guidance_combine.py):
CUDA-graph capture and replay, non-default streams, a second device, bit-exactness of the fp32
plain combine, the vectorised and strided paths agreeing bit for bit, determinism, real latent
sizes, opcheck and torch.compile with backend "cuda", and the launcher's own argument checks."""

from __future__ import annotations

import pytest
import torch

import guidance_kernels as gk
from guidance_kernels import _extension
from guidance_kernels import reference as R
from helpers import assert_close_to_truth, needs, to64

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda_backend():
    needs(_extension.load() is not None, f"the CUDA extension is unavailable: {_extension.unavailable_reason()}")


def _branches(k, shape, dtype, device="cuda", seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    return [(base + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
            for _ in range(k)]


def _calls(pred: torch.Tensor, buf: torch.Tensor, s: torch.Tensor):
    """Every op (and the launch variants of each) on a stacked (3B, ...) batch, scales as tensors."""
    g = gk.cfg(s) + gk.pag(3.0)
    return {
        "plain": lambda: gk.guidance_combine(pred, g, backend="cuda"),
        "rescale": lambda: gk.guidance_combine(pred, g, rescale=s / 10, backend="cuda"),
        "apg": lambda: gk.apg_combine(pred[: 2 * pred.shape[0] // 3], s, norm_threshold=15.0, eta=0.5, rescale=0.7,
                                      formulation="diffusers", backend="cuda"),
        "apg-momentum": lambda: gk.apg_combine(pred[: 2 * pred.shape[0] // 3], s, momentum=-0.5,
                                               momentum_buffer=buf, backend="cuda"),
        "cfg-zero*": lambda: gk.cfg_zero_star_combine(pred[: 2 * pred.shape[0] // 3], s, rescale=0.3, backend="cuda"),
    }


@pytest.mark.parametrize("op", ["plain", "rescale", "apg", "apg-momentum", "cfg-zero*"])
def test_cuda_graph_capture_and_replay(op):
    """No host sync, no allocation outside the graph pool: the call captures, and replays follow
    new input values and new scales (written in place) exactly like eager calls."""
    pred = torch.cat(_branches(3, (2, 4, 32, 40), torch.bfloat16, seed=1))
    buf = torch.zeros(2, 4, 32, 40, device="cuda")
    s = torch.tensor([5.0, 7.5], device="cuda")
    fn = _calls(pred, buf, s)[op]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (lazy loading of _C, caches) outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    buf.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    for step in range(3):
        pred.copy_(torch.cat(_branches(3, (2, 4, 32, 40), torch.bfloat16, seed=10 + step)))
        s.copy_(torch.tensor([4.0 + step, 2.0 - step]))
        saved = buf.clone()
        graph.replay()
        replayed, after_replay = captured.clone(), buf.clone()
        buf.copy_(saved)
        expect = fn()  # eager, from the same buffer state
        torch.cuda.synchronize()
        assert torch.equal(replayed, expect), f"{op} step {step}"
        assert torch.equal(after_replay, buf)


def test_non_default_stream():
    """Work is enqueued on the current stream (not the legacy default stream)."""
    u, c, p = _branches(3, (2, 4, 64, 64), torch.float16, seed=2)
    expect = gk.guidance_combine([u, c, p], gk.cfg(7.5) + gk.pag(3.0), rescale=0.7, backend="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # a long producer on the side stream: a launch on another stream would race it
        big = torch.randn(4096, 4096, device="cuda")
        for _ in range(4):
            big = big @ big.T / 4096
        c2 = c + 0 * big[0, 0].half()
        out = gk.guidance_combine([u, c2, p], gk.cfg(7.5) + gk.pag(3.0), rescale=0.7, backend="cuda")
        apg = gk.apg_combine([u, c2], 5.0, norm_threshold=2.0, backend="cuda")
    stream.synchronize()
    assert torch.equal(out, expect)
    assert torch.equal(apg, gk.apg_combine([u, c], 5.0, norm_threshold=2.0, backend="cuda"))


def test_second_device():
    needs(torch.cuda.device_count() >= 2, "needs two CUDA devices")
    torch.cuda.set_device(0)
    branches = _branches(3, (2, 4, 16, 24), torch.bfloat16, device="cuda:1", seed=3)
    g = gk.cfg(torch.tensor([6.0, 3.0], device="cuda:1")) + gk.pag(2.0)
    for kw in ({}, {"rescale": 0.5}):
        out = gk.guidance_combine(branches, g, backend="cuda", **kw)
        assert out.device == torch.device("cuda:1")
        truth = R.guidance_combine(to64(branches), gk.Guidance(g.base, tuple(
            gk.Term(t.pos, t.neg, to64(t.scale)) for t in g.terms)), **kw)
        lowp = R.guidance_combine([b.cpu() for b in branches], gk.Guidance(g.base, tuple(
            gk.Term(t.pos, t.neg, t.scale.cpu() if isinstance(t.scale, torch.Tensor) else t.scale)
            for t in g.terms)), **kw)
        assert_close_to_truth(out, lowp, truth, factor=4.0)
    out = gk.cfg_zero_star_combine(torch.cat(branches[:2]), 5.0, backend="cuda")
    assert out.device == torch.device("cuda:1")


@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (3, 16, 33), (1, 7)], ids=str)
def test_fp32_plain_combine_is_bit_exact(shape):
    """One rounding per operation in the reference's order: the eager fp32 reference, exactly."""
    u, c, p = _branches(3, shape, torch.float32, seed=4)
    for g in (gk.cfg(7.5) + gk.pag(3.0), gk.cfg(torch.linspace(2, 9, shape[0], device="cuda")),
              gk.autoguidance(2.0) + gk.pag(-1.5)):
        assert torch.equal(gk.guidance_combine([u, c, p], g, backend="cuda"), R.guidance_combine([u, c, p], g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_vector_and_strided_paths_agree_bitwise(dtype):
    """Both paths form the same groups of eight and do the same arithmetic: shifting the data by one
    element (pointers no longer 16-byte aligned: strided path) changes no bit."""
    numel = 3 * 2 * 4 * 40 * 48
    aligned = torch.randn(numel, device="cuda").to(dtype).view(6, 4, 40, 48)
    shifted = torch.empty(numel + 1, device="cuda", dtype=dtype)[1:].view(6, 4, 40, 48).copy_(aligned)
    assert aligned.data_ptr() % 16 == 0 and shifted.data_ptr() % 16 != 0
    buf_a = torch.randn(2, 4, 40, 48, device="cuda")
    buf_s = buf_a.clone()
    for name, fn in _calls(aligned, buf_a, torch.tensor([5.0, 6.0], device="cuda")).items():
        other = _calls(shifted, buf_s, torch.tensor([5.0, 6.0], device="cuda"))[name]
        assert torch.equal(fn(), other()), name
    assert torch.equal(buf_a, buf_s)


def test_deterministic():
    pred = torch.cat(_branches(3, (1, 16, 21, 90, 160), torch.bfloat16, seed=5))
    s = torch.tensor([7.5], device="cuda")
    for name, fn in _calls(pred, torch.zeros(1, 16, 21, 90, 160, device="cuda"), s).items():
        if name != "apg-momentum":
            assert torch.equal(fn(), fn()), name


@pytest.mark.parametrize("shape", [(1, 4, 128, 128), (1, 16, 128, 128), (1, 16, 21, 90, 160)], ids=str)
def test_latent_sizes_match_reference(shape):
    """SDXL, Flux and video latents: many chunks per sample, several tiles per chunk."""
    u, c, p = _branches(3, shape, torch.bfloat16, seed=6)
    g = gk.cfg(7.5) + gk.pag(3.0)
    u_cpu, c_cpu, p_cpu = (x.cpu() for x in (u, c, p))
    truth = R.guidance_combine(to64([u, c, p]), g, rescale=0.7)
    assert_close_to_truth(gk.guidance_combine(torch.cat([u, c, p]), g, rescale=0.7, backend="cuda"),
                          R.guidance_combine([u_cpu, c_cpu, p_cpu], g, rescale=0.7), truth, factor=4.0)
    truth = R.apg_combine(to64(c), to64(u), 7.5, norm_threshold=15.0, eta=0.5)
    assert_close_to_truth(gk.apg_combine(torch.cat([u, c]), 7.5, norm_threshold=15.0, eta=0.5, backend="cuda"),
                          R.apg_combine(c_cpu, u_cpu, 7.5, norm_threshold=15.0, eta=0.5), truth, factor=4.0)
    truth = R.cfg_zero_star_combine(to64(c), to64(u), 5.0, rescale=0.3)
    assert_close_to_truth(gk.cfg_zero_star_combine(torch.cat([u, c]), 5.0, rescale=0.3, backend="cuda"),
                          R.cfg_zero_star_combine(c_cpu, u_cpu, 5.0, rescale=0.3), truth, factor=4.0)


def test_opcheck_and_compile_with_cuda_backend():
    u, c, p = _branches(3, (2, 3, 8, 8), torch.float32, seed=7)
    scale = torch.tensor([2.0, 3.0], device="cuda")
    ops = torch.ops.guidance_kernels
    cases = [
        (ops.guidance_combine, ([torch.cat([u, c, p])], 3, 0, [1, 1], [0, 2], [7.5, 0.0], [None, scale], 0.5, None, 1,
                                "cuda")),
        (ops.apg_combine, ([u, c], 2, 1, 0, 5.0, scale, 0.5, 15.0, "paper", 0.3, None, "cuda")),
        (ops.apg_combine_momentum, ([u, c], 2, 1, 0, 5.0, None, 0.5, 15.0, -0.5, torch.randn_like(u), "diffusers",
                                    0.0, None, "cuda")),
        (ops.cfg_zero_star_combine, ([torch.cat([u, c])], 2, 1, 0, 0.0, scale, False, 0.2, None, "cuda")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)

    def step(pred, s):
        out = gk.guidance_combine(pred, gk.cfg(s) + gk.pag(3.0), rescale=0.7, backend="cuda")
        return out + gk.apg_combine(pred[:4], s, backend="cuda") + gk.cfg_zero_star_combine(pred[:4], s, backend="cuda")

    compiled = torch.compile(step, fullgraph=True)
    pred = torch.cat([u, c, p])
    for s in (torch.tensor(7.5, device="cuda"), torch.tensor(4.0, device="cuda")):
        torch.testing.assert_close(compiled(pred, s), step(pred, s), rtol=1e-6, atol=1e-6)


def test_launcher_rejects_bad_plans():
    """The launcher validates plans against the tensors before launching: no plan can make a
    kernel read or write out of bounds."""
    ext = _extension.load()
    x = torch.randn(4, 1000, device="cuda")
    out = torch.empty(2, 1000, device="cuda")
    tile = ext.GUIDANCE_COMBINE_TILE
    good = [2, 1000, 1, 1, 1000, 0, 0, 1, 1000, 1]

    def call(xs=(x[:2], x[2:]), geometry=good, parts=1, chunk=tile, target=out, scales=(None,)):
        ext.guidance_combine(target, list(xs), 0, [1], [0], [2.0], list(scales), False, 0, 0.0, None, geometry,
                             parts, chunk)

    call()
    torch.testing.assert_close(out, x[:2] + 2.0 * (x[2:] - x[:2]))
    with pytest.raises(RuntimeError, match="addresses element"):
        call(geometry=[2, 1000, 1, 1, 1000, 0, 0, 1, 3000, 1])  # batch stride past the storage
    with pytest.raises(RuntimeError, match="do not multiply"):
        call(geometry=[2, 1000, 1, 1, 999, 0, 0, 1, 1000, 1])
    with pytest.raises(RuntimeError, match="multiple of"):
        call(chunk=tile + 1)
    with pytest.raises(RuntimeError, match="without empty chunks"):
        call(parts=2)
    with pytest.raises(TypeError, match="dtype"):
        call(xs=(x[:2].half(), x[2:].half()))
    with pytest.raises(RuntimeError, match="dense"):
        call(target=torch.empty(2, 2000, device="cuda")[:, ::2])
    with pytest.raises(RuntimeError, match="shape"):
        call(scales=(torch.ones(3, device="cuda"),))
    with pytest.raises(RuntimeError, match="expected a strided CUDA tensor"):
        call(xs=(x[:2], x[2:].cpu()))
