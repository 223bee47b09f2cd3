"""CUDA backend of the combine family: guidance_combine, apg_combine, cfg_zero_star_combine.

Same signatures and the same planning as :mod:`guidance_kernels.triton.guidance_combine`: the
branches are viewed without copies (``split_branches``), the output is allocated by
``_layout.output_like``, ``_layout.plan`` gives the (batch, inner) geometry and
``_layout.partitions`` the per-sample chunks of the reduction passes. The launcher
(``csrc/guidance_combine.cu``) checks the plan against every tensor, picks the vectorised or the
strided path, allocates the small per-chunk statistics and enqueues one launch (plain combine) or
two (rescale, APG, CFG-Zero*) on the current stream — no host synchronisation, CUDA-graph
capturable.

At SDXL latent sizes a call is dominated by launch overhead, so this path stays minimal: no
device guards or allocations here beyond the output, no extra kernels.
"""

from __future__ import annotations

from .. import _extension, _layout
from .._checks import split_branches

APG = 1
CFG_ZERO_STAR = 2
FORMULATIONS = {"paper": 0, "diffusers": 1, "diffusers_original": 2}


def _ext():
    module = _extension.load()
    if module is None:  # backends.select never picks "cuda" then; a direct call says why
        raise RuntimeError(f"guidance_kernels cuda backend: {_extension.unavailable_reason()}")
    return module


def _geometry(plan: _layout.Plan) -> list[int]:
    return [plan.batch, plan.inner, *plan.sizes, *plan.strides, plan.batch_stride, plan.rank]


def _chunks(ext, plan: _layout.Plan, device, reduce: bool) -> tuple[int, int]:
    """(parts, chunk): one tile per block for the plain combine; for the two-pass reductions about
    four blocks per SM (``_layout.target_programs``), whose statistics rows pass 2 merges."""
    tile = ext.GUIDANCE_COMBINE_TILE
    if not reduce:
        return -(-plan.inner // tile), tile
    return _layout.partitions(plan.batch, plan.inner, tile, _layout.target_programs(device))


def guidance_combine(preds, num_branches, base, pos, neg, scales, scale_tensors, rescale, rescale_tensor,
                     rescale_ref):
    ext = _ext()
    branches = split_branches(preds, num_branches)
    do_rescale = rescale_tensor is not None or rescale > 0
    used = sorted({base, *pos, *neg, *([rescale_ref] if do_rescale else [])})
    slot = {k: i for i, k in enumerate(used)}
    out = _layout.output_like(branches[0])
    if out.numel() == 0:
        return out
    plan = _layout.plan([branches[k] for k in used], out)
    parts, chunk = _chunks(ext, plan, out.device, do_rescale)
    ext.guidance_combine(out, list(plan.tensors), slot[base], [slot[p] for p in pos], [slot[n] for n in neg],
                         [float(s) for s in scales], list(scale_tensors), do_rescale,
                         slot[rescale_ref] if do_rescale else 0, float(rescale), rescale_tensor, _geometry(plan),
                         parts, chunk)
    return out


def _projected(kind, preds, num_branches, cond, uncond, scale, scale_tensor, *, eta=1.0, threshold=0.0,
               momentum=0.0, buf=None, formulation=0, rescale=0.0, rescale_tensor=None):
    ext = _ext()
    branches = split_branches(preds, num_branches)
    out = _layout.output_like(branches[0])
    if out.numel() == 0:
        return out
    plan = _layout.plan([branches[cond], branches[uncond]], out)
    parts, chunk = _chunks(ext, plan, out.device, True)
    do_rescale = rescale_tensor is not None or rescale > 0
    ext.projected_combine(out, plan.tensors[0], plan.tensors[1], buf, kind, formulation, float(scale), scale_tensor,
                          float(eta), float(threshold), float(momentum), do_rescale, float(rescale), rescale_tensor,
                          _geometry(plan), parts, chunk)
    return out


def apg_combine(preds, num_branches, cond, uncond, scale, scale_tensor, eta, norm_threshold, momentum,
                momentum_buffer, formulation, rescale, rescale_tensor):
    return _projected(APG, preds, num_branches, cond, uncond, scale, scale_tensor, eta=eta, threshold=norm_threshold,
                      momentum=momentum, buf=momentum_buffer, formulation=FORMULATIONS[formulation],
                      rescale=rescale, rescale_tensor=rescale_tensor)


def cfg_zero_star_combine(preds, num_branches, cond, uncond, scale, scale_tensor, original_formulation, rescale,
                          rescale_tensor):
    return _projected(CFG_ZERO_STAR, preds, num_branches, cond, uncond, scale, scale_tensor,
                      formulation=1 if original_formulation else 0, rescale=rescale, rescale_tensor=rescale_tensor)
