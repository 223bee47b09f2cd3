"""Triton kernels of attention_key_mass: flash attention that also returns, per sample and key,
``mass[i, j] = mean_heads Σ_queries softmax(scale·q kᵀ)[·, j]`` without the (heads, N, M) map.

Three launches, no host sync, extra memory O(B·heads·(N + M)) floats:

1. ``_forward_kernel`` — grid (query tiles, B·heads): guided_attention's flash attention
   (``guided_attention._attend``: log2-domain online softmax, fp32 accumulators, the head dim in
   two power-of-two column blocks, K/V through TMA descriptors on sm_90); writes the output and
   the per-row log-sum-exp ``lse`` (log2 units, fp32, (B·heads, N)).
2. ``_colsum_kernel`` — grid (key tiles, items·heads): one key tile of one head of one wanted
   item stays put while the program walks every query tile, recomputes the score tile exactly as
   pass 1 did and adds ``exp2(s − lse)`` — the exact probabilities — elementwise into a
   (queries, keys) fp32 register accumulator; the sum down the query axis is one reduction after
   the loop (no cross-warp reduction per trip). Writes its column sums to
   ``partial`` (items, heads, M) fp32: one program owns each value (no atomics, deterministic).
3. ``_head_mean_kernel`` — grid (key blocks, items): ``mass = Σ_h partial / heads``.

The mass only needs pass 2 for the wanted items (SAG: the uncond half), so the extra work is one
QKᵀ + exp per wanted item on top of the plain attention. Head dims up to 256; fp16/bf16 use
tensor-core dots with fp32 accumulation, fp32 inputs use ``input_precision="ieee"`` (no TF32:
the mass is thresholded at 1.0 and fp32 users want fp32). Item and head offsets are int64, every
load/store is masked or in bounds; tiles per head dim: :func:`configs` (the fastest timed once
per shape class on a GPU, ``guided_attention.tuned``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._library import AttentionKeyMassArgs
from .._spec import heads_view
from . import guided_attention as GA
from ._common import LOG2E, capability, device_guard

MASS_BLOCK = 256

def configs(head_dim: int, dtype: torch.dtype, arch: tuple[int, int] = (9, 0)) -> tuple:
    """(BLOCK_M queries, BLOCK_N keys, num_warps, num_stages) candidates of both passes, default
    first: guided_attention's table (the forward is its plain flash attention), and fp32 head dims
    above 128 — served here, unlike guided_attention's CUDA route — in 16×16 tiles, one stage. Both
    passes tile alike by default, so that pass 2's score tiles are pass 1's bit for bit wherever
    the dot's rounding could depend on the tile shape (the interpreter's numpy products); on a GPU
    each pass is timed on its own (the MMA's summation order does not depend on the tile)."""
    if dtype == torch.float32 and sum(GA.head_split(head_dim)) > 128:
        return ((16, 16, 8, 1),)
    return GA.attention_configs(head_dim, dtype, arch)


@triton.jit
def _forward_kernel(out_ptr, lse_ptr, q_ptr, k_ptr, v_ptr, kd0, kd1, vd0, vd1, qk_scale, n_q, n_k, heads,
                    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, IEEE: tl.constexpr, OFF64: tl.constexpr, TMA: tl.constexpr,
                    ALIGN: tl.constexpr, STAGES: tl.constexpr):
    # strides but the feature ones come in units of ALIGN elements (guided_attention._launch)
    sqb, sqh, sqn = sqb * ALIGN, sqh * ALIGN, sqn * ALIGN
    skb, skh, skn = skb * ALIGN, skh * ALIGN, skn * ALIGN
    svb, svh, svn = svb * ALIGN, svh * ALIGN, svn * ALIGN
    sob, soh, son = sob * ALIGN, soh * ALIGN, son * ALIGN
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    om = GA._offsets(rows, OFF64)
    row_ok = rows < n_q
    cols0 = tl.arange(0, D0)
    cols1 = D0 + tl.arange(0, D1 if D1 > 0 else 16)
    mask0 = row_ok[:, None] & (cols0 < HEAD_DIM)[None, :]
    mask1 = row_ok[:, None] & (cols1 < HEAD_DIM)[None, :]
    q_rows = q_ptr + b64 * sqb + h64 * sqh + om[:, None] * sqn
    q0 = tl.load(q_rows + cols0[None, :] * sqd, mask=mask0, other=0.0)
    q1 = q0
    if D1 > 0:
        q1 = tl.load(q_rows + cols1[None, :] * sqd, mask=mask1, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 16], dtype=tl.float32)
    acc0, acc1, l_i, m_i = GA._attend(acc0, acc1, l_i, m_i, q0, q1, k_ptr + b64 * skb + h64 * skh,
                                      v_ptr + b64 * svb + h64 * svh, kd0, kd1, vd0, vd1, b, h, skn, skd, svn, svd,
                                      pid_m * 0, n_k, qk_scale, HEAD_DIM, D0, D1, BLOCK_N, IEEE, OFF64, TMA, STAGES)
    tl.store(lse_ptr + bh.to(tl.int64) * n_q + rows, m_i + tl.log2(l_i), mask=row_ok)
    o_rows = out_ptr + b64 * sob + h64 * soh + om[:, None] * son
    tl.store(o_rows + cols0[None, :] * sod, (acc0 / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=mask0)
    if D1 > 0:
        tl.store(o_rows + cols1[None, :] * sod, (acc1 / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=mask1)


@triton.jit
def _colsum_tile(acc, kt0, kt1, q_base, lse_base, start, n_q, qk_scale, sqn, sqd, HEAD_DIM: tl.constexpr,
                 D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr, MASK_M: tl.constexpr,
                 IEEE: tl.constexpr):
    """acc[query, key] += exp2(scale·q·k − lse[query]) for one query tile. The score tile is the
    forward's (same dots, same column blocks, same order), so the probabilities are the ones the
    forward normalised; the sum over queries is taken once, after the loop."""
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < n_q
    q_rows = q_base + rows.to(tl.int64)[:, None] * sqn
    c0 = tl.arange(0, D0)
    q0 = GA._load(q_rows + c0[None, :] * sqd, (c0 < HEAD_DIM)[None, :], row_ok[:, None], D0 > HEAD_DIM, MASK_M)
    s = GA._dot(q0, kt0, None, IEEE)
    if D1 > 0:
        c1 = D0 + tl.arange(0, D1)
        q1 = GA._load(q_rows + c1[None, :] * sqd, (c1 < HEAD_DIM)[None, :], row_ok[:, None], D0 + D1 > HEAD_DIM,
                      MASK_M)
        s = GA._dot(q1, kt1, s, IEEE)
    s = s * qk_scale
    if MASK_M:
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        # rows past the end add nothing (their zero queries meet an inf key as 0·inf = NaN)
        acc += tl.where(row_ok[:, None], tl.exp2(s - lse[:, None]), 0.0)
    else:
        acc += tl.exp2(s - tl.load(lse_base + rows)[:, None])
    return acc


@triton.jit
def _colsum_kernel(partial_ptr, lse_ptr, q_ptr, k_ptr, items_ptr, item_start, item_step, qk_scale,
                   n_q, n_k, heads, sqb, sqh, sqn, sqd, skb, skh, skn, skd,
                   INDEXED: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, ALIGN: tl.constexpr,
                   STAGES: tl.constexpr):
    sqb, sqh, sqn = sqb * ALIGN, sqh * ALIGN, sqn * ALIGN
    skb, skh, skn = skb * ALIGN, skh * ALIGN, skn * ALIGN
    pid_n = tl.program_id(0)
    ih = tl.program_id(1)
    slot = ih // heads
    h = (ih % heads).to(tl.int64)
    if INDEXED:
        b = tl.load(items_ptr + slot).to(tl.int64)
    else:
        b = (item_start + slot * item_step).to(tl.int64)
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = (keys < n_k)[None, :]
    k_cols = k_ptr + b * skb + h * skh + keys.to(tl.int64)[None, :] * skn
    c0 = tl.arange(0, D0)
    kt0 = tl.load(k_cols + c0[:, None] * skd, mask=key_ok & (c0 < HEAD_DIM)[:, None], other=0.0)
    kt1 = kt0
    if D1 > 0:
        c1 = D0 + tl.arange(0, D1)
        kt1 = tl.load(k_cols + c1[:, None] * skd, mask=key_ok & (c1 < HEAD_DIM)[:, None], other=0.0)
    q_base = q_ptr + b * sqb + h * sqh
    lse_base = lse_ptr + (b * heads + h) * n_q
    # the key tile stays put; every query tile adds its probabilities elementwise (no reduction,
    # no cross-warp traffic per trip); one column sum at the end
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    full = (n_q // BLOCK_M) * BLOCK_M
    for start in tl.range(0, full, BLOCK_M, num_stages=STAGES):
        acc = _colsum_tile(acc, kt0, kt1, q_base, lse_base, start, n_q, qk_scale, sqn, sqd, HEAD_DIM, D0, D1,
                           BLOCK_M, False, IEEE)
    if full < n_q:
        acc = _colsum_tile(acc, kt0, kt1, q_base, lse_base, full, n_q, qk_scale, sqn, sqd, HEAD_DIM, D0, D1,
                           BLOCK_M, True, IEEE)
    tl.store(partial_ptr + ih.to(tl.int64) * n_k + keys, tl.sum(acc, axis=0), mask=keys < n_k)


@triton.jit
def _head_mean_kernel(mass_ptr, partial_ptr, n_k, heads, inv_heads, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    slot = tl.program_id(1).to(tl.int64)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_k
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for h in range(0, heads):
        total += tl.load(partial_ptr + (slot * heads + h) * n_k + cols, mask=ok, other=0.0)
    tl.store(mass_ptr + slot * n_k + cols, total * inv_heads, mask=ok)


def _progression(items: list[int]) -> tuple[int, int] | None:
    """(start, step) when ``items`` is an arithmetic progression (every range(): no index tensor)."""
    if len(items) == 1:
        return items[0], 0
    step = items[1] - items[0]
    if all(items[i + 1] - items[i] == step for i in range(len(items) - 1)):
        return items[0], step
    return None


def _scaled(t: torch.Tensor, align: int) -> tuple[int, ...]:
    s = t.stride()
    return s[0] // align, s[1] // align, s[2] // align, s[3]


def forward(q4, k4, v4, o4, lse, qk_scale, config, tma: bool | None = None) -> None:
    """Pass 1 (one launch): output and log2-sum-exp per query row."""
    batch, heads, n_q, head_dim = q4.shape
    block_m, block_n, num_warps, num_stages = config
    d0, d1 = GA.head_split(head_dim)
    descs = None
    if GA.use_tma(q4.device) if tma is None else tma:
        kd, vd = GA._descriptors(k4, block_n, d0, d1), GA._descriptors(v4, block_n, d0, d1)
        descs = (*kd, *vd) if kd is not None and vd is not None else None
    kd0, kd1, vd0, vd1 = descs if descs is not None else (k4, k4, v4, v4)
    align = GA.vector_align(q4, k4, v4, o4)
    with device_guard(o4):
        _forward_kernel[(triton.cdiv(n_q, block_m), batch * heads)](
            o4, lse, q4, k4, v4, kd0, kd1 if kd1 is not None else kd0, vd0, vd1 if vd1 is not None else vd0,
            qk_scale, n_q, k4.shape[2], heads, *_scaled(q4, align), *_scaled(k4, align), *_scaled(v4, align),
            *_scaled(o4, align), HEAD_DIM=head_dim, D0=d0, D1=d1, BLOCK_M=block_m, BLOCK_N=block_n,
            IEEE=q4.dtype == torch.float32, OFF64=GA._needs_int64(q4, k4, v4, o4), TMA=descs is not None, ALIGN=align,
            STAGES=num_stages, num_warps=num_warps)


def column_sums(partial, lse, q4, k4, wanted: list[int], qk_scale, config) -> None:
    """Pass 2 (one launch): ``partial[i, h, j] = Σ_queries exp2(scale·q·k_j − lse)`` of the wanted items."""
    heads, n_q, head_dim = q4.shape[1], q4.shape[2], q4.shape[3]
    n_k = k4.shape[2]
    block_m, block_n, num_warps, num_stages = config
    d0, d1 = GA.head_split(head_dim)
    progression = _progression(wanted)
    index = None if progression is not None else torch.tensor(wanted, dtype=torch.int32).to(q4.device)
    start, step = progression if progression is not None else (0, 0)
    align = GA.vector_align(q4, k4)
    with device_guard(q4):
        _colsum_kernel[(triton.cdiv(n_k, block_n), len(wanted) * heads)](
            partial, lse, q4, k4, index if index is not None else lse, start, step, qk_scale, n_q, n_k, heads,
            *_scaled(q4, align), *_scaled(k4, align), INDEXED=index is not None, HEAD_DIM=head_dim, D0=d0, D1=d1,
            BLOCK_M=block_m, BLOCK_N=block_n, IEEE=q4.dtype == torch.float32, ALIGN=align, STAGES=num_stages,
            num_warps=num_warps)


def attention_key_mass(a: AttentionKeyMassArgs):
    q, k, v, heads, layout, scale, items = a
    out = q.new_empty(q.shape)
    q4, k4, v4, o4 = (heads_view(t, heads, layout) for t in (q, k, v, out))
    batch, _, n_q, head_dim = q4.shape
    n_k = k4.shape[2]
    wanted = list(range(batch)) if items is None else list(items)
    mass = torch.empty((len(wanted), n_k), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or n_k == 0:
        return out, mass.zero_()
    qk_scale = float(scale) * LOG2E
    lse = torch.empty((batch * heads, n_q), dtype=torch.float32, device=q.device)
    partial = torch.empty((len(wanted), heads, n_k), dtype=torch.float32, device=q.device)
    shape_class = (q.device.index, q.dtype, head_dim, triton.next_power_of_2(n_k),
                   triton.next_power_of_2(triton.cdiv(n_q, 128) * batch * heads))
    candidates = configs(head_dim, q.dtype, capability(q))
    config = GA.tuned(("key_mass_forward", *shape_class), candidates, q,
                      lambda c: forward(q4, k4, v4, o4, lse, qk_scale, c))
    forward(q4, k4, v4, o4, lse, qk_scale, config)
    if wanted:
        config = GA.tuned(("key_mass_colsum", *shape_class, len(wanted)), candidates, q,
                          lambda c: column_sums(partial, lse, q4, k4, wanted, qk_scale, c))
        column_sums(partial, lse, q4, k4, wanted, qk_scale, config)
        with device_guard(out):
            _head_mean_kernel[(triton.cdiv(n_k, MASS_BLOCK), len(wanted))](
                mass, partial, n_k, heads, 1.0 / heads, BLOCK=MASS_BLOCK, num_warps=4)
    return out, mass
