"""CUDA backend of the combine family: guidance_combine (with rescale, CFG-Norm or Mahiro),
apg_combine, cfg_zero_star_combine, tcfg_combine, mag_combine.

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

from .. import _layout, _spec
from .._layout import split_branches
from .._library import (ApgCombineArgs, CfgNormCombineArgs, CfgZeroStarCombineArgs, GuidanceCombineArgs,
                        MagCombineArgs, MahiroCombineArgs, TcfgCombineArgs)
from ._common import ext, geometry

APG, CFG_ZERO_STAR, TCFG, MAG = 1, 2, 3, 4  # combine::Kind
CFG_NORM, MAHIRO = 1, 2  # combine::ChannelKind


def _chunks(module, plan: _layout.Plan, device, reduce: bool) -> tuple[int, int]:
    """(parts, chunk): one tile per block for the plain combine; for the two-pass reductions about
    four blocks per SM (``_layout.target_programs``), whose statistics rows pass 2 merges."""
    tile = module.GUIDANCE_COMBINE_TILE
    if not reduce:
        return -(-plan.inner // tile), tile
    return _layout.partitions(plan.batch, plan.inner, tile, _layout.target_programs(device))


def guidance_combine(a: GuidanceCombineArgs):
    module = ext()
    base, pos, neg, rescale_ref = a.base, a.pos, a.neg, a.rescale_ref
    branches = split_branches(a.preds, a.num_branches)
    do_rescale = a.rescaling
    used = sorted({base, *pos, *neg, *([rescale_ref] if do_rescale else [])})
    slot = {k: i for i, k in enumerate(used)}
    out = _layout.output_like(branches[0])
    if out.numel() == 0:
        return out
    plan = _layout.plan([branches[k] for k in used], out)
    parts, chunk = _chunks(module, plan, out.device, do_rescale)
    module.guidance_combine(out, list(plan.tensors), slot[base], [slot[p] for p in pos], [slot[n] for n in neg],
                            [float(s) for s in a.scales], list(a.scale_tensors), do_rescale,
                            slot[rescale_ref] if do_rescale else 0, float(a.rescale), a.rescale_tensor,
                            geometry(plan), parts, chunk)
    return out


def _projected(kind, a, *, eta=1.0, threshold=0.0, momentum=0.0, alpha=0.0, buf=None, formulation=0):
    module = ext()
    branches = split_branches(a.preds, a.num_branches)
    out = _layout.output_like(branches[0])
    if out.numel() == 0:
        return out
    plan = _layout.plan([branches[a.cond], branches[a.uncond]], out)
    parts, chunk = _chunks(module, plan, out.device, True)
    module.projected_combine(out, plan.tensors[0], plan.tensors[1], buf, kind, formulation, float(a.scale),
                             a.scale_tensor, float(eta), float(threshold), float(momentum), float(alpha), a.rescaling,
                             float(a.rescale), a.rescale_tensor, geometry(plan), parts, chunk)
    return out


def apg_combine(a: ApgCombineArgs):
    return _projected(APG, a, eta=a.eta, threshold=a.norm_threshold, momentum=a.momentum, buf=a.momentum_buffer,
                      formulation=_spec.APG_FORMULATION_CODES[a.formulation])


apg_combine_momentum = apg_combine  # the same launcher: the record carries the buffer


def cfg_zero_star_combine(a: CfgZeroStarCombineArgs):
    return _projected(CFG_ZERO_STAR, a, formulation=int(a.original_formulation))


def tcfg_combine(a: TcfgCombineArgs):
    return _projected(TCFG, a, formulation=int(a.original_formulation))


def mag_combine(a: MagCombineArgs):
    return _projected(MAG, a, alpha=a.alpha, formulation=int(a.original_formulation))


def _channel(kind, a, wanted, ref=0, strength=0.0, strength_tensor=None):
    """CFG-Norm / Mahiro: channel-wise launches over the spatial positions (``_layout.channel_plan``)."""
    module = ext()
    branches = split_branches(a.preds, a.num_branches)
    slot = {k: i for i, k in enumerate(sorted(set(wanted)))}
    out = _layout.output_like(branches[0])
    if out.numel() == 0:
        return out
    xs, geo = _layout.channel_plan([branches[k] for k in slot], out)
    channels, p1, p2 = geo[:3]
    parts, chunk = 1, module.GUIDANCE_COMBINE_THREADS
    if kind == MAHIRO:
        parts, chunk = _layout.partitions(out.shape[0], p1 * p2, module.GUIDANCE_COMBINE_THREADS,
                                          _layout.target_programs(out.device))
    module.channel_combine(out, list(xs), slot[a.base], [slot[p] for p in a.pos], [slot[n] for n in a.neg],
                           [float(s) for s in a.scales], list(a.scale_tensors), kind, slot[ref], float(strength),
                           strength_tensor, [out.shape[0], *geo], parts, chunk)
    return out


def guidance_combine_cfg_norm(a: CfgNormCombineArgs):
    return _channel(CFG_NORM, a, [a.base, *a.pos, *a.neg, a.ref], ref=a.ref, strength=a.strength,
                    strength_tensor=a.strength_tensor)


def guidance_combine_mahiro(a: MahiroCombineArgs):
    return _channel(MAHIRO, a, [a.base, *a.pos, *a.neg], ref=a.pos[0])
