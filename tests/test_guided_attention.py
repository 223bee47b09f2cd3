"""guided_attention: the reference vs SEG-SDXL's formulation (blurred logits) and diffusers' PAG
processors; every backend vs the reference over modes × layouts × dtypes × head dims × grids ×
text blocks; identity items bit-exact; σ edge cases; the O(N·d) short-cuts (FLOP counts); bad
input; backend checks; opcheck; torch.compile."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import guidance_kernels as gk
from guidance_kernels import backends
from guidance_kernels import reference as R
from guidance_kernels._library import GuidedAttentionArgs
from guidance_kernels._spec import PUBLIC_MODES, Mode, blur_kernel_size
from conftest import LANES, lane_id
from helpers import DTYPES, assert_close_to_truth, to64

# guided_attention has two Triton backends (triton/guided_attention.py): "triton" (everything in
# our kernels) and "triton_sdpa" (torch SDPA for plain and blurred items). Every test of this
# module runs on both wherever a triton lane exists.
ATTENTION_LANES = LANES + [("triton_sdpa", d) for b, d in LANES if b == "triton"]
TRITON_LANES = [x for x in ATTENTION_LANES if x[0].startswith("triton")]


@pytest.fixture(params=ATTENTION_LANES, ids=lane_id)
def lane(request):
    return request.param

HEAD_DIMS = (40, 64, 80, 128, 160)


def _qkv(batch, heads, n, d, dtype, device, *, nk=None, seed=0, layout="bhnd"):
    """q, k, v as diffusers holds them: (B, N, heads·d) projections viewed as (B, heads, N, d)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for tokens in (n, nk or n, nk or n):
        t = torch.randn(batch, tokens, heads * d, generator=g, dtype=torch.float64)
        t = t.to(device=device, dtype=dtype)
        out.append(t if layout == "bnd" else t.view(batch, tokens, heads, d).transpose(1, 2))
    return out


def _bhnd(t, heads):
    return t.unflatten(2, (heads, -1)).transpose(1, 2) if t.dim() == 3 else t


def _check(out, q, k, v, modes, sigma, grid, *, heads, text_tokens=0, text_position="after", scale=None,
           kernel_size=None, factor=2.0, what=""):
    """out (any layout) vs the reference in float64 (truth) and in the input dtype on the CPU. The
    reference gets the blur items' kernel sizes of our rule (:func:`blur_kernel_size`, equal to
    SEG-SDXL's wherever SEG-SDXL's reflect padding works; tested in test_gaussian_blur_2d)."""
    qb, kb, vb = (_bhnd(t, heads) for t in (q, k, v))
    names = [m if isinstance(m, str) else PUBLIC_MODES[m] for m in modes]
    if kernel_size is None and grid is not None:
        sigmas = sigma if isinstance(sigma, (list, tuple)) else [sigma] * len(names)
        kernel_size = [blur_kernel_size(s, grid) or None if m == "blur" else None for m, s in zip(names, sigmas)]
    kw = dict(text_tokens=text_tokens, text_position=text_position, scale=scale, kernel_size=kernel_size)
    truth = R.guided_attention(to64(qb), to64(kb), to64(vb), names, sigma, grid, **kw)
    lowp = R.guided_attention(qb.cpu(), kb.cpu(), vb.cpu(), names, sigma, grid, **kw)
    assert_close_to_truth(_bhnd(out, heads), lowp, truth, factor=factor, what=what)


# --------------------------------------------------------------------------- reference vs the anchors


def _np_blur_matrix(h, w, sigma):
    """The (N, N) linear map of SEG's reflect-padded 2-D Gaussian blur on an (H, W) token grid,
    built independently (numpy float64, explicit padding indices)."""
    k = min(R.seg_kernel_size(sigma), w - (w % 2 - 1))
    half = (k - 1) / 2
    x = np.linspace(-half, half, k)
    w1 = np.exp(-0.5 * (x / sigma) ** 2)
    w1 = w1 / w1.sum()
    pad = k // 2

    def reflect(i, n):
        return -i if i < 0 else (2 * (n - 1) - i if i > n - 1 else i)

    m = np.zeros((h * w, h * w))
    for y in range(h):
        for xx in range(w):
            for dy in range(-pad, pad + 1):
                for dx in range(-pad, pad + 1):
                    m[y * w + xx, reflect(y + dy, h) * w + reflect(xx + dx, w)] += w1[dy + pad] * w1[dx + pad]
    return m


