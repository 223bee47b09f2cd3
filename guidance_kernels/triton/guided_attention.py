"""Triton kernels of guided_attention: flash attention with PAG / SEG perturbations built in.

The record (``_library.GuidedAttentionArgs``) holds ``(B, heads, N, d)`` views (any strides), one
lowered ``_spec.Mode`` per item (turned into the kernel's per-item ``Work`` by :func:`work_codes`),
the blur items' σ and kernel sizes, the image grid and the text block.

Launches of the ``"triton"`` backend:

1. blur items only — ``gaussian_blur_2d._blur_kernel`` writes the blurred image queries of every
   blur item into a compact ``(n_blur, heads, H·W, d)`` buffer (one launch per distinct σ; the
   separable blur costs ~4k multiply-adds per element, a few % of the attention at N = 4096);
2. σ = ∞ items only — ``_spatial_sum_kernel`` (partial sums of the image queries) then
   ``_mean_row_kernel``: each program takes the mean query of one (item, head) and ONE split of
   the keys and writes that split's online-softmax state (max, sum, Σ p·v) in fp32
   (flash-decoding); O(N·d) in total instead of O(N²·d);
3. ``_attention_kernel`` — ONE launch over (query tile, item, head) for the whole mixed batch,
   each program reading its item's mode. The image block and the text block are tiled
   separately, so a query tile never mixes image and text rows and does one kind of work:

   * none / blur: flash attention (online softmax in the exp2 domain, fp32 accumulators, P cast to
     the input dtype for the P·V product as flash attention does); blur items' image tiles read
     their queries from the blurred buffer, text tiles from q;
   * identity without text: a copy of the V rows — bit-exact, no arithmetic (a batch of identity
     items only is one ``copy_``);
   * identity with text (joint attention): an image tile starts its online softmax from the own
     key (logit q_i·k_i, value v_i) and then visits only the text key tiles; text tiles attend
     normally. No S×S mask exists anywhere;
   * σ = ∞: image tiles write the merged split states of step 2 (no key loop); text tiles attend
     normally.

Why a blur pre-pass rather than blurring each query tile inside the attention kernel: a tile's
blurred queries depend on ``BLOCK_M + (k − 1)·W`` input tokens; as a matrix product (the only
fast way in Triton) that costs ``(BLOCK_M + (k − 1)·W) / N`` of the tile's QKᵀ work, twice that
with the weights split into two bf16 parts for fp32-accurate weights — about +12% of the
attention for σ = 1 (k = 7) on a 64×64 grid, about +100% for σ = 10 — while the pre-pass costs
one read and write of the blurred items' image queries (~2% of SDXL's N = 4096 attention).

Two backends share these kernels (``backends`` registers both, each with its own support check):

* ``"triton"`` — everything above, in our kernels;
* ``"triton_sdpa"`` — torch's ``scaled_dot_product_attention`` (its fastest backend: FlashAttention-2
  or cuDNN on Hopper) on the none / blur items, their image queries blurred by the same pre-pass,
  and ``_attention_kernel`` only for the identity and σ = ∞ items (the others are skipped).
  ``_layout.sdpa`` restores the definition's NaN rows where torch's fused kernels return finite
  ones (a non-finite query; every key non-finite); one case remains torch's own: in fp16/bf16,
  its CPU kernel drops the rows that an inf key logit makes NaN (``"triton"`` and ``"torch"``
  follow the definition everywhere).
  Which is faster on a GPU is measured by the benchmark (``benchmarks/README.md`` records the
  status of the default priority).

fp32 inputs use IEEE fp32 dot products (never tf32). Item and head offsets are int64; offsets
inside one (item, head) slice are int32 unless the slice spans 2**31 elements (``OFF64``).
Tile sizes: :func:`attention_configs` (candidates per GPU generation and head dim, spill-free for
sm_80 and sm_90 per the AOT compile lane), the fastest timed once per shape class on a GPU
(:func:`tuned`).
"""

from __future__ import annotations

