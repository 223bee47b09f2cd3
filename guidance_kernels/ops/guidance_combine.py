"""The combine family (one stem: its ops share every backend file): turn the branches of one
denoiser call into the guided prediction.

Predictions come either as ONE stacked tensor in the pipelines' branch-major layout
``(K·B, …)`` (``pred.chunk(K)`` order; no chunk/cat copies are made) or as K separate
``(B, …)`` tensors (two models, as in autoguidance). Any float dtype (fp32/fp16/bf16; fp64 on
the torch backend) and any layout — strided, sliced, offset — is accepted; arithmetic is fp32
and the output is a new ``(B, …)`` tensor in the input dtype.

Scales are Python numbers (finite, within the float32 range) or float tensors of shape (), (1,)
or (B,) (per sample) on the predictions' device. Tensors let a scale change every step under
``torch.compile`` without recompiling and keep the call CUDA-graph capturable. The output has the
branches' layout when it is dense with the batch outermost (contiguous, channels-last) and is
contiguous otherwise. The combine, rescale, APG, CFG-Zero*, TCFG and MAG run in one (plain) or two
(with per-sample reductions) kernel launches with no host sync.

Rules every backend follows (tested on each lane):

* ``rescale`` (φ of diffusers' ``rescale_noise_cfg``): a Python number must be >= 0 (0 = off);
  a tensor φ is always applied, and its values are checked (finite, >= 0) only on the CPU — a
  CUDA tensor is never read on the host (that would be a sync).
* Non-finite data propagates exactly as in the eager formulas: per-sample dot products are plain
  sums (an inf gives ±inf, inf − inf gives NaN), the rescale std of a sample holding an inf or a
  NaN is NaN (the whole sample becomes NaN, as with torch.std), and a constant sample (all its
  values equal, zero included) has std 0 and rescales to 0/0 = NaN, as torch.std gives.
* ``min``/``max`` inside the formulas (APG's threshold, ``F.normalize``'s eps, clamps) propagate
  NaN like ``torch.minimum``/``torch.clamp``.
* fp32 results of the plain combine are bit-identical to the anchor formula
  ``u + s·(c − u) + …`` evaluated in fp32 with one rounding per operation, on every backend.

These are inference ops: they have no autograd formula.
"""

from __future__ import annotations

import torch

from .. import _checks, _layout, _library, _plans, _spec, backends
from .._library import (ApgCombineArgs, ApgCombineMomentumArgs, CfgNormCombineArgs, CfgZeroStarCombineArgs,
                        GuidanceCombineArgs, MagCombineArgs, MahiroCombineArgs, TcfgCombineArgs)
from .._spec import APG_CFG_FORMULATIONS, APG_FORMULATIONS, MAX_BRANCHES, MAX_TERMS
from ..terms import Guidance

for _op in ("guidance_combine", "apg_combine", "cfg_zero_star_combine", "tcfg_combine", "mag_combine"):
    backends.register_op(_op, ("cuda", "triton", "torch"))


def _rescale_arg(fn: str, rescale, batch: int, device) -> tuple[float, torch.Tensor | None]:
    # A number equal to 0 means "no rescale" (one launch instead of two), also while compiling.
    if not isinstance(rescale, torch.Tensor):
        if _checks.fp32_number(fn, "rescale", rescale) == 0:
            return 0.0, None
        if not _checks.is_compiling() and rescale < 0:
            _checks.fail(fn, "rescale", f"must be >= 0 (0 = off), got {rescale}")
    return _checks.scale(fn, "rescale", rescale, batch, device, minimum=0.0)


def _per_sample_dims(fn: str, preds: list[torch.Tensor]) -> None:
    # Per-sample statistics need non-batch dims; torch's std(dim=[]) would silently reduce over the
    # whole batch instead (what diffusers' rescale does on 1-D input).
    if preds[0].dim() < 2:
        _checks.fail(fn, "pred", "per-sample statistics (rescale, APG, CFG-Zero*, TCFG, MAG) need at least one "
                                 "non-batch dimension")


