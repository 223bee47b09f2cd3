"""PyTorch backend of attention_key_mass: the attention output and the per-key mass
``mass[i, j] = mean_heads Σ_queries softmax(scale·q kᵀ)[·, j]`` for batch item ``items[i]``,
chunked over queries so that no more than ``_common.CHUNK_ELEMENTS`` scores are alive at once
(never the ``(heads, N, M)`` map): for each chunk of query rows, scores → exact row softmax →
``P·V`` rows of the output and the chunk's column sums of ``P``.

fp32 arithmetic (fp64 for fp64 inputs) on any device; ``out`` is contiguous in the layout and
dtype of ``q``, ``mass`` is float32 ``(len(items) or B, M)``.
"""

from __future__ import annotations

import torch

from .._library import AttentionKeyMassArgs
from .._spec import heads_view
from ._common import compute_dtype, query_chunks, softmax_rows_


def attention_key_mass(a: AttentionKeyMassArgs):
    q, k, v, heads, layout, scale, items = a
    out = q.new_empty(q.shape)
    q4, k4, v4, o4 = (heads_view(t, heads, layout) for t in (q, k, v, out))
    batch = q4.shape[0]
    n_k = k4.shape[2]
    dtype = compute_dtype(q)
    wanted = list(range(batch)) if items is None else list(items)
    mass = torch.zeros((len(wanted), n_k), dtype=torch.float32, device=q.device)
    for b in range(batch):
        slots = [i for i, item in enumerate(wanted) if item == b]
        # (heads, M, d) blocks contiguous: a "bnd" head view is strided, and torch's batched matmul
        # on strided batches is two orders of magnitude slower on the CPU
        kb = k4[b].to(dtype).contiguous()
        vb = v4[b].to(dtype).contiguous()
        col = torch.zeros((n_k,), dtype=dtype, device=q.device) if slots else None
        for rows in query_chunks(q4[b], n_k):
            p = softmax_rows_(torch.matmul(q4[b, :, rows].to(dtype).contiguous(), kb.transpose(-1, -2)).mul_(scale))
            o4[b, :, rows] = torch.matmul(p, vb)
            if col is not None:
                col += p.sum(dim=(0, 1))
            del p
        if col is not None:
            col = (col / heads).to(torch.float32)
            for slot in slots:
                mass[slot] = col
    return out, mass
