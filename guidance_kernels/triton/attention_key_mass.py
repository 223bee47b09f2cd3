"""Triton kernels of attention_key_mass: flash attention that also returns, per sample and key,
``mass[i, j] = mean_heads Σ_queries softmax(scale·q kᵀ)[·, j]`` without the (heads, N, M) map.

Three launches, no host sync, extra memory O(B·heads·(N + M)) floats:

1. ``_forward_kernel`` — grid (query tiles, B·heads): FlashAttention-2 forward. Scores in the
   log2 domain (``scale·log2 e`` folded into one multiply), online softmax over key tiles, fp32
   accumulator; writes the output and the per-row log-sum-exp ``lse`` (log2 units, fp32,
   (B·heads, N)).
2. ``_colsum_kernel`` — grid (key tiles, items·heads): for one key tile of one head of one wanted
   item, loops over every query tile, recomputes the score tile exactly as pass 1 did, and sums
   ``exp2(s − lse)`` — the exact probabilities — down the query axis. Writes its column sums to
   ``partial`` (items, heads, M) fp32: one program owns each value (no atomics, deterministic).
3. ``_head_mean_kernel`` — grid (key blocks, items): ``mass = Σ_h partial / heads``.

The mass only needs pass 2 for the wanted items (SAG: the uncond half), so the extra work is one
QKᵀ + exp per wanted item on top of the plain attention. Head dims up to 256 (padded to a power
of two ≥ 16 and masked); fp16/bf16 use tensor-core dots with fp32 accumulation, fp32 inputs use
``input_precision="ieee"`` (no TF32: the mass is thresholded at 1.0 and fp32 users want fp32).
All offsets are int64; every load/store is masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._library import AttentionKeyMassArgs
from .._spec import heads_view
from ._common import LOG2E, device_guard
MASS_BLOCK = 256


def config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes per padded head dim: spill-free on sm_80/sm_90 and within the 99 KiB of shared
    memory of sm_86/sm_89 (tests/aot_attention_key_mass.py, tests/test_compile_lanes.py)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:  # FMA dots (no tensor cores): smaller tiles
        if block_d <= 64:
            cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1)
        elif block_d <= 128:
            cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
        else:  # one stage: two would need 100 KiB of shared memory (sm_86/sm_89 allow 99 KiB)
            cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1)
    elif block_d <= 128:
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    cfg["BLOCK_D"] = block_d
    return cfg


@triton.jit
def _forward_kernel(out_ptr, lse_ptr, q_ptr, k_ptr, v_ptr, qk_scale, n_q, n_k, heads, key_tiles,
                    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n_q
    dim_ok = dims < HEAD_DIM
    rows64 = rows.to(tl.int64)
    dims64 = dims.to(tl.int64)
    q = tl.load(q_ptr + b * sqb + h * sqh + rows64[:, None] * sqn + dims64[None, :] * sqd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for t in range(0, key_tiles):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_k
        cols64 = cols.to(tl.int64)
        kt = tl.load(k_base + cols64[None, :] * skn + dims64[:, None] * skd,
                     mask=col_ok[None, :] & dim_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        correction = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * correction + tl.sum(p, axis=1)
        v = tl.load(v_base + cols64[:, None] * svn + dims64[None, :] * svd,
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(lse_ptr + bh.to(tl.int64) * n_q + rows64, m_i + tl.log2(l_i), mask=row_ok)
    tl.store(out_ptr + b * sob + h * soh + rows64[:, None] * son + dims64[None, :] * sod,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _colsum_kernel(partial_ptr, lse_ptr, q_ptr, k_ptr, items_ptr, item_start, item_step, qk_scale,
                   n_q, n_k, heads, query_tiles, sqb, sqh, sqn, sqd, skb, skh, skn, skd,
                   INDEXED: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    ih = tl.program_id(1)
    slot = ih // heads
    h = (ih % heads).to(tl.int64)
    if INDEXED:
        b = tl.load(items_ptr + slot).to(tl.int64)
    else:
        b = (item_start + slot * item_step).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < n_k
    dim_ok = dims < HEAD_DIM
    cols64 = cols.to(tl.int64)
    dims64 = dims.to(tl.int64)
    kt = tl.load(k_ptr + b * skb + h * skh + cols64[None, :] * skn + dims64[:, None] * skd,
                 mask=col_ok[None, :] & dim_ok[:, None], other=0.0)
    q_base = q_ptr + b * sqb + h * sqh
    lse_base = lse_ptr + (b * heads + h) * n_q
    colsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t in range(0, query_tiles):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_q
        rows64 = rows.to(tl.int64)
        q = tl.load(q_base + rows64[:, None] * sqn + dims64[None, :] * sqd,
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        lse = tl.load(lse_base + rows64, mask=row_ok, other=float("inf"))
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        # rows past the end add nothing (their zero queries meet an inf key as 0·inf = NaN)
        colsum += tl.sum(tl.where(row_ok[:, None], tl.exp2(s - lse[:, None]), 0.0), axis=0)
    tl.store(partial_ptr + ih.to(tl.int64) * n_k + cols64, colsum, mask=col_ok)


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
    cfg = config(head_dim, q.dtype)
    meta = dict(HEAD_DIM=head_dim, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    qk_scale = float(scale) * LOG2E
    lse = torch.empty((batch * heads, n_q), dtype=torch.float32, device=q.device)
    partial = torch.empty((len(wanted), heads, n_k), dtype=torch.float32, device=q.device)
    progression = _progression(wanted) if wanted else (0, 0)
    index = None
    if progression is None:
        index = torch.tensor(wanted, dtype=torch.int32).to(q.device)
    start, step = progression if progression is not None else (0, 0)
    with device_guard(out):
        _forward_kernel[(triton.cdiv(n_q, cfg["BLOCK_M"]), batch * heads)](
            o4, lse, q4, k4, v4, qk_scale, n_q, n_k, heads, triton.cdiv(n_k, cfg["BLOCK_N"]),
            *q4.stride(), *k4.stride(), *v4.stride(), *o4.stride(), **meta)
        if wanted:
            _colsum_kernel[(triton.cdiv(n_k, cfg["BLOCK_N"]), len(wanted) * heads)](
                partial, lse, q4, k4, index if index is not None else lse, start, step, qk_scale,
                n_q, n_k, heads, triton.cdiv(n_q, cfg["BLOCK_M"]), *q4.stride(), *k4.stride(),
                INDEXED=index is not None, **meta)
            _head_mean_kernel[(triton.cdiv(n_k, MASS_BLOCK), len(wanted))](
                mass, partial, n_k, heads, 1.0 / heads, BLOCK=MASS_BLOCK, num_warps=4)
    return out, mass