def _batch(preds: list[torch.Tensor], num_branches: int) -> int:
    return preds[0].shape[0] // num_branches if len(preds) == 1 else preds[0].shape[0]


def guidance_combine(pred, guidance: Guidance, *, num_branches: int | None = None, rescale=0.0,
                     rescale_ref: int | None = None, cfg_norm=None, mahiro: bool = False,
                     backend: str | None = None) -> torch.Tensor:
    """``out = D[base] + Σ_t g_t (D[pos_t] − D[neg_t])``, optionally followed by ONE post-CFG
    correction: guidance rescale (diffusers), CFG-Norm or Mahiro (ComfyUI's nodes).

    Args:
        pred: ``(K·B, …)`` stacked branch-major predictions, or a sequence of K ``(B, …)`` tensors.
        guidance: a :class:`~guidance_kernels.terms.Guidance`, e.g. ``cfg(7.5) + pag(3.0)``.
        num_branches: K for a stacked ``pred`` (default: the highest branch index used + 1).
        rescale: φ >= 0 of diffusers' ``rescale_noise_cfg`` (0 = off): with per-sample unbiased std
            over all non-batch dims, ``out = φ·out·std(D[rescale_ref])/std(out) + (1 − φ)·out``.
        rescale_ref: branch whose std is matched (default: the first term's positive branch,
            i.e. the cond prediction, as in diffusers); also CFG-Norm's reference.
        cfg_norm: ComfyUI's CFGNorm ``strength`` (None = off; a number >= 0 or a per-sample tensor):
            per sample and spatial position, with channel norms over dim 1,
            ``out = out · clamp(‖D[rescale_ref]‖ / (‖out‖ + 1e-8), 0, 1) · strength``.
        mahiro: ComfyUI's Mahiro with the first term as its CFG (``s`` its scale, ``c``/``u`` its
            branches): ``leap = s·c``, ``merge = (leap + out)/2``, ``sim`` = the mean over spatial
            positions of the channel cosine similarity (eps 1e-8) of ``√|s·u|·sign(s·u)`` and
            ``√|merge|·sign(merge)``, ``k = 2(sim + 1)``: ``out = (k·out + (4 − k)·leap)/4``.
            ``sim`` is per sample; ComfyUI averages it over the whole batch, so batched images
            influence each other there (identical for a batch of one, ComfyUI's usual case).
        backend: ``"cuda"``, ``"triton"``, ``"torch"`` or None/``"auto"`` (see :mod:`.backends`).

    CFG-Norm and Mahiro work per position on ``(B, C, *spatial)`` (dim 1 = channels, as ComfyUI's
    latents) in the space the caller hands over (ComfyUI: x0); like ComfyUI's post-CFG hooks they
    follow the whole combine, and at most one of rescale, cfg_norm and mahiro may be on.

    Returns:
        ``(B, …)`` in the dtype of ``pred``, laid out like one branch when the branches are dense
        with the batch outermost (contiguous, channels-last), else contiguous.
    """
    key = _combine_key(pred, guidance, num_branches, rescale, rescale_ref, cfg_norm, mahiro, backend)
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        name, args, chosen = _combine_plan(pred, guidance, num_branches, rescale, rescale_ref, cfg_norm, mahiro,
                                           backend)
        if key is not None:  # the record without its inputs: a plan must not keep tensors alive
            _PLANS.put(key, (name, args[1:], chosen))
        return _library.call(name, args, chosen)
    name, rest, chosen = plan
    return _library.call_memoised(name, [pred] if type(pred) is torch.Tensor else list(pred), rest, chosen)


# Validated guidance_combine calls by what their validation reads (see _plans).
_PLANS = _plans.Memo()


