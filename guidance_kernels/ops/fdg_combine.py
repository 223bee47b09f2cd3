"""Frequency-decoupled guidance (FDG, diffusers' ``FrequencyDecoupledGuidance``): CFG applied per
level of kornia's Laplacian pyramid, each level with its own scale, then the pyramid rebuilt.

The predictions are ``(B, …, H, W)`` (stacked ``(K·B, …)`` or separate branches, any layout and
float dtype); the pyramid is over the last two dims and every dim in between is a channel (a
video latent ``(B, C, F, H, W)`` gets one 2-D pyramid per frame; kornia itself takes 4-D only).
Arithmetic is fp32 (the anchor's projection upcasts to fp64), the output ``(B, …, H, W)`` in the
input dtype and layout. No host sync; scales may be per-sample tensors (a per-step scale never
recompiles a compiled step).

The pyramid is kornia's ``build_laplacian_pyramid`` exactly: the latent is first reflect-padded on
the right and bottom to powers of two when kornia pads it (neither side a power of two, or a side
not divisible by ``2**(levels − 1)``); ``pyrdown`` = 5×5 ``[1, 4, 6, 4, 1]²/256`` blur (reflect) +
bilinear halving; ``pyrup`` = bilinear doubling + the same blur. diffusers' guider then returns the
padded size; this returns the latent's own ``(H, W)`` (the top-left crop, which is the part of the
rebuilt image that belongs to the latent), and rescales in data space against that crop.

Kernels use the linearity of the pyramid: a level's guided value is ``a_i·Lc_i + b_i·Ld_i`` with
per-sample coefficients (``Ld = L(cond − uncond)``), and since ``Σ_i up^i(L_i(x)) = x`` the rebuilt
image is ``a_0·c + b_0·d + up(R_1)``, ``R_i = (a_i − a_{i−1})·G_i(c) + (b_i − b_{i−1})·G_i(d) +
up(R_{i+1})`` over the Gaussian levels ``G_i``. Without parallel weights or frequency-space
rescale every ``a_i`` is 1: only the cond − uncond pyramid is built (one quarter-size level per
launch), and a two-level FDG is two kernel launches plus a tiny coefficient launch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import _checks, _library, _spec, backends
from .._library import FdgCombineArgs
from .._spec import FDG_MAX_LEVELS, FDG_RESCALE_SPACES
from .guidance_combine import _batch, _pair

backends.register_op("fdg_combine", ("cuda", "triton", "torch"))


def _per_level(fn: str, arg: str, value, levels: int) -> list:
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != levels:
            _checks.fail(fn, arg, f"has {len(value)} entries but scales has {levels} levels (one per level, "
                                  "highest frequency first)")
        return list(value)
    return [value] * levels


def fdg_combine(pred, scales, *, cond: int = 1, uncond: int = 0, num_branches: int | None = None,
                parallel_weights=None, rescale=0.0, rescale_space: str = "data", original_formulation: bool = False,
                backend: str | None = None) -> torch.Tensor:
    """FDG per sample (diffusers' guider; ``levels = len(scales)``, level 0 the finest)::

        Lc, Lu = laplacian_pyramid(D_cond), laplacian_pyramid(D_uncond)   (kornia's, see the module)
        level i:  shift = Lc_i − Lu_i
                  parallel_weights[i] = w != 1: shift = w·par + (shift − par), par = ⟨shift, v⟩ v,
                                                 v = Lc_i / max(‖Lc_i‖, 1e-12)
                  P_i = Lu_i + s_i·shift           (original_formulation: Lc_i + s_i·shift)
                  rescale_space="freq", φ_i: P_i = rescale_noise_cfg(P_i, Lc_i, φ_i)
                  a level whose scale is exactly 1 (0 for the original formulation) keeps Lc_i,
                  as diffusers' ``isclose`` test does (per sample for tensor scales)
        out = rebuild(P), cropped to (H, W);  rescale_space="data", φ: rescale_noise_cfg(out, D_cond, φ)

    Args:
        pred: ``(K·B, …, H, W)`` stacked branch-major predictions, or a sequence of ``(B, …, H, W)``.
        scales: one scale per level (diffusers' ``guidance_scales``, default ``[10, 5]``), each a
            number or a () / (1,) / (B,) tensor.
        parallel_weights: None (1: plain CFG shift), a number, or one number per level.
        rescale: φ >= 0 (number or tensor); with ``rescale_space="freq"`` also one per level.
        rescale_space: ``"data"`` (after the rebuild) or ``"freq"`` (per level).
    """
    fn = "fdg_combine"
    preds, k, cond, uncond = _pair(fn, pred, cond, uncond, num_branches)
    if preds[0].dim() < 3:
        _checks.fail(fn, "pred", f"expected (B, …, H, W) predictions (the pyramid is over the last two dims), got "
                                 f"{preds[0].dim()} dims")
    batch = _batch(preds, k)
    device = preds[0].device
    if isinstance(scales, (str, bytes, torch.Tensor)) or not isinstance(scales, Sequence):
        _checks.fail(fn, "scales", "expected a sequence of per-level scales, highest frequency first (diffusers' "
                                   f"guidance_scales), got {type(scales).__name__}", TypeError)
    levels = len(scales)
    if not 1 <= levels <= FDG_MAX_LEVELS:
        _checks.fail(fn, "scales", f"expected 1 to {FDG_MAX_LEVELS} levels, got {levels}")
    height, width = preds[0].shape[-2:]
    if _spec.fdg_level_sizes(height, width, levels) is None:
        padded = _spec.fdg_padded_size(height, width, levels)
        deepest = max(n for n in range(1, levels) if _spec.fdg_level_sizes(height, width, n) is not None)
        _checks.fail(fn, "scales", f"{levels} levels are too deep for a ({height}, {width}) latent (kornia's pyramid "
                                   f"pads it to {padded}; its coarsest level must be at least 2x2 and every level "
                                   f"halve exactly): use at most {deepest}")
    numbers, tensors = [], []
    for i, s in enumerate(scales):
        number, tensor = _checks.scale(fn, f"scales[{i}]", s, batch, device)
        numbers.append(number)
        tensors.append(tensor)
    weights = [_checks.fp32_number(fn, "parallel_weights", w)
               for w in _per_level(fn, "parallel_weights", 1.0 if parallel_weights is None else parallel_weights,
                                   levels)]
    if rescale_space not in FDG_RESCALE_SPACES:
        _checks.fail(fn, "rescale_space", f"must be one of {FDG_RESCALE_SPACES}, got {rescale_space!r}")
    if rescale_space == "data":
        if isinstance(rescale, Sequence):
            _checks.fail(fn, "rescale", "one value per level needs rescale_space='freq'", TypeError)
        values = [rescale]
    else:
        values = _per_level(fn, "rescale", rescale, levels)
    phis, phi_tensors = [], []
    for i, value in enumerate(values):
        arg = "rescale" if len(values) == 1 and not isinstance(rescale, Sequence) else f"rescale[{i}]"
        if not isinstance(value, torch.Tensor):
            value = _checks.fp32_number(fn, arg, value)
            if not _checks.is_compiling() and value < 0:
                _checks.fail(fn, arg, f"must be >= 0 (0 = off), got {value}")
            if value == 0:
                phis.append(0.0)
                phi_tensors.append(None)
                continue
        number, tensor = _checks.scale(fn, arg, value, batch, device, minimum=0.0)
        phis.append(number)
        phi_tensors.append(tensor)
    original_formulation = _checks.bool_flag(fn, "original_formulation", original_formulation)
    chosen = backends.select(fn, preds[0], backend=backend)
    args = FdgCombineArgs(preds, k, cond, uncond, numbers, tensors, weights, phis, phi_tensors, rescale_space,
                          original_formulation)
    return _library.call(fn, args, chosen)