@pytest.mark.parametrize("sigma", [0.7, 2.0, 1e6])
def test_reference_blur_equals_blurred_logits(sigma):
    """SEG (§5): blurring Q over the grid = blurring the pre-softmax logits along the query axis;
    σ = ∞: every image query is the grid mean. Independent float64 formulation."""
    b, heads, h, w, d = 1, 2, 4, 5, 8
    q, k, v = _qkv(b, heads, h * w, d, torch.float64, "cpu", seed=1)
    ref = R.guided_attention(q, k, v, ["blur"], sigma, (h, w))
    logits = (q @ k.transpose(-1, -2)).numpy() / math.sqrt(d)
    blur = np.full((h * w, h * w), 1 / (h * w)) if sigma > R.SEG_INF_SIGMA else _np_blur_matrix(h, w, sigma)
    logits = np.einsum("ij,bhjk->bhik", blur, logits)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    expect = (p / p.sum(-1, keepdims=True)) @ v.numpy()
    # the reference's weights are float32 (as SEG-SDXL builds them): ~1e-7 relative
    np.testing.assert_allclose(ref.numpy(), expect, rtol=1e-6, atol=1e-6)


def _attention_module(c=16, heads=2, joint=False):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    kw = dict(added_kv_proj_dim=c, context_pre_only=False) if joint else {}
    return Attention(query_dim=c, heads=heads, dim_head=c // heads, bias=True, **kw).eval()


@torch.no_grad()
def test_reference_matches_diffusers_pag_processors():
    pytest.importorskip("diffusers")  # a test dependency (pyproject [test]); present in CI
    from diffusers.models.attention_processor import (PAGCFGIdentitySelfAttnProcessor2_0,
                                                      PAGIdentitySelfAttnProcessor2_0)

    attn = _attention_module()
    hidden = torch.randn(6, 12, 16)  # [uncond ×2, cond ×2, perturbed ×2]
    q, k, v = (proj(hidden).view(6, 12, 2, 8).transpose(1, 2) for proj in (attn.to_q, attn.to_k, attn.to_v))

    def finish(o):
        return attn.to_out[0](o.transpose(1, 2).reshape(6, 12, 16))

    modes = ["none"] * 4 + ["identity"] * 2
    theirs = PAGCFGIdentitySelfAttnProcessor2_0()(attn, hidden)
    torch.testing.assert_close(finish(R.guided_attention(q, k, v, modes)), theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(finish(gk.guided_attention(q, k, v, modes=modes)), theirs, rtol=1e-6, atol=1e-6)
    theirs = PAGIdentitySelfAttnProcessor2_0()(attn, hidden[:4])  # [cond ×2, perturbed ×2]
    ours = gk.guided_attention(q[:4], k[:4], v[:4], modes=["none"] * 2 + ["identity"] * 2)
    torch.testing.assert_close(attn.to_out[0](ours.transpose(1, 2).reshape(4, 12, 16)), theirs, rtol=1e-6,
                               atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("cfg", [False, True])
def test_reference_matches_diffusers_joint_pag(cfg):
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import PAGCFGJointAttnProcessor2_0, PAGJointAttnProcessor2_0

    attn = _attention_module(joint=True)
    branches = 3 if cfg else 2
    hidden, context = torch.randn(branches, 9, 16), torch.randn(branches, 5, 16)
    theirs_h, theirs_c = (PAGCFGJointAttnProcessor2_0() if cfg else PAGJointAttnProcessor2_0())(attn, hidden, context)

    def heads(t):
        return t.view(branches, -1, 2, 8).transpose(1, 2)

    q = heads(torch.cat([attn.to_q(hidden), attn.add_q_proj(context)], dim=1))
    k = heads(torch.cat([attn.to_k(hidden), attn.add_k_proj(context)], dim=1))
    v = heads(torch.cat([attn.to_v(hidden), attn.add_v_proj(context)], dim=1))
    modes = ["none"] * (branches - 1) + ["identity"]
    for out in (R.guided_attention(q, k, v, modes, text_tokens=5),
                gk.guided_attention(q, k, v, modes=modes, grid=(3, 3), text_tokens=5),
                gk.guided_attention(q, k, v, modes=modes, text_tokens=5)):  # joint PAG needs no grid
        out = out.transpose(1, 2).reshape(branches, 14, 16)
        torch.testing.assert_close(attn.to_out[0](out[:, :9]), theirs_h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attn.to_add_out(out[:, 9:]), theirs_c, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- lowering: public arguments -> op record


def test_lowering_rules():
    """What the public function hands the op: σ → SEG's capped kernel size, a 1-tap blur → plain
    attention, σ = ∞ → MEAN, non-blur items σ 0 / size 0; one vocabulary from Mode to the kernel's."""
    from guidance_kernels.ops.guided_attention import lower_modes
    from guidance_kernels.triton.guided_attention import Work, work_codes

    codes = [Mode.NONE, Mode.IDENTITY, Mode.BLUR, Mode.BLUR, Mode.BLUR, Mode.BLUR]
    sigmas = [None, None, 1.0, 0.1, math.inf, 1e5]
    modes, op_sigmas, sizes = lower_modes(codes, sigmas, (5, 7))
    assert modes == [Mode.NONE, Mode.IDENTITY, Mode.BLUR, Mode.NONE, Mode.MEAN, Mode.MEAN]
    assert sizes == [0, 0, 7, 0, 0, 0] and op_sigmas == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    # the cap: SEG-SDXL's W − (W % 2 − 1), then 2H − 1 (reflect padding below H)
    assert lower_modes([Mode.BLUR], [10.0], (32, 32))[2] == [33]
    assert lower_modes([Mode.BLUR], [3.0], (2, 16))[2] == [3]
    assert lower_modes([Mode.BLUR], [2.0], (1, 1))[0] == [Mode.NONE]  # a 1×1 grid: every blur is 1 tap
    assert PUBLIC_MODES == ("none", "identity", "blur")
    assert work_codes(modes, 0) == [Work.FULL, Work.COPY, Work.BLUR, Work.FULL, Work.MEAN, Work.MEAN]
    assert work_codes([Mode.IDENTITY], 4) == [Work.JOINT]


def test_token_grid_rules():
    """Joint PAG needs no grid (the image block is one row of Nq − T tokens); a grid must cover
    the image tokens exactly; text tokens cannot exceed the sequence."""
    from guidance_kernels.ops.guided_attention import _token_grid

    assert _token_grid("f", None, [Mode.IDENTITY], 20, 4) == ((1, 16), 4)
    assert _token_grid("f", (4, 4), [Mode.BLUR], 20, 4) == ((4, 4), 4)
    with pytest.raises(ValueError, match="f: grid: required when an item blurs"):
        _token_grid("f", None, [Mode.BLUR], 20, 4)
    with pytest.raises(ValueError, match=r"f: q: has 20 tokens but grid \(4, 5\) has H\*W = 20 \+ 4 text tokens"):
        _token_grid("f", (4, 5), [Mode.NONE], 20, 4)
    with pytest.raises(ValueError, match="f: text_tokens: 21 exceeds the 20 query tokens"):
        _token_grid("f", None, [Mode.NONE], 20, 21)


# --------------------------------------------------------------------------- backends vs reference


def _lanes_and_dtypes():
    """Every lane × dtype, except bf16 in the Triton interpreter (its bf16 tl.dot is wrong; the GPU
    lane checks bf16)."""
    out = []
    for lane in ATTENTION_LANES:
        for dtype in DTYPES:
            if not (lane[0].startswith("triton") and lane[1] == "cpu" and dtype == torch.bfloat16):
                out.append(pytest.param(lane, dtype, id=f"{lane_id(lane)}-{str(dtype).replace('torch.', '')}"))
    return out


LANE_DTYPES = _lanes_and_dtypes()
MIXED = ["none", "identity", "blur", "blur"]


@pytest.mark.parametrize("lane,dtype", LANE_DTYPES, indirect=["lane"])
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_mixed_batch_matches_reference(lane, dtype, d):
    """[none, identity, blur σ, blur σ=∞] in one call, both layouts, every head dim."""
    backend, device = lane
    heads, grid = 2, (5, 7)
    sigma = [None, None, 1.0, math.inf]
    layouts = ("bhnd", "bnd")
    if lane == ("triton", "cpu"):  # the interpreter is slow: one layout per dtype there
        layouts = ("bnd",) if dtype == torch.float16 else ("bhnd",)
    for layout in layouts:
        q, k, v = _qkv(4, heads, 35, d, dtype, device, seed=d, layout=layout)
        out = gk.guided_attention(q, k, v, modes=MIXED, sigma=sigma, grid=grid, layout=layout, heads=heads,
                                  backend=backend)
        assert out.shape == q.shape and out.dtype == dtype and out.device.type == device
        if layout == "bnd":
            assert out.is_contiguous()
        else:
            assert out.stride() == q.stride()  # q's own (B, N, heads, d) memory: the caller's reshape is free
        assert torch.equal(out[1], v[1])  # identity: a bit-exact copy of V
        _check(out, q, k, v, MIXED, sigma, grid, heads=heads, what=f"{backend} {layout} d={d}")


GRIDS = [(4, 4), (3, 7), (7, 3), (1, 1), (1, 5)]


@pytest.mark.parametrize("lane,dtype", LANE_DTYPES, indirect=["lane"])
@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_grids_and_text_blocks(lane, dtype, grid):
    """Square, non-square (both ways), 1×1 and one-row grids, without text and with a text block
    before / after the image tokens (joint attention, SD3 / Flux)."""
    backend, device = lane
    heads, d = 2, 64
    n_img = grid[0] * grid[1]
    modes = ["blur", "identity", "none", "blur"]
    sigma = [2.0, None, None, 1e5]
    texts = ((0, "after"), (6, "after"), (6, "before"))
    if lane == ("triton", "cpu"):  # the interpreter is slow: one text configuration per grid there
        texts = (texts[GRIDS.index(grid) % 3],)
    for text_tokens, position in texts:
        q, k, v = _qkv(4, heads, n_img + text_tokens, d, dtype, device, seed=n_img + text_tokens)
        out = gk.guided_attention(q, k, v, modes=modes, sigma=sigma, grid=grid, text_tokens=text_tokens,
                                  text_position=position, backend=backend)
        if text_tokens == 0:
            assert torch.equal(out[1], v[1])
        _check(out, q, k, v, modes, sigma, grid, heads=heads, text_tokens=text_tokens, text_position=position,
               what=f"{backend} {grid} text={text_tokens} {position}")


@pytest.mark.parametrize("lane,dtype", LANE_DTYPES, indirect=["lane"])
def test_token_counts_beyond_one_tile(lane, dtype):
    """Image and text blocks spanning several query/key tiles, none a multiple of the tile size."""
    backend, device = lane
    # several tiles of both blocks: fp32 tiles are 16 tokens, half-precision ones 64–128
    heads, d, grid, text_tokens = (1, 64, (5, 7), 20) if dtype == torch.float32 else (1, 64, (9, 15), 70)
    modes = ["identity", "blur", "none", "blur"]
    sigma = [None, 1e7, None, 1.5]
    for position in ("after", "before"):
        q, k, v = _qkv(4, heads, grid[0] * grid[1] + text_tokens, d, dtype, device, seed=7)
        out = gk.guided_attention(q, k, v, modes=modes, sigma=sigma, grid=grid, text_tokens=text_tokens,
                                  text_position=position, backend=backend)
        _check(out, q, k, v, modes, sigma, grid, heads=heads, text_tokens=text_tokens, text_position=position,
               what=f"{backend} {position}")


@pytest.mark.parametrize("lane,dtype", LANE_DTYPES, indirect=["lane"])
def test_sigma_edge_cases(lane, dtype):
    """Tiny σ (a 1-tap kernel: plain attention), σ = 9999 (finite: a near-box blur capped by the
    grid), just above it and inf (the mean), a kernel SEG's rule makes larger than the grid, and
    a grid wider than tall (the cap keeps the reflect padding valid)."""
    backend, device = lane
    heads, d = 2, 40
    for grid, sigmas in (((5, 7), [0.1, 9999.0, 9999.01, math.inf]), ((5, 7), [5.0, 3.0, 0.3, 1e4]),
                         ((2, 9), [3.0, 1.0, 0.1, 9999.0])):
        n = grid[0] * grid[1]
        q, k, v = _qkv(4, heads, n, d, dtype, device, seed=n)
        sizes = [blur_kernel_size(s, grid) or None for s in sigmas]
        out = gk.guided_attention(q, k, v, modes=["blur"] * 4, sigma=sigmas, grid=grid, backend=backend)
        _check(out, q, k, v, ["blur"] * 4, sigmas, grid, heads=heads, kernel_size=sizes,
               what=f"{backend} {grid} {sigmas}")
    # a 1-tap blur is exactly plain attention (the public function sends it down that path)
    q, k, v = _qkv(2, heads, 35, d, dtype, device, seed=3)
    blurred = gk.guided_attention(q, k, v, modes=["blur", "blur"], sigma=0.1, grid=(5, 7), backend=backend)
    assert torch.equal(blurred, gk.guided_attention(q, k, v, backend=backend))


def test_strided_inputs(lane):
    """Views as callers hold them: chunks of a fused qkv projection ("bnd"), a transposed k and a
    sliced v ("bhnd"); the output follows q's layout rule."""
    backend, device = lane
    b, heads, d, grid, text = 3, 2, 40, (5, 7), 6
    n = 35 + text
    modes, sigma = ["none", "identity", "blur"], [None, None, 1e9]
    qkv = torch.randn(b, n, 3 * heads * d, device=device)
    q, k, v = qkv.chunk(3, dim=-1)
    out = gk.guided_attention(q, k, v, modes=modes, sigma=sigma, grid=grid, layout="bnd", heads=heads,
                              text_tokens=text, backend=backend)
    assert out.is_contiguous()
    _check(out, q, k, v, modes, sigma, grid, heads=heads, text_tokens=text, what=f"{backend} fused qkv")
    q = torch.randn(b, heads, n, d, device=device)
    k = torch.randn(b, n, heads, d, device=device).transpose(1, 2)
    v = torch.randn(b, heads, n, d + 3, device=device)[..., 1:1 + d]
    sigma = [None, None, 0.8]
    out = gk.guided_attention(q, k, v, modes=modes, sigma=sigma, grid=grid, text_tokens=text, text_position="before",
                              backend=backend)
    assert out.stride() == q.stride()
    _check(out, q, k, v, modes, sigma, grid, heads=heads, text_tokens=text, text_position="before",
           what=f"{backend} strided")


@pytest.mark.parametrize("lane,dtype", LANE_DTYPES, indirect=["lane"])
def test_cross_attention_and_scale(lane, dtype):
    backend, device = lane
    q, _, _ = _qkv(2, 3, 37, 64, dtype, device, seed=11)
    _, k, v = _qkv(2, 3, 37, 64, dtype, device, nk=77, seed=12)
    for scale in (None, 0.05):
        out = gk.guided_attention(q, k, v, scale=scale, backend=backend)
        _check(out, q, k, v, ["none"] * 2, None, None, heads=3, scale=scale, what=f"{backend} scale={scale}")


def test_mode_and_sigma_spellings(lane):
    backend, device = lane
    q, k, v = _qkv(3, 2, 20, 16, torch.float32, device, seed=5)
    by_name = gk.guided_attention(q, k, v, modes=["none", "identity", "blur"], sigma=[None, None, 2.0], grid=(4, 5),
                                  backend=backend)
    assert torch.equal(by_name, gk.guided_attention(q, k, v, modes=[0, 1, 2], sigma=2.0, grid=(4, 5),
                                                    backend=backend))
    assert torch.equal(by_name, gk.guided_attention(q, k, v, modes=torch.tensor([0, 1, 2]), sigma=(1.0, 5.0, 2.0),
                                                    grid=(4, 5), backend=backend))
    assert torch.equal(gk.guided_attention(q, k, v, backend=backend),
                       gk.guided_attention(q, k, v, modes=["none"] * 3, backend=backend))


@pytest.mark.parametrize("lane", [x for x in TRITON_LANES if x[0] == "triton_sdpa"], ids=lane_id)
def test_triton_sdpa_backend_matches_reference(lane):
    """The triton_sdpa route (blur pre-pass feeding torch SDPA for the none / blur items, the
    kernel for identity and σ = ∞ items, in any order of items) computes the same thing; it
    serves guided_attention only."""
    backend, device = lane
    heads, grid, text = 2, (5, 7), 6
    modes = ["blur", "identity", "none", "blur"]
    sigma = [1.5, None, None, math.inf]
    for text_tokens in (0, text):
        q, k, v = _qkv(4, heads, 35 + text_tokens, 64, torch.float16, device, seed=text_tokens)
        out = gk.guided_attention(q, k, v, modes=modes, sigma=sigma, grid=grid, text_tokens=text_tokens,
                                  backend=backend)
        plain = gk.guided_attention(q, k, v, backend=backend)  # every item through SDPA
        if text_tokens == 0:
            assert torch.equal(out[1], v[1])
        _check(out, q, k, v, modes, sigma, grid, heads=heads, text_tokens=text_tokens, what=f"sdpa text={text_tokens}")
        _check(plain, q, k, v, ["none"] * 4, None, None, heads=heads, what="sdpa plain")
    x = torch.randn(1, 2, 6, 6, device=device)
    with pytest.raises(gk.BackendError, match="gaussian_blur_2d has no triton_sdpa implementation"):
        gk.gaussian_blur_2d(x, 1.0, backend=backend)


@pytest.mark.parametrize("lane", [x for x in ATTENTION_LANES if x[0] != "torch"], ids=lane_id)
def test_large_offsets_use_int64(lane):
    """A token stride of 2**30 + 64 puts the second token of a (item, head) slice past 2**31
    elements: the kernel switches to int64 in-slice offsets. q, k, v share one virtual storage and
    only a few hundred elements are touched. (Kernel lanes only.)"""
    backend, device = lane
    stride = 2**30 + 64
    storage = torch.empty(3 * stride + 2048, dtype=torch.float16, device=device)  # virtual: never touched whole
    base = [storage.as_strided((1, 1, 3, 64), (64, 64, stride, 1), offset) for offset in (0, 256, 512)]
    values = [torch.randn(1, 1, 3, 64, dtype=torch.float16) for _ in range(3)]
    for view, value in zip(base, values):
        view.copy_(value.to(device))
    q, k, v = base
    out = gk.guided_attention(q, k, v, modes=["blur"], sigma=1e9, grid=(1, 3), backend=backend)
    expect = R.guided_attention(*(t.float() for t in values), ["blur"], 1e9, (1, 3)).half()
    torch.testing.assert_close(out.cpu(), expect, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("lane", TRITON_LANES, ids=lane_id)
def test_raw_op_rejects_inputs_the_kernel_cannot_address(lane):
    backend, device = lane
    op = torch.ops.guidance_kernels.guided_attention
    q, _, _ = _qkv(2, 1, 12, 16, torch.float32, device)
    _, k, v = _qkv(2, 1, 12, 16, torch.float32, device, nk=8)
    with pytest.raises(ValueError, match="need self-attention"):
        op(q, k, v, [Mode.NONE, Mode.IDENTITY], [0.0, 0.0], [0, 0], 1, 12, 0, False, 0.25, "bhnd", backend)
    with pytest.raises(ValueError, match=r"grid: \(3, 3\) does not cover the 12 image tokens"):
        op(q, q, q, [Mode.NONE, Mode.MEAN], [0.0, 0.0], [0, 0], 3, 3, 0, False, 0.25, "bhnd", backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "triton_sdpa"])
def test_cuda_graph_capture_after_warm_up(backend):
    """After one eager call (Triton compiles, cached weights and index tensors), a mixed
    [none, identity, blur σ, σ = ∞, none] batch with text tokens captures into a CUDA graph, and
    replays follow new q / k / v values like eager calls. (The non-contiguous attended items of the
    triton_sdpa route are gathered on the device: no host copy inside the capture.)"""
    heads, grid, text = 2, (6, 8), 8
    kw = dict(modes=["none", "identity", "blur", "blur", "none"], sigma=[None, None, 2.0, math.inf, None],
              grid=grid, text_tokens=text, backend=backend)
    q, k, v = _qkv(5, heads, 48 + text, 64, torch.bfloat16, "cuda", seed=1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gk.guided_attention(q, k, v, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gk.guided_attention(q, k, v, **kw)
    for step in range(2):
        for t, new in zip((q, k, v), _qkv(5, heads, 48 + text, 64, torch.bfloat16, "cuda", seed=10 + step)):
            t.copy_(new)
        graph.replay()
        expect = gk.guided_attention(q, k, v, **kw)
        torch.cuda.synchronize()
        assert torch.equal(captured, expect), f"replay {step} differs from the eager call"


def test_empty_inputs(lane):
    backend, device = lane
    q = torch.empty(0, 2, 16, 8, device=device)
    assert gk.guided_attention(q, q, q, modes=[], backend=backend).shape == q.shape
    q = torch.empty(2, 2, 0, 8, device=device)
    assert gk.guided_attention(q, q, q, modes=["identity", "none"], backend=backend).shape == q.shape


def test_gradients_match_the_reference(lane):
    """The op is differentiable (models run it under torch.compile with parameters requiring
    grad): whatever backend ran the forward, the gradients are those of the reference."""
    backend, device = lane
    heads, grid, text = 2, (4, 5), 3
    modes, sigma = ["none", "identity", "blur", "blur"], [None, None, 1.0, math.inf]
    for text_tokens, position in ((0, "after"), (text, "before")):
        q, k, v = _qkv(4, heads, 20 + text_tokens, 16, torch.float32, device, seed=text_tokens)
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = gk.guided_attention(q, k, v, modes=modes, sigma=sigma, grid=grid, text_tokens=text_tokens,
                                  text_position=position, backend=backend)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad)
        q64, k64, v64 = (to64(t).requires_grad_() for t in (q, k, v))
        ref = R.guided_attention(q64, k64, v64, modes, sigma, grid, text_tokens=text_tokens, text_position=position)
        expect = torch.autograd.grad(ref, (q64, k64, v64), to64(grad))
        for name, g, e in zip("qkv", got, expect):
            assert g.dtype == torch.float32 and g.shape == e.shape
            torch.testing.assert_close(to64(g), e, rtol=1e-4, atol=1e-5, msg=f"{backend} d{name} text={text_tokens}")


# --------------------------------------------------------------------------- the short-cuts


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_short_cuts_skip_the_quadratic_work():
    """The torch backend's implementation, counted by torch's FLOP counter (which sees through it,
    not through the custom op): σ = ∞ items cost O(N·d) (one attention row per item and head),
    identity items nothing, joint PAG O((N + T)·T·d); plain attention O(N²·d)."""
    from guidance_kernels.torch_ops.guided_attention import guided_attention as torch_backend

    heads, d, (h, w), n = 2, 32, (32, 32), 1024
    q, k, v = _qkv(2, heads, n, d, torch.float32, "cpu")

    def run(modes, text=0, qkv=(q, k, v)):
        args = GuidedAttentionArgs(*qkv, modes, [0.0] * 2, [0] * 2, h, w, text, False, 0.2, "bhnd")
        return _flops(lambda: torch_backend(args))

    full = 2 * 2 * 2 * heads * n * n * d  # QKᵀ and PV of two items (CPU SDPA has no FLOP formula)
    mean = run([Mode.MEAN] * 2)
    assert 0 < mean <= 2 * 2 * 2 * heads * n * d
    assert run([Mode.IDENTITY] * 2) == 0
    text = 16
    joint = run([Mode.IDENTITY] * 2, text, _qkv(2, heads, n + text, d, torch.float32, "cpu"))
    assert 0 < joint <= 2 * 2 * 2 * heads * ((n + text) * text * d + text * (n + text) * d)
    assert joint * 10 < full


# --------------------------------------------------------------------------- bad input


def _bad(exc, match, *args, **kw):
    with pytest.raises(exc, match=match):
        gk.guided_attention(*args, **kw)


def test_bad_input_is_rejected_with_the_argument_name():
    q, k, v = _qkv(3, 2, 35, 8, torch.float32, "cpu")
    grid = (5, 7)
    _bad(ValueError, r"q: has 35 tokens but grid \(6, 6\) has H\*W = 36", q, k, v, modes=["blur"] * 3, sigma=1.0,
         grid=(6, 6))
    _bad(ValueError, r"q: has 35 tokens but grid \(5, 7\) has H\*W = 35 \+ 4 text tokens", q, k, v, grid=grid,
         text_tokens=4)
    _bad(ValueError, "sigma: must be > 0", q, k, v, modes=["none", "none", "blur"], sigma=0.0, grid=grid)
    _bad(ValueError, r"sigma\[2\]: must be > 0", q, k, v, modes=["none", "none", "blur"], sigma=[1, 1, -2.0],
         grid=grid)
    _bad(ValueError, "sigma: must be > 0 .and not NaN., got nan", q, k, v, modes=["blur"] * 3, sigma=float("nan"),
         grid=grid)
    _bad(ValueError, "sigma: required for blur item 0", q, k, v, modes=["blur", "none", "none"], grid=grid)
    _bad(ValueError, r"sigma\[1\]: required for blur item 1", q, k, v, modes=["none", "blur", "none"],
         sigma=[1.0, None, 1.0], grid=grid)
    _bad(ValueError, "sigma: has 2 entries but the batch has 3", q, k, v, modes=["blur"] * 3, sigma=[1.0, 2.0],
         grid=grid)
    _bad(ValueError, r"modes\[1\]: unknown mode 'smooth'", q, k, v, modes=["none", "smooth", "none"])
    _bad(ValueError, r"modes\[2\]: unknown mode 3", q, k, v, modes=[0, 1, 3])
    _bad(ValueError, r"modes\[0\]: unknown mode True", q, k, v, modes=[True, 0, 0])
    _bad(ValueError, "modes: has 2 entries but the batch has 3 items", q, k, v, modes=["none", "identity"])
    _bad(TypeError, "modes: expected a sequence", q, k, v, modes="identity")
    _bad(ValueError, "grid: required when an item blurs", q, k, v, modes=["blur"] * 3, sigma=1.0)
    _bad(ValueError, r"grid\[1\]: must be >= 1", q, k, v, grid=(35, 0))
    _bad(ValueError, "text_tokens: 40 exceeds the 35 query tokens", q, k, v, text_tokens=40)
    _bad(ValueError, "text_tokens: must be >= 0", q, k, v, text_tokens=-1)
    _bad(ValueError, "text_position: must be one of", q, k, v, text_position="middle")
    _bad(ValueError, "k: batch 2 differs from q's 3", q, k[:2], v)
    _bad(ValueError, "v: has 3 heads but q has 2", q, k, torch.randn(3, 3, 35, 8))
    _bad(ValueError, "k: head dim 4 differs from q's 8", q, torch.randn(3, 2, 35, 4), v)
    _bad(ValueError, "v: has 30 tokens but k has 35", q, k, v[:, :, :30])
    _bad(ValueError, "k: has no tokens", q, k[:, :, :0], v[:, :, :0])
    _bad(ValueError, "k: has 20 tokens but q has 35: identity and blur items need self-attention", q, k[:, :, :20],
         v[:, :, :20], modes=["identity", "none", "none"])
    _bad(ValueError, "k: is on meta but q is on cpu", q, k.to("meta"), v)
    _bad(TypeError, "v: has dtype torch.float16 but q has torch.float32", q, k, v.half())
    _bad(TypeError, "q: expected a floating-point tensor", q.int(), k, v)
    _bad(ValueError, "layout: must be one of", q, k, v, layout="bshd")
    _bad(ValueError, "heads: required for layout 'bnd'", q[:, 0], k[:, 0], v[:, 0], layout="bnd")
    _bad(ValueError, "q: last dim 8 is not divisible by heads=3", q[:, 0], k[:, 0], v[:, 0], layout="bnd", heads=3)
    _bad(ValueError, r"q: layout 'bhnd' expects \(B, heads, N, d\)", q[:, 0], k[:, 0], v[:, 0])
    _bad(ValueError, "heads: is 4 but q has 2 heads", q, k, v, heads=4)
    _bad(ValueError, "scale: must be finite", q, k, v, scale=float("inf"))


def test_backend_checks_explain_and_fall_back():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        req = backends.Request("cuda", 0, dtype, (("head_dim", 512),))
        reasons = backends.unsupported_reasons("guided_attention", "triton", req)
        assert any("head dim 512 > 256" in r for r in reasons), reasons
    fp32 = backends.Request("cuda", 0, torch.float32, (("head_dim", 160),))
    assert any("float32 with head dim 160" in r for r in backends.unsupported_reasons("guided_attention", "triton",
                                                                                     fp32))
    ok = backends.Request("cuda", 0, torch.bfloat16, (("head_dim", 160),))
    assert not [r for r in backends.unsupported_reasons("guided_attention", "triton", ok) if "head dim" in r]
    # triton_sdpa runs our kernel only for identity / σ = ∞ items: without them SDPA serves any head dim
    wide = (("head_dim", 512), ("kernel_items", False))
    assert not [r for r in backends.unsupported_reasons("guided_attention", "triton_sdpa",
                                                        backends.Request("cuda", 0, torch.float32, wide))
                if "head dim" in r]
    wide = (("head_dim", 512), ("kernel_items", True))
    assert any("head dim 512 > 256" in r for r in backends.unsupported_reasons(
        "guided_attention", "triton_sdpa", backends.Request("cuda", 0, torch.float32, wide)))
    q = torch.randn(1, 1, 4, 512)
    with pytest.raises(gk.BackendError, match="guided_attention: backend 'triton' cannot serve this call:.*head dim "
                                              "512 > 256"):
        gk.guided_attention(q, q, q, backend="triton")
    torch.testing.assert_close(gk.guided_attention(q, q, q), F.scaled_dot_product_attention(q, q, q))  # automatic
    with pytest.raises(gk.BackendError, match="dtype torch.float64"):
        gk.guided_attention(q.double(), q.double(), q.double(), backend="triton")
    with pytest.raises(gk.BackendError, match="has no cuda implementation"):
        gk.guided_attention(q, q, q, backend="cuda")


# --------------------------------------------------------------------------- opcheck and compile


def test_opcheck():
    op = torch.ops.guidance_kernels.guided_attention
    q, k, v = _qkv(4, 2, 20 + 3, 8, torch.float32, "cpu")
    modes = [int(m) for m in (Mode.NONE, Mode.IDENTITY, Mode.BLUR, Mode.MEAN)]
    torch.library.opcheck(op, (q, k, v, modes, [0.0, 0.0, 1.0, 0.0], [0, 0, 5, 0], 4, 5, 3, False, 0.3, "bhnd",
                               "torch"))
    torch.library.opcheck(op, (q, k, v, modes, [0.0, 0.0, 1.0, 0.0], [0, 0, 3, 0], 4, 5, 3, True, 0.3, "bnd",
                               "torch"))
    qc, kc, vc = _qkv(2, 2, 9, 8, torch.float32, "cpu", nk=13)
    torch.library.opcheck(op, (qc, kc, vc, [0, 0], [0.0, 0.0], [0, 0], 1, 9, 0, False, 0.35, "bhnd", "torch"))
    q, k, v = (t.detach().requires_grad_() for t in _qkv(4, 2, 20 + 3, 8, torch.float64, "cpu"))
    torch.library.opcheck(op, (q, k, v, modes, [0.0, 0.0, 1.0, 0.0], [0, 0, 5, 0], 4, 5, 3, False, 0.3, "bhnd",
                               "torch"))


def test_compile_fullgraph_no_graph_breaks():
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

    def step(q, k, v, x):
        seg = gk.guided_attention(q, k, v, modes=["none", "none", "blur"], sigma=2.0, grid=(4, 5))
        pag = gk.guided_attention(q.transpose(1, 2).flatten(2), k.transpose(1, 2).flatten(2),
                                  v.transpose(1, 2).flatten(2), modes=["none", "none", "identity"], layout="bnd",
                                  heads=2)
        inf = gk.guided_attention(q, k, v, modes=["none", "blur", "blur"], sigma=[None, math.inf, 1e5], grid=(4, 5))
        return seg * 2 + inf, pag, gk.gaussian_blur_2d(x, 1.0)

    compiled = torch.compile(step, fullgraph=True, backend=counter)
    q, k, v = _qkv(3, 2, 20, 8, torch.float32, "cpu")
    x = torch.randn(1, 2, 6, 6)
    for _ in range(2):
        for got, expect in zip(compiled(q, k, v, x), step(q, k, v, x)):
            torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_compile_static_sigma_recompiles_once_per_configuration():
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(lambda q, k, v, s: gk.guided_attention(q, k, v, modes=["none", "blur"], sigma=s,
                                                                  grid=(4, 4)), fullgraph=True, backend=counter)
    q, k, v = _qkv(2, 1, 16, 8, torch.float32, "cpu")
    for s in (1.0, 2.0, 1.0, 2.0):
        torch.testing.assert_close(compiled(q, k, v, s), gk.guided_attention(q, k, v, modes=["none", "blur"], sigma=s,
                                                                             grid=(4, 4)))
    assert counter.frame_count <= 2