def _combine_key(pred, guidance, num_branches, rescale, rescale_ref, cfg_norm, mahiro, backend):
    if torch.compiler.is_compiling() or type(guidance) is not Guidance:
        return None
    value = guidance.static_key
    shape = _plans.layout(pred)
    if value is None or shape is None or not (
            _plans.static(num_branches) and _plans.number(rescale) and _plans.static(rescale_ref)
            and (cfg_norm is None or _plans.number(cfg_norm)) and _plans.static(mahiro) and _plans.static(backend)):
        return None
    return _PLANS.key(shape, value, num_branches, rescale, rescale_ref, cfg_norm, mahiro, backend)


def _combine_plan(pred, guidance, num_branches, rescale, rescale_ref, cfg_norm, mahiro, backend):
    """Validate a guidance_combine call: ``(op name, its record, backend)``."""
    fn = "guidance_combine"
    if not isinstance(guidance, Guidance):
        _checks.fail(fn, "guidance", f"expected a Guidance (e.g. cfg(7.5) + pag(3.0)), got "
                                     f"{type(guidance).__name__}", TypeError)
    if len(guidance.terms) > MAX_TERMS:
        _checks.fail(fn, "guidance", f"at most {MAX_TERMS} terms are supported, got {len(guidance.terms)}")
    preds, k = _checks.branches(fn, "pred", pred, num_branches, guidance.num_branches, MAX_BRANCHES)
    batch = _batch(preds, k)
    device = preds[0].device
    base = _checks.branch_index(fn, "guidance.base", guidance.base, k)
    pos, neg, numbers_, tensors = [], [], [], []
    for i, term in enumerate(guidance.terms):
        pos.append(_checks.branch_index(fn, f"guidance.terms[{i}].pos", term.pos, k))
        neg.append(_checks.branch_index(fn, f"guidance.terms[{i}].neg", term.neg, k))
        number, tensor = _checks.scale(fn, f"guidance.terms[{i}].scale", term.scale, batch, device)
        numbers_.append(number)
        tensors.append(tensor)
    phi, phi_tensor = _rescale_arg(fn, rescale, batch, device)
    rescaling = _spec.rescale_on(phi, phi_tensor)
    mahiro = _checks.bool_flag(fn, "mahiro", mahiro)
    if sum((rescaling, cfg_norm is not None, mahiro)) > 1:
        _checks.fail(fn, "mahiro" if mahiro else "cfg_norm",
                     "rescale, cfg_norm and mahiro are alternative post-CFG corrections: use one")
    if rescaling:
        _per_sample_dims(fn, preds)
    if (cfg_norm is not None or mahiro) and preds[0].dim() < 2:
        _checks.fail(fn, "pred", "CFG-Norm and Mahiro need a channel dimension (dim 1)")
    if mahiro and not guidance.terms:
        _checks.fail(fn, "mahiro", "needs a guidance term (its first term is the CFG it corrects)")
    if rescale_ref is None:
        if (rescaling or cfg_norm is not None) and not guidance.terms:
            _checks.fail(fn, "rescale_ref", "required when rescaling a guidance without terms")
        rescale_ref = pos[0] if pos else base
    rescale_ref = _checks.branch_index(fn, "rescale_ref", rescale_ref, k)
    chosen = backends.select(fn, preds[0], backend=backend)
    if cfg_norm is not None:
        strength, strength_tensor = _checks.scale(fn, "cfg_norm", cfg_norm, batch, device, minimum=0.0)
        args = CfgNormCombineArgs(preds, k, base, pos, neg, numbers_, tensors, strength, strength_tensor,
                                  rescale_ref)
        return "guidance_combine_cfg_norm", args, chosen
    if mahiro:
        return "guidance_combine_mahiro", MahiroCombineArgs(preds, k, base, pos, neg, numbers_, tensors), chosen
    return fn, GuidanceCombineArgs(preds, k, base, pos, neg, numbers_, tensors, phi, phi_tensor, rescale_ref), chosen


