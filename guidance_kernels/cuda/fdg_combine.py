"""CUDA backend of fdg_combine: the planning of :mod:`guidance_kernels.triton.fdg_combine` (level
sizes from ``_spec.fdg_level_sizes``, pyrup weights from ``_spec.pyrup_table`` as cached device
constants, per-level statistics chunks from ``_layout.partitions``) handed to the launcher
(``csrc/fdg_combine.cu``), which checks it against every tensor, allocates the small level
buffers and enqueues the launches on the current stream (a data-space rescale included: fp32
moments of (cond, out), then the final pass rescales)."""

from __future__ import annotations

import torch

from .. import _layout, _spec
from .._layout import split_branches
from .._library import FdgCombineArgs
from ._common import ext


def fdg_combine(a: FdgCombineArgs):
    module = ext()
    branches = split_branches(a.preds, a.num_branches)
    out = _layout.output_like(branches[0])
    if out.numel() == 0:
        return out
    c4, u4 = _layout.image_view(branches[a.cond]), _layout.image_view(branches[a.uncond])
    try:
        target, o4 = out, out.view(c4.shape)
    except RuntimeError:  # channel dims that do not merge in the output's layout: compute, copy back
        target = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        o4 = target.view(c4.shape)
    batch, channels, height, width = c4.shape
    sizes = _spec.fdg_level_sizes(height, width, a.levels)
    tables = []
    for h, w in sizes[1:]:
        tables += [_layout.device_constant(_spec.pyrup_table(n), out.device, torch.float32) for n in (h, w)]
    need = a.needs_stats
    parts, chunks = [], []
    for i, (h, w) in enumerate(sizes):
        p, chunk = (_layout.partitions(batch, channels * h * w, module.FDG_COMBINE_TILE,
                                       _layout.target_programs(out.device)) if need[i] else (1, 0))
        parts.append(p)
        chunks.append(chunk)
    phis = a.level_rescale
    data_phi, data_phi_tensor, final_parts, final_chunk = 0.0, None, 1, module.FDG_COMBINE_TILE
    if a.data_rescaling:
        data_phi, data_phi_tensor = float(a.rescale[0]), a.rescale_tensors[0]
        final_parts, final_chunk = _layout.partitions(batch, channels * height * width, module.FDG_COMBINE_TILE,
                                                      _layout.target_programs(out.device))
    module.fdg_combine(o4, c4, u4, [n for size in sizes for n in size], tables, [float(s) for s in a.scales],
                       list(a.scale_tensors), [float(w) for w in a.parallel_weights], [float(p) for p, _ in phis],
                       [t for _, t in phis], [int(w != 1.0) for w in a.parallel_weights],
                       [int(_spec.rescale_on(*phi)) for phi in phis], a.original_formulation, parts, chunks,
                       data_phi, data_phi_tensor, final_parts, final_chunk)
    if target is not out:
        out.copy_(target)
    return out