import enum
import math
import os

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (Triton >= 3.4; the GPU image's 3.6 and the local 3.9 have them)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

from .. import _layout
from .._layout import put_items, sdpa, take_items
from .._library import GuidedAttentionArgs, attention_out
from .._spec import Mode
from ..backends import triton_interpreter
from ._common import LOG2E, capability, device_guard, index_tensor
from .gaussian_blur_2d import Geometry, blur_into, spatial_sums


class Work(enum.IntEnum):
    """What ``_attention_kernel`` does for an item: the kernel's vocabulary, derived from the item's
    ``_spec.Mode`` by :func:`work_codes` alone."""

    FULL = 0  # flash attention
    COPY = 1  # identity without text: a copy of v
    BLUR = 2  # flash attention, image queries from the blurred buffer
    MEAN = 3  # σ = ∞: image rows from the mean-row states, text rows attend
    JOINT = 4  # identity with text: own key + text keys for image rows
    SKIP = 5  # served elsewhere (triton_sdpa: by torch SDPA)


def work_codes(modes: list[int], text_tokens: int) -> list[Work]:
    """Each item's kernel work for its (lowered) mode."""
    table = {Mode.NONE: Work.FULL, Mode.BLUR: Work.BLUR, Mode.MEAN: Work.MEAN,
             Mode.IDENTITY: Work.COPY if text_tokens == 0 else Work.JOINT}
    return [table[Mode(m)] for m in modes]


K_COPY: tl.constexpr = tl.constexpr(int(Work.COPY))
K_BLUR: tl.constexpr = tl.constexpr(int(Work.BLUR))
K_MEAN: tl.constexpr = tl.constexpr(int(Work.MEAN))
K_JOINT: tl.constexpr = tl.constexpr(int(Work.JOINT))
K_SKIP: tl.constexpr = tl.constexpr(int(Work.SKIP))
ROW_TILE = 4096  # elements of a (keys, BLOCK_D) tile in _mean_row_kernel
MAX_SPLITS = 64


# --------------------------------------------------------------------------- tiles


def head_split(head_dim: int) -> tuple[int, int]:
    """(D0, D1): the head dim as two power-of-two column blocks, ``D0`` the largest power of two
    ≤ d (at least 16) and ``D1`` the power of two ≥ 16 covering the rest, 0 when nothing is left:
    160 = 128 + 32, 80 = 64 + 16, 40 = 32 + 16 (8 columns masked), 64 = 64 + 0. Against padding d to
    one power of two (256, 128, 64) the dots skip 37.5 % (160, 80) or 17 % (40) of their work on
    zero columns, and the accumulators are smaller."""
    d0 = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d0
    return d0, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


def padded_dim(head_dim: int) -> int:
    """One power of two ≥ d (at least 16): the mean-row kernels' (O(N·d)) column block."""
    return max(16, triton.next_power_of_2(head_dim))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per (D0, D1) for fp16/bf16, fastest expected
# first: the first is the default (and what runs in the interpreter, under CUDA-graph capture and
# before tuning); the others are timed on the first call per tuning key (:func:`tuned`). Every
# entry compiles without spills or stack frame for its GPU generation in every variant of the main
# kernel (tests/aot_guided_attention.py) and fits its generation's shared memory (the sm_80 table:
# ≤ 99 KiB, sm_86 / sm_89). Hopper (wgmma): 128×128 tiles where the registers allow.
HOPPER_CONFIGS = {
    (64, 0): ((128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)),
    (128, 0): ((128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)),
    (128, 32): ((128, 64, 8, 2), (64, 64, 4, 2)),
    (64, 16): ((128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)),
    (32, 16): ((128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)),
}
# Ampere / Ada and the rest (mma.sync: the accumulators and the A operands live in the registers
# of each warp): at d ≥ 80 the Hopper tiles keep 8–330 B stack frames on sm_80 (255 registers),
# and so do 4-warp tiles; 8 warps on narrower key tiles, one stage at d = 160.
AMPERE_CONFIGS = {
    (64, 0): ((128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)),
    (128, 0): ((128, 32, 8, 3), (64, 64, 8, 3)),
    (128, 32): ((64, 32, 8, 1),),
    (64, 16): ((128, 64, 8, 3), (64, 64, 8, 3)),
    (32, 16): ((128, 64, 8, 3), (64, 64, 4, 3)),
}
HALF_FALLBACK = ((64, 64, 4, 2), (64, 32, 4, 2))  # other head dims: small tiles first (256 = 256 + 0)


def attention_configs(head_dim: int, dtype: torch.dtype,
                      arch: tuple[int, int] = (9, 0)) -> tuple[tuple[int, int, int, int], ...]:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates of the main kernel, default first,
    for a GPU of compute capability ``arch`` (sm_90 / sm_100: the Hopper table; others: the sm_80 one).

    fp32 inputs use IEEE fp32 dots on the CUDA cores (never tf32), register hungry: 16×16 tiles,
    one candidate; fp32 head dims above 128 spill at any tile, so the backend check sends them to
    the torch backend on CUDA (the interpreter still runs them)."""
    if dtype == torch.float32:
        return ((16, 16, 4 if sum(head_split(head_dim)) <= 64 else 8, 2),)
    table = HOPPER_CONFIGS if arch[0] in (9, 10) else AMPERE_CONFIGS
    return table.get(head_split(head_dim), HALF_FALLBACK)


_TUNED: dict[tuple, tuple] = {}
TUNE_WARMUP_MS, TUNE_REP_MS = 5, 25


def tuned(key: tuple, configs: tuple, like: torch.Tensor, launch) -> tuple:
    """The config to launch for tuning ``key``: the fastest of ``configs`` as timed once on this
    process's GPU (``launch(config)`` runs the real launch on the real arguments; the kernels are
    pure functions of their inputs, so the timing runs only rewrite the same output), remembered
    per key. The default ``configs[0]`` runs without timing anywhere timing cannot or must not run:
    CPU tensors (the interpreter), while a CUDA graph is being captured (a captured call must
    enqueue only its own launch; the graph keeps the default even after tuning), and with the
    environment variable ``GUIDANCE_KERNELS_AUTOTUNE=0`` (bit-for-bit reproducible tiles).
    Candidates after the first that fail to launch (a GPU with less shared memory) are skipped."""
    if len(configs) == 1 or not like.is_cuda:
        return configs[0]
    best = _TUNED.get(key)
    if best is not None:
        return best
    if torch.cuda.is_current_stream_capturing() or os.environ.get("GUIDANCE_KERNELS_AUTOTUNE", "1") == "0":
        return configs[0]
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    times = []
    with device_guard(like):
        for i, config in enumerate(configs):
            try:
                times.append(do_bench(lambda c=config: launch(c), warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS,
                                      return_mode="median"))
            except OutOfResources:
                if i == 0:
                    raise
                times.append(math.inf)
    best = configs[min(range(len(configs)), key=times.__getitem__)]
    _TUNED[key] = best
    return best


# --------------------------------------------------------------------------- kernels


@triton.jit
def _offsets(idx, OFF64: tl.constexpr):
    """Token indices for in-slice offsets: int64 when a (item, head) slice spans 2**31 elements or
    more, else int32 (the (BLOCK, d) pointer tiles then cost half the registers). Item and head
    offsets are always int64."""
    if OFF64:
        return idx.to(tl.int64)
    return idx


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _load(ptrs, cols_ok, rows_ok, MASK_COLS: tl.constexpr, MASK_ROWS: tl.constexpr):
    """A tile load masked only where it has to be (unmasked loads keep 16-byte vectors and the
    pipeliner's fast path)."""
    if MASK_COLS and MASK_ROWS:
        val = tl.load(ptrs, mask=cols_ok & rows_ok, other=0.0)
    elif MASK_COLS:
        val = tl.load(ptrs, mask=cols_ok, other=0.0)
    elif MASK_ROWS:
        val = tl.load(ptrs, mask=rows_ok, other=0.0)
    else:
        val = tl.load(ptrs)
    return val


@triton.jit
def _kv(base, desc, b, h, on, start, sn, sd, n_ok, C0: tl.constexpr, C: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, TMA: tl.constexpr, TRANS: tl.constexpr):
    """Columns [C0, C0 + C) of key/value rows ``on``: a (BLOCK_N, C) tile, or its transpose (C,
    BLOCK_N) when TRANS (keys for q·kᵀ). Through the tensor descriptor (TMA: rows past the tensor
    and columns past d read as 0) for full tiles; masked pointer loads for the tail tile (its rows
    past ``hi`` are real keys of another block: they must read as 0, never as whatever they hold).
    The pointer path addresses the transpose directly (an in-register transpose would cost the
    fp32 FMA dot a layout conversion and spills)."""
    cols = C0 + tl.arange(0, C)
    if TMA and not MASK_N:
        val = desc.load([b, h, start, C0]).reshape(BLOCK_N, C)
        if TRANS:
            val = tl.trans(val)
    elif TRANS:
        val = _load(base + on[None, :] * sn + cols[:, None] * sd, (cols < HEAD_DIM)[:, None], n_ok[None, :],
                    C0 + C > HEAD_DIM, MASK_N)
    else:
        val = _load(base + on[:, None] * sn + cols[None, :] * sd, (cols < HEAD_DIM)[None, :], n_ok[:, None],
                    C0 + C > HEAD_DIM, MASK_N)
    return val


@triton.jit
def _tile(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, kd0, kd1, vd0, vd1, b, h, skn, skd, svn, svd, start, hi,
          qk_scale, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_N: tl.constexpr,
          MASK_N: tl.constexpr, IEEE: tl.constexpr, OFF64: tl.constexpr, TMA: tl.constexpr):
    """One key tile of the online softmax (exp2 domain: qk_scale includes log2 e), the head dim in
    two column blocks (:func:`head_split`): S = q0·k0ᵀ + q1·k1ᵀ, acc0 += P·v0, acc1 += P·v1."""
    offs_n = start + tl.arange(0, BLOCK_N)
    on = _offsets(offs_n, OFF64)
    n_ok = offs_n < hi
    kt0 = _kv(k_base, kd0, b, h, on, start, skn, skd, n_ok, 0, D0, HEAD_DIM, BLOCK_N, MASK_N, TMA, True)
    s = _dot(q0, kt0, None, IEEE)
    if D1 > 0:
        kt1 = _kv(k_base, kd1, b, h, on, start, skn, skd, n_ok, D0, D1, HEAD_DIM, BLOCK_N, MASK_N, TMA, True)
        s = _dot(q1, kt1, s, IEEE)
    s = s * qk_scale
    if MASK_N:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v0 = _kv(v_base, vd0, b, h, on, start, svn, svd, n_ok, 0, D0, HEAD_DIM, BLOCK_N, MASK_N, TMA, False)
    if not IEEE:
        p = p.to(v0.dtype)  # P in the input dtype for the P·V product, as flash attention does
    acc0 = _dot(p, v0, acc0 * alpha[:, None], IEEE)
    if D1 > 0:
        v1 = _kv(v_base, vd1, b, h, on, start, svn, svd, n_ok, D0, D1, HEAD_DIM, BLOCK_N, MASK_N, TMA, False)
        acc1 = _dot(p, v1, acc1 * alpha[:, None], IEEE)
    return acc0, acc1, l_i, m_new


@triton.jit
def _attend(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, kd0, kd1, vd0, vd1, b, h, skn, skd, svn, svd, lo, hi,
            qk_scale, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_N: tl.constexpr,
            IEEE: tl.constexpr, OFF64: tl.constexpr, TMA: tl.constexpr, STAGES: tl.constexpr):
    """Keys [lo, hi): full tiles without key masks (the pipelined hot loop), then a masked tail;
    fp32 (IEEE FMA dots): one loop of masked tiles (a second, unmasked copy of the fully unrolled
    FMA dots makes ptxas spill at d > 128)."""
    if IEEE:
        for start in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
            acc0, acc1, l_i, m_i = _tile(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, kd0, kd1, vd0, vd1, b, h,
                                         skn, skd, svn, svd, start, hi, qk_scale, HEAD_DIM, D0, D1, BLOCK_N, True,
                                         IEEE, OFF64, False)
    else:
        end = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
        for start in tl.range(lo, end, BLOCK_N, num_stages=STAGES):
            acc0, acc1, l_i, m_i = _tile(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, kd0, kd1, vd0, vd1, b, h,
                                         skn, skd, svn, svd, start, hi, qk_scale, HEAD_DIM, D0, D1, BLOCK_N, False,
                                         IEEE, OFF64, TMA)
        if end < hi:
            acc0, acc1, l_i, m_i = _tile(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, kd0, kd1, vd0, vd1, b, h,
                                         skn, skd, svn, svd, end, hi, qk_scale, HEAD_DIM, D0, D1, BLOCK_N, True,
                                         IEEE, OFF64, TMA)
    return acc0, acc1, l_i, m_i


@triton.jit
def _attention_kernel(out_ptr, q_ptr, k_ptr, v_ptr, qb_ptr, part_ptr, info_ptr, kd0, kd1, vd0, vd1,
                      qk_scale, heads, Nk, img0, n_img, text0, n_text, n_part, tiles_img, tiles_m,
                      sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod, sbs, sbh, sbn,
                      HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, PART_D: tl.constexpr, PART_P: tl.constexpr, HAS_COPY: tl.constexpr,
                      HAS_BLUR: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_JOINT: tl.constexpr, IEEE: tl.constexpr,
                      OFF64: tl.constexpr, TMA: tl.constexpr, ALIGN: tl.constexpr, STAGES: tl.constexpr):
    # The launcher passes every item / head / token stride in units of ALIGN elements: multiplied
    # back by the constexpr, their divisibility is known, so row and head offsets keep the 16-byte
    # alignment that vector loads need (Triton itself only specialises strides divisible by 16,
    # not e.g. d = 40's head stride).
    sqb, sqh, sqn = sqb * ALIGN, sqh * ALIGN, sqn * ALIGN
    skb, skh, skn = skb * ALIGN, skh * ALIGN, skn * ALIGN
    svb, svh, svn = svb * ALIGN, svh * ALIGN, svn * ALIGN
    sob, soh, son = sob * ALIGN, soh * ALIGN, son * ALIGN
    sbs, sbh, sbn = sbs * ALIGN, sbh * ALIGN, sbn * ALIGN
    pid = tl.program_id(0)
    pid_m = pid % tiles_m
    bh = pid // tiles_m
    b = bh // heads
    h = bh % heads
    mode = tl.load(info_ptr + 2 * b)
    slot = tl.load(info_ptr + 2 * b + 1)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    k_base = k_ptr + b64 * skb + h64 * skh
    v_base = v_ptr + b64 * svb + h64 * svh
    # Query tiles never mix image and text rows: the first tiles_img tiles cover the image block,
    # the rest the text block. Every tile is then uniform in what it computes.
    text_tile = pid_m >= tiles_img
    row0 = tl.where(text_tile, text0 + (pid_m - tiles_img) * BLOCK_M, img0 + pid_m * BLOCK_M)
    row_end = tl.where(text_tile, text0 + n_text, img0 + n_img)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    om = _offsets(offs_m, OFF64)
    rows_ok = (offs_m < row_end)[:, None]
    cols0 = tl.arange(0, D0)
    cols1 = D0 + tl.arange(0, D1 if D1 > 0 else 16)
    mask0 = rows_ok & (cols0 < HEAD_DIM)[None, :]
    mask1 = rows_ok & (cols1 < HEAD_DIM)[None, :]
    o_base = out_ptr + b64 * sob + h64 * soh + om[:, None] * son
    image_tile = text_tile == 0
    if HAS_COPY:
        if mode == K_COPY:
            # PAG without text: the output rows are the V rows, bit for bit
            v_rows = v_base + om[:, None] * svn
            tl.store(o_base + cols0[None, :] * sod, tl.load(v_rows + cols0[None, :] * svd, mask=mask0), mask=mask0)
            if D1 > 0:
                tl.store(o_base + cols1[None, :] * sod, tl.load(v_rows + cols1[None, :] * svd, mask=mask1),
                         mask=mask1)
    broadcast = False
    if HAS_MEAN:
        broadcast = (mode == K_MEAN) & image_tile
        if broadcast:
            # σ = ∞, image rows: merge the key splits of this (item, head)'s mean-query row
            # (flash-decoding) and write it to every row of the tile
            offs_s = tl.arange(0, PART_P)
            s_ok = offs_s < n_part
            rows = part_ptr + ((slot * heads + h).to(tl.int64) * n_part + offs_s) * (PART_D + 2)
            ms = tl.load(rows, mask=s_ok, other=float("-inf"))
            ls = tl.load(rows + 1, mask=s_ok, other=0.0)
            wts = tl.math.exp2(ms - tl.max(ms, axis=0))
            denom = tl.sum(wts * ls, axis=0)
            accs = tl.load(rows[:, None] + 2 + cols0[None, :], mask=s_ok[:, None], other=0.0)
            row = tl.sum(wts[:, None] * accs, axis=0) / denom
            vals = tl.zeros([BLOCK_M, D0], dtype=tl.float32) + row[None, :]
            tl.store(o_base + cols0[None, :] * sod, vals.to(out_ptr.dtype.element_ty), mask=mask0)
            if D1 > 0:
                accs1 = tl.load(rows[:, None] + 2 + cols1[None, :], mask=s_ok[:, None], other=0.0)
                row1 = tl.sum(wts[:, None] * accs1, axis=0) / denom
                vals1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32) + row1[None, :]
                tl.store(o_base + cols1[None, :] * sod, vals1.to(out_ptr.dtype.element_ty), mask=mask1)
    if (mode != K_SKIP) & (mode != K_COPY) & (broadcast == 0):
        q_rows = q_ptr + b64 * sqb + h64 * sqh + om[:, None] * sqn
        q_sd = sqd
        if HAS_BLUR:
            if (mode == K_BLUR) & image_tile:
                # SEG: this item's image queries come from the blurred copy
                q_rows = qb_ptr + slot.to(tl.int64) * sbs + h64 * sbh + (om - img0)[:, None] * sbn
                q_sd = 1
        q0 = tl.load(q_rows + cols0[None, :] * q_sd, mask=mask0, other=0.0)
        q1 = q0
        if D1 > 0:
            q1 = tl.load(q_rows + cols1[None, :] * q_sd, mask=mask1, other=0.0)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 16], dtype=tl.float32)
        lo = row0 * 0
        hi = lo + Nk
        if HAS_JOINT:
            if (mode == K_JOINT) & image_tile:
                # joint PAG, image rows: the own key (self-attention: key index = query index) enters
                # the softmax first, then only the text keys are visited
                k_rows = k_base + om[:, None] * skn
                v_rows = v_base + om[:, None] * svn
                k_own = tl.load(k_rows + cols0[None, :] * skd, mask=mask0, other=0.0)
                m_i = tl.sum(q0.to(tl.float32) * k_own.to(tl.float32), axis=1)
                acc0 = tl.load(v_rows + cols0[None, :] * svd, mask=mask0, other=0.0).to(tl.float32)
                if D1 > 0:
                    k_own1 = tl.load(k_rows + cols1[None, :] * skd, mask=mask1, other=0.0)
                    m_i += tl.sum(q1.to(tl.float32) * k_own1.to(tl.float32), axis=1)
                    acc1 = tl.load(v_rows + cols1[None, :] * svd, mask=mask1, other=0.0).to(tl.float32)
                m_i = m_i * qk_scale
                l_i = l_i + 1.0
                lo = lo + text0
                hi = lo + n_text
        acc0, acc1, l_i, m_i = _attend(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, kd0, kd1, vd0, vd1, b, h, skn,
                                       skd, svn, svd, lo, hi, qk_scale, HEAD_DIM, D0, D1, BLOCK_N, IEEE, OFF64, TMA,
                                       STAGES)
        tl.store(o_base + cols0[None, :] * sod, (acc0 / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=mask0)
        if D1 > 0:
            tl.store(o_base + cols1[None, :] * sod, (acc1 / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=mask1)


@triton.jit
def _mean_row_kernel(part_ptr, psum_ptr, k_ptr, v_ptr, items_ptr, heads, Nk, n_img, n_sum, chunk, chunk_tiles, n_part,
                     qk_scale, skb, skh, skn, skd, svb, svh, svn, svd,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SUM_P: tl.constexpr):
    """Online-softmax state of the mean query of one (σ = ∞ item, head) over one split of the keys."""
    pid = tl.program_id(0)
    split = pid % n_part
    g = pid // n_part  # slot * heads + head
    slot = g // heads
    h = g % heads
    b = tl.load(items_ptr + slot)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_s = tl.arange(0, SUM_P)
    sums = tl.load(psum_ptr + (g.to(tl.int64) * n_sum + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                   mask=(offs_s < n_sum)[:, None] & d_ok[None, :], other=0.0)
    q_mean = tl.sum(sums, axis=0) / n_img
    k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    lo = split * chunk
    hi = tl.minimum(lo + chunk, Nk)
    m_i = tl.max(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0) - float("inf")
    l_i = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    # Every split starts with at least one valid key (n_part = cdiv(Nk, chunk)), so m_i is finite
    # after the first tile and fully masked later tiles leave the state unchanged.
    for t in range(0, chunk_tiles):
        offs_n = lo + t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        on = offs_n.to(tl.int64)
        mask = n_ok[:, None] & d_ok[None, :]
        kt = tl.load(k_base + on[:, None] * skn + offs_d[None, :] * skd, mask=mask, other=0.0).to(tl.float32)
        logit = tl.sum(kt * q_mean[None, :], axis=1) * qk_scale
        logit = tl.where(n_ok, logit, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logit, axis=0))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(logit - m_new)
        vt = tl.load(v_base + on[:, None] * svn + offs_d[None, :] * svd, mask=mask, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
        m_i = m_new
    row = part_ptr + (g.to(tl.int64) * n_part + split) * (BLOCK_D + 2)
    tl.store(row, m_i)
    tl.store(row + 1, l_i)
    tl.store(row + 2 + offs_d, acc)


# --------------------------------------------------------------------------- launchers


def _needs_int64(*tensors) -> bool:
    """Whether an offset inside one (item, head) slice of any tensor can reach 2**31."""
    span = 0
    for t in tensors:
        if t is not None and t.numel():
            span = max(span, sum((n - 1) * abs(s) for n, s in zip(t.shape[2:], t.stride()[2:])))
    return span >= 2**31 - 1


def _blurred_queries(a: GuidedAttentionArgs, q_img: torch.Tensor):
    """Blurred image queries of the blur items: (n_blur, heads, H·W, d) and each item's slot."""
    b, heads, n_img, d = q_img.shape
    configs: dict[tuple[int, float], list[int]] = {}
    for i, mode in enumerate(a.modes):
        if mode == Mode.BLUR:
            configs.setdefault((a.kernel_sizes[i], a.sigmas[i]), []).append(i)
    slots = {}
    total = sum(len(items) for items in configs.values())
    qb = torch.empty((total, heads, n_img, d), dtype=q_img.dtype, device=q_img.device)
    sb, sh, sn, sd = q_img.stride()
    geo = Geometry(heads, d, a.grid_h, a.grid_w, (sb, sh, sd, a.grid_w * sn, sn))
    out_geo = Geometry(heads, d, a.grid_h, a.grid_w,
                       (qb.stride(0), qb.stride(1), 1, a.grid_w * qb.stride(2), qb.stride(2)))
    start = 0
    for (size, sigma), items in configs.items():
        for j, i in enumerate(items):
            slots[i] = start + j
        blur_into(qb[start:], out_geo, q_img, geo, size, sigma, index_tensor(tuple(items), q_img.device), len(items))
        start += len(items)
    return qb, slots


def _mean_rows(q_img, k, v, modes, qk_scale, block_d):
    """Split online-softmax states (n_mean·heads, n_part, 2 + block_d) of the σ = ∞ items' mean
    query rows, and each item's slot."""
    b, heads, n_img, d = q_img.shape
    items = [i for i, mode in enumerate(modes) if mode == Mode.MEAN]
    slots = {i: j for j, i in enumerate(items)}
    index = index_tensor(tuple(items), q_img.device)
    sb, sh, sn, sd = q_img.stride()
    target = _layout.target_programs(q_img.device)
    psum, n_sum = spatial_sums(q_img, Geometry(heads, d, 1, n_img, (sb, sh, sd, 0, sn)), index, len(items), target)
    nk = k.shape[2]
    block_n = max(16, ROW_TILE // block_d)
    n_part, chunk = _layout.partitions(len(items) * heads, nk, block_n, target, max_partitions=MAX_SPLITS)
    part = torch.empty((len(items) * heads, n_part, block_d + 2), dtype=torch.float32, device=q_img.device)
    with device_guard(q_img):
        _mean_row_kernel[(len(items) * heads * n_part,)](
            part, psum, k, v, index, heads, nk, n_img, n_sum, chunk, chunk // block_n, n_part, qk_scale,
            *k.stride(), *v.stride(), HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=block_n,
            SUM_P=triton.next_power_of_2(n_sum), num_warps=4)
    return part, n_part, slots


def _check_addressable(a: GuidedAttentionArgs) -> None:
    """The public function guarantees these; the raw op must not read out of bounds either."""
    nq, nk = a.q.shape[2], a.k.shape[2]
    if any(m != Mode.NONE for m in a.modes) and nk != nq:
        raise ValueError("guided_attention: k: identity / blur items need self-attention (Nk == Nq)")
    if any(m in (Mode.BLUR, Mode.MEAN) for m in a.modes) and a.grid_h * a.grid_w != nq - a.text_tokens:
        raise ValueError(f"guided_attention: grid: {(a.grid_h, a.grid_w)} does not cover the "
                         f"{nq - a.text_tokens} image tokens")


def _prepare(a: GuidedAttentionArgs):
    """The pre-passes: blurred queries of the blur items and the mean-row states of the σ = ∞ items.
    Returns (per-item slot, blurred buffer or None, split states or None, number of splits)."""
    q_img = a.q[:, :, a.image_rows]
    slots = [0] * a.q.shape[0]
    qb = part = None
    n_part = 1
    if Mode.BLUR in a.modes:
        qb, blur_slots = _blurred_queries(a, q_img)
        for i, s in blur_slots.items():
            slots[i] = s
    if Mode.MEAN in a.modes:
        part, n_part, mean_slots = _mean_rows(q_img, a.k, a.v, a.modes, float(a.scale) * LOG2E,
                                              padded_dim(a.q.shape[3]))
        for i, s in mean_slots.items():
            slots[i] = s
    return slots, qb, part, n_part


def _descriptors(t: torch.Tensor, block_n: int, d0: int, d1: int):
    """Host tensor descriptors (TMA) of the ``(B, heads, N, d)`` view ``t`` for its two column
    blocks, or None where the copy engine cannot address it (base and every stride but the last
    16-byte aligned, the last stride 1)."""
    if t.stride(3) != 1 or t.data_ptr() % 16:
        return None
    size = t.element_size()
    if any(s * size % 16 for s in t.stride()[:3]):
        return None
    shape, strides = list(t.shape), list(t.stride())
    return (TensorDescriptor(t, shape, strides, [1, 1, block_n, d0]),
            TensorDescriptor(t, shape, strides, [1, 1, block_n, d1]) if d1 else None)


def use_tma(device: torch.device) -> bool:
    """TMA descriptors: Hopper and later (sm_90+), never in the interpreter."""
    return (TensorDescriptor is not None and device.type == "cuda" and not triton_interpreter()
            and torch.cuda.get_device_capability(device)[0] >= 9)


def vector_align(*tensors) -> int:
    """The largest power of two ≤ 16 bytes / element dividing every stride but the feature one of
    every (B, heads, N, d) tensor: the unit :func:`_launch` passes those strides in (1 when a stride
    needs 64 bits: a scaled stride would be an int32 argument whose product overflows)."""
    align = 16 // tensors[0].element_size()
    for t in tensors:
        if t is not None:
            for stride in t.stride()[:3]:
                if stride >= 2**31:
                    return 1
                while align > 1 and stride % align:
                    align //= 2
    return align


def _launch(a: GuidedAttentionArgs, out, codes, slots, qb, part, n_part, config, tma: bool | None = None) -> None:
    """ONE launch of ``_attention_kernel`` over (query tile, item, head) for every item not SKIP;
    K and V through TMA descriptors where :func:`use_tma` (``tma`` forces it either way)."""
    q, k, v = a.q, a.k, a.v
    batch, heads, nq, d = q.shape
    block_m, block_n, num_warps, num_stages = config
    d0, d1 = head_split(d)
    n_img = nq - a.text_tokens
    img0 = a.image_rows.start
    text0 = a.text_rows.start
    info = index_tensor(tuple(int(x) for pair in zip(codes, slots) for x in pair), q.device)
    tiles_img = triton.cdiv(n_img, block_m)
    tiles_m = tiles_img + triton.cdiv(a.text_tokens, block_m)
    descs = None
    if use_tma(q.device) if tma is None else tma:
        kd, vd = _descriptors(k, block_n, d0, d1), _descriptors(v, block_n, d0, d1)
        descs = (*kd, *vd) if kd is not None and vd is not None else None
    kd0, kd1, vd0, vd1 = descs if descs is not None else (k, k, v, v)
    align = vector_align(q, k, v, out, qb)

    def strides(t):  # item, head and token strides in units of ALIGN elements, the feature stride as is
        s = t.stride()
        return s[0] // align, s[1] // align, s[2] // align, s[3]

    dummy = out
    with device_guard(q):
        _attention_kernel[(tiles_m * batch * heads,)](
            out, q, k, v, qb if qb is not None else dummy, part if part is not None else dummy, info,
            kd0, kd1 if kd1 is not None else kd0, vd0, vd1 if vd1 is not None else vd0,
            float(a.scale) * LOG2E, heads, k.shape[2], img0, n_img, text0, a.text_tokens, n_part, tiles_img, tiles_m,
            *strides(q), *strides(k), *strides(v), *strides(out), *(strides(qb)[:3] if qb is not None else (0, 0, 0)),
            HEAD_DIM=d, D0=d0, D1=d1, BLOCK_M=block_m, BLOCK_N=block_n, PART_D=padded_dim(d),
            PART_P=triton.next_power_of_2(n_part), HAS_COPY=Work.COPY in codes, HAS_BLUR=Work.BLUR in codes,
            HAS_MEAN=Work.MEAN in codes, HAS_JOINT=Work.JOINT in codes, IEEE=q.dtype == torch.float32,
            OFF64=_needs_int64(q, k, v, out, qb), TMA=descs is not None, ALIGN=align, STAGES=num_stages,
            num_warps=num_warps)


def _tuning_key(a: GuidedAttentionArgs, codes) -> tuple:
    batch, heads, nq, d = a.q.shape
    return ("guided_attention", a.q.device.index, a.q.dtype, d, tuple(sorted({int(c) for c in codes})),
            triton.next_power_of_2(a.k.shape[2]), triton.next_power_of_2(triton.cdiv(nq, 128) * batch * heads))


def _run(a: GuidedAttentionArgs, out, codes, slots, qb, part, n_part) -> None:
    configs = attention_configs(a.q.shape[3], a.q.dtype, capability(a.q))
    config = tuned(_tuning_key(a, codes), configs, a.q,
                   lambda c: _launch(a, out, codes, slots, qb, part, n_part, c))
    _launch(a, out, codes, slots, qb, part, n_part, config)


def guided_attention(a: GuidedAttentionArgs):
    """The ``"triton"`` backend: every item in our kernels."""
    out = attention_out(a.q, a.layout)
    if out.numel() == 0:
        return out
    _check_addressable(a)
    codes = work_codes(a.modes, a.text_tokens)
    if all(c == Work.COPY for c in codes):
        return out.copy_(a.v)  # PAG items only: one bit-exact copy, at copy bandwidth
    slots, qb, part, n_part = _prepare(a)
    _run(a, out, codes, slots, qb, part, n_part)
    return out


def guided_attention_sdpa(a: GuidedAttentionArgs):
    """The ``"triton_sdpa"`` backend: torch SDPA for the none / blur items (blurred by our pre-pass),
    our kernel for the identity and σ = ∞ items."""
    out = attention_out(a.q, a.layout)
    if out.numel() == 0:
        return out
    _check_addressable(a)
    codes = work_codes(a.modes, a.text_tokens)
    if all(c == Work.COPY for c in codes):
        return out.copy_(a.v)
    slots, qb, part, n_part = _prepare(a)
    attended = [i for i, c in enumerate(codes) if c in (Work.FULL, Work.BLUR)]
    if attended:
        q_att = take_items(a.q, attended)
        if qb is not None:
            q_att = q_att.clone()
            for j, i in enumerate(attended):
                if codes[i] == Work.BLUR:
                    q_att[j, :, a.image_rows].copy_(qb[slots[i]])
        result = sdpa(q_att, take_items(a.k, attended), take_items(a.v, attended), a.scale)
        put_items(out, attended, slice(None), result)
        for i in attended:
            codes[i] = Work.SKIP
    if any(c != Work.SKIP for c in codes):
        _run(a, out, codes, slots, qb, part, n_part)
    return out