def _pair(fn: str, pred, cond: int, uncond: int, num_branches: int | None):
    """Branches and the (cond, uncond) indices of a two-branch op; a bad index is named."""
    cond = _checks.branch_index(fn, "cond", cond, MAX_BRANCHES)
    uncond = _checks.branch_index(fn, "uncond", uncond, MAX_BRANCHES)
    if num_branches is None and isinstance(pred, torch.Tensor):
        # A stacked batch holds (highest index + 1) branches unless num_branches says otherwise.
        num_branches = max(cond, uncond) + 1
        name, index = ("cond", cond) if cond >= uncond else ("uncond", uncond)
        if pred.dim() >= 1 and pred.shape[0] % num_branches:
            _checks.fail(fn, name, f"branch index {index} implies num_branches={num_branches}, but pred's leading "
                                   f"dimension {pred.shape[0]} is not divisible by it (pass num_branches)")
    preds, k = _checks.branches(fn, "pred", pred, num_branches, 1, MAX_BRANCHES)
    cond = _checks.branch_index(fn, "cond", cond, k)
    uncond = _checks.branch_index(fn, "uncond", uncond, k)
    _per_sample_dims(fn, preds)
    return preds, k, cond, uncond


def _two_branch(fn: str, pred, scale, cond, uncond, num_branches, rescale, backend):
    """What every two-branch op validates: branches, indices, the scale, φ and the backend."""
    preds, k, cond, uncond = _pair(fn, pred, cond, uncond, num_branches)
    batch = _batch(preds, k)
    device = preds[0].device
    number, tensor = _checks.scale(fn, "scale", scale, batch, device)
    phi, phi_tensor = _rescale_arg(fn, rescale, batch, device)
    chosen = backends.select(fn, preds[0], backend=backend)
    return preds, k, cond, uncond, batch, number, tensor, phi, phi_tensor, chosen


def apg_combine(pred, scale, *, cond: int = 1, uncond: int = 0, num_branches: int | None = None,
                eta: float = 1.0, norm_threshold: float = 0.0, momentum: float = 0.0,
                momentum_buffer: torch.Tensor | None = None, formulation: str = "paper", rescale=0.0,
                backend: str | None = None) -> torch.Tensor:
    """Adaptive projected guidance (Sadat et al. 2024, Algorithm 1), per sample::

        diff = D_cond − D_uncond
        momentum_buffer given:  diff = diff + momentum·buffer;  buffer ← diff   (in place)
        norm_threshold r > 0:   diff = diff · min(1, r / ‖diff‖₂)
        par = ⟨diff, v⟩ v with v = D_cond / max(‖D_cond‖, 1e-12);  update = (diff − par) + eta·par
        out = D_cond + (w − 1)·update                        (formulation="paper")
              D_uncond + w·update                            ("diffusers": diffusers' default)
              D_cond + w·update                              ("diffusers_original")

    then optional guidance rescale against D_cond (diffusers' APG guider ``guidance_rescale``).
    diffusers' defaults are ``norm_threshold=15``, ``eta=1``, no momentum (its momentum, e.g.
    −0.5, needs a buffer: see :func:`apg_momentum_buffer`). The buffer is ``(B, …)`` in the
    output's layout, float32 or the prediction dtype, zero before the first step, and must not
    share memory with the predictions.

    AdaptiveProjectedMixGuidance (diffusers; HunyuanImage-2.1) is CFG with the buffer
    accumulating until its start step, then APG ("diffusers"): its CFG phase is
    ``formulation="cfg"`` (``D_uncond + w·(D_cond − D_uncond)``; ``"cfg_original"``: on D_cond),
    which updates the buffer as above and outputs plain CFG (``eta`` and ``norm_threshold`` do not
    apply). :func:`guidance_kernels.apg_mix` gives each step's arguments.
    """
    fn = "apg_combine"
    preds, k, cond, uncond, batch, number, tensor, phi, phi_tensor, chosen = _two_branch(
        fn, pred, scale, cond, uncond, num_branches, rescale, backend)
    device = preds[0].device
    eta = _checks.fp32_number(fn, "eta", eta)
    norm_threshold = _checks.fp32_number(fn, "norm_threshold", norm_threshold, minimum=0.0)
    momentum = _checks.fp32_number(fn, "momentum", momentum)
    if not isinstance(formulation, str) or formulation not in APG_FORMULATIONS + APG_CFG_FORMULATIONS:
        _checks.fail(fn, "formulation", f"must be one of {APG_FORMULATIONS + APG_CFG_FORMULATIONS}, "
                                        f"got {formulation!r}")
    if formulation in APG_CFG_FORMULATIONS and not _checks.is_compiling() and (eta != 1.0 or norm_threshold != 0.0):
        _checks.fail(fn, "formulation", f"{formulation!r} is plain CFG (with the momentum buffer updated): eta and "
                                        "norm_threshold do not apply (leave them at 1 and 0)")
    if momentum_buffer is not None:
        _checks.float_tensor(fn, "momentum_buffer", momentum_buffer)
        branch_shape = (batch, *preds[0].shape[1:])
        if tuple(momentum_buffer.shape) != branch_shape:
            _checks.fail(fn, "momentum_buffer", f"shape {tuple(momentum_buffer.shape)} differs from one "
                                                f"branch {branch_shape}")
        if momentum_buffer.device != device:
            _checks.fail(fn, "momentum_buffer", f"is on {momentum_buffer.device} but pred is on {device}")
        if momentum_buffer.dtype not in (torch.float32, preds[0].dtype):
            _checks.fail(fn, "momentum_buffer", f"dtype {momentum_buffer.dtype}: use float32 or the "
                                                f"prediction dtype {preds[0].dtype}", TypeError)
        branch = preds[0][:batch]
        expected = _layout.output_strides(branch_shape, tuple(branch.stride()))
        if _layout.layout_key(branch_shape, tuple(momentum_buffer.stride())) != _layout.layout_key(branch_shape,
                                                                                                   expected):
            _checks.fail(fn, "momentum_buffer", f"strides {tuple(momentum_buffer.stride())}: it is updated in "
                                                f"place in the output's layout {expected}; create it with "
                                                "apg_momentum_buffer")
        _checks.no_overlap(fn, "momentum_buffer", momentum_buffer, preds, "pred")
    elif momentum != 0.0:
        _checks.fail(fn, "momentum_buffer", "required when momentum != 0 (see apg_momentum_buffer)")
    if momentum_buffer is None:
        args = ApgCombineArgs(preds, k, cond, uncond, number, tensor, eta, norm_threshold, formulation, phi,
                              phi_tensor)
        return _library.call("apg_combine", args, chosen)
    args = ApgCombineMomentumArgs(preds, k, cond, uncond, number, tensor, eta, norm_threshold, momentum,
                                  momentum_buffer, formulation, phi, phi_tensor)
    return _library.call("apg_combine_momentum", args, chosen)


def apg_momentum_buffer(pred, *, num_branches: int | None = None) -> torch.Tensor:
    """A zero float32 momentum buffer for ``pred`` (stacked — ``num_branches`` of them, default 2 —
    or a sequence of branches): one branch's shape, in the layout of the combine's output
    (contiguous, or e.g. channels-last for channels-last input)."""
    fn = "apg_momentum_buffer"
    if isinstance(pred, torch.Tensor) and num_branches is None:
        num_branches = 2
    preds, k = _checks.branches(fn, "pred", pred, num_branches, 1, MAX_BRANCHES)
    first = preds[0][: _batch(preds, k)]
    return _layout.output_like(first).float().zero_()


def cfg_zero_star_combine(pred, scale, *, cond: int = 1, uncond: int = 0, num_branches: int | None = None,
                          original_formulation: bool = False, zero_init: bool = False, rescale=0.0,
                          backend: str | None = None) -> torch.Tensor:
    """CFG-Zero* (diffusers' ``ClassifierFreeZeroStarGuidance``), per sample::

        alpha = ⟨D_cond, D_uncond⟩ / (‖D_uncond‖² + 1e-8)          (fp32, flattened)
        out = alpha·D_uncond + s·(D_cond − alpha·D_uncond)        (original_formulation: D_cond + …)

    then optional guidance rescale against D_cond. ``zero_init=True`` (diffusers: the first
    ``zero_init_steps`` steps) returns zeros in the output's layout; unlike diffusers it does not
    rescale those zeros into NaN. Pass ``zero_init`` as ``step < zero_init_steps``.
    """
    fn = "cfg_zero_star_combine"
    preds, k, cond, uncond, batch, number, tensor, phi, phi_tensor, chosen = _two_branch(
        fn, pred, scale, cond, uncond, num_branches, rescale, backend)
    original_formulation = _checks.bool_flag(fn, "original_formulation", original_formulation)
    if _checks.bool_flag(fn, "zero_init", zero_init):
        return _layout.output_like(preds[0][:batch]).zero_()
    args = CfgZeroStarCombineArgs(preds, k, cond, uncond, number, tensor, original_formulation, phi, phi_tensor)
    return _library.call(fn, args, chosen)


def tcfg_combine(pred, scale, *, cond: int = 1, uncond: int = 0, num_branches: int | None = None,
                 original_formulation: bool = False, rescale=0.0, backend: str | None = None) -> torch.Tensor:
    """Tangential damping CFG (TCFG, diffusers' ``TangentialClassifierFreeGuidance``, ComfyUI's TCFG
    node): per sample, uncond is replaced by its projection on the principal right-singular
    direction ``v₁`` of the 2×D matrix ``[D_cond; D_uncond]``, then CFG::

        u' = ⟨D_uncond, v₁⟩ v₁
        out = u' + s·(D_cond − u')                                (original_formulation: D_cond + …)

    then optional guidance rescale against D_cond. No SVD: ``v₁`` lies in span(c, u), so with the
    2×2 Gram matrix ``G = [[‖c‖², ⟨c,u⟩], [⟨c,u⟩, ‖u‖²]]`` and its principal unit eigenvector
    ``(e_c, e_u)``, ``u' = e_u·(e_c·c + e_u·u)``. With ``δ = ‖c‖² − ‖u‖²`` (computed as
    ``2⟨c, c−u⟩ − ‖c−u‖²``, exact when c ≈ u) and ``r = √(δ² + 4⟨c,u⟩²)`` (the eigenvalue gap)::

        e_c·e_u = ⟨c,u⟩ / r,   e_u² = (r − δ) / (2r)  (= 2⟨c,u⟩² / (r (r + δ)) when δ >= 0)

    Degenerate cases: c ∥ u (rank 1) needs no special case (u' = u); c = 0 gives u' = u and u = 0
    gives u' = 0, as the SVD does. ``r = 0`` — c ⟂ u with equal norms, or both zero — has two
    equal singular values and the SVD's choice of v₁ is arbitrary; this takes c's direction, as
    diffusers' call (its first row is cond) returns it, so ``u' = ⟨u, ĉ⟩ĉ = 0`` (ComfyUI stacks
    uncond first and gets ``u' = u``). Sums are fp32; the 2×2 step is per sample.
    """
    fn = "tcfg_combine"
    preds, k, cond, uncond, batch, number, tensor, phi, phi_tensor, chosen = _two_branch(
        fn, pred, scale, cond, uncond, num_branches, rescale, backend)
    original_formulation = _checks.bool_flag(fn, "original_formulation", original_formulation)
    args = TcfgCombineArgs(preds, k, cond, uncond, number, tensor, original_formulation, phi, phi_tensor)
    return _library.call(fn, args, chosen)


def mag_combine(pred, scale, *, cond: int = 1, uncond: int = 0, num_branches: int | None = None,
                alpha: float = 8.0, original_formulation: bool = False, rescale=0.0,
                backend: str | None = None) -> torch.Tensor:
    """Magnitude-aware guidance (MAMBO-G, diffusers' ``MagnitudeAwareGuidance``), per sample::

        ratio = ‖D_cond − D_uncond‖ / ‖D_uncond‖                (Frobenius norms, all non-batch dims)
        s' = 1 + (s − 1)·exp(−alpha·ratio)                       (original_formulation: s·exp(−alpha·ratio))
        out = D_uncond + s'·(D_cond − D_uncond)                  (original_formulation: D_cond + …)

    then optional guidance rescale against D_cond. ``alpha`` (>= 0, diffusers' default 8) is a
    Python number. diffusers' ``mambo_guidance`` calls ``torch.norm`` with a list of three dims,
    which raises on 4-D latents; its meaning is the Frobenius norm used here. A zero uncond gives
    ratio = inf and s' = 1 (alpha > 0), as the formula does.
    """
    fn = "mag_combine"
    preds, k, cond, uncond, batch, number, tensor, phi, phi_tensor, chosen = _two_branch(
        fn, pred, scale, cond, uncond, num_branches, rescale, backend)
    alpha = _checks.fp32_number(fn, "alpha", alpha, minimum=0.0)
    original_formulation = _checks.bool_flag(fn, "original_formulation", original_formulation)
    args = MagCombineArgs(preds, k, cond, uncond, number, tensor, alpha, original_formulation, phi, phi_tensor)
    return _library.call(fn, args, chosen)


def apg_mix(step: int, *, guidance_scale=3.5, apg_scale=10.0, momentum: float | None = -0.5,
            norm_threshold: float = 10.0, eta: float = 0.0, start_step: int = 5,
            original_formulation: bool = False) -> dict:
    """The :func:`apg_combine` arguments of diffusers' ``AdaptiveProjectedMixGuidance`` at ``step``
    (its knobs, same defaults: ``guidance_scale``, ``adaptive_projected_guidance_scale`` →
    ``apg_scale``, ``…_momentum`` → ``momentum``, ``…_rescale`` → ``norm_threshold``, ``eta``,
    ``adaptive_projected_guidance_start_step`` → ``start_step``): CFG that feeds the momentum
    buffer while ``step <= start_step``, APG ("diffusers") after. Use with one buffer from
    :func:`apg_momentum_buffer`, zeroed at step 0::

        out = apg_combine(pred, momentum_buffer=buf, **apg_mix(step))

    ``momentum=None`` (no buffer) returns momentum 0: pass no buffer then. The formulation changes
    once, at ``start_step`` (one recompile under torch.compile). Outside the guider's start/stop
    window or at ``guidance_scale == 1`` diffusers skips guidance altogether (it returns D_cond and
    leaves the buffer alone): do the same, e.g. with :func:`guidance_kernels.guidance_interval`."""
    fn = "apg_mix"
    step = _checks.integer(fn, "step", step, minimum=0)
    start_step = _checks.integer(fn, "start_step", start_step)
    original_formulation = _checks.bool_flag(fn, "original_formulation", original_formulation)
    momentum = 0.0 if momentum is None else _checks.fp32_number(fn, "momentum", momentum)
    if step > start_step:
        return {"scale": apg_scale, "formulation": "diffusers_original" if original_formulation else "diffusers",
                "eta": _checks.fp32_number(fn, "eta", eta),
                "norm_threshold": _checks.fp32_number(fn, "norm_threshold", norm_threshold, minimum=0.0),
                "momentum": momentum}
    return {"scale": guidance_scale, "formulation": "cfg_original" if original_formulation else "cfg",
            "eta": 1.0, "norm_threshold": 0.0, "momentum": momentum}

