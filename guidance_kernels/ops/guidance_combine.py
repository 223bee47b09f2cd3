"""The combine family (one stem: its three ops share every backend file): turn the branches of one
denoiser call into the guided prediction.

Predictions come either as ONE stacked tensor in the pipelines' branch-major layout
``(K·B, …)`` (``pred.chunk(K)`` order; no chunk/cat copies are made) or as K separate
``(B, …)`` tensors (two models, as in autoguidance). Any float dtype (fp32/fp16/bf16; fp64 on
the torch backend) and any layout — strided, sliced, offset — is accepted; arithmetic is fp32
and the output is a new ``(B, …)`` tensor in the input dtype.

Scales are Python numbers or float tensors of shape (), (1,) or (B,) (per sample) on the
predictions' device. Tensors let a scale change every step under ``torch.compile`` without
recompiling and keep the call CUDA-graph capturable. The output has the branches' layout when it
is dense with the batch outermost (contiguous, channels-last) and is contiguous otherwise. The
combine, rescale, APG and CFG-Zero* run in one (plain) or two (with per-sample reductions) kernel
launches with no host sync.

These are inference ops: they have no autograd formula.
"""

from __future__ import annotations

import torch

from .. import _checks, _layout, _library, _spec, backends
from .._library import ApgCombineArgs, ApgCombineMomentumArgs, CfgZeroStarCombineArgs, GuidanceCombineArgs
from .._spec import APG_FORMULATIONS, MAX_BRANCHES, MAX_TERMS
from ..terms import Guidance

for _op in ("guidance_combine", "apg_combine", "cfg_zero_star_combine"):
    backends.register_op(_op, ("cuda", "triton", "torch"))


def _rescale_arg(fn: str, rescale, batch: int, device) -> tuple[float, torch.Tensor | None]:
    # A number equal to 0 means "no rescale" (one launch instead of two), also while compiling.
    if not isinstance(rescale, torch.Tensor) and _checks.finite_number(fn, "rescale", rescale) == 0:
        return 0.0, None
    return _checks.scale(fn, "rescale", rescale, batch, device)


def _per_sample_dims(fn: str, preds: list[torch.Tensor]) -> None:
    # Per-sample statistics need non-batch dims; torch's std(dim=[]) would silently reduce over the
    # whole batch instead (what diffusers' rescale does on 1-D input).
    if preds[0].dim() < 2:
        _checks.fail(fn, "pred", "per-sample statistics (rescale, APG, CFG-Zero*) need at least one "
                                 "non-batch dimension")


def _batch(preds: list[torch.Tensor], num_branches: int) -> int:
    return preds[0].shape[0] // num_branches if len(preds) == 1 else preds[0].shape[0]


def guidance_combine(pred, guidance: Guidance, *, num_branches: int | None = None, rescale=0.0,
                     rescale_ref: int | None = None, backend: str | None = None) -> torch.Tensor:
    """``out = D[base] + Σ_t g_t (D[pos_t] − D[neg_t])``, optionally followed by guidance rescale.

    Args:
        pred: ``(K·B, …)`` stacked branch-major predictions, or a sequence of K ``(B, …)`` tensors.
        guidance: a :class:`~guidance_kernels.terms.Guidance`, e.g. ``cfg(7.5) + pag(3.0)``.
        num_branches: K for a stacked ``pred`` (default: the highest branch index used + 1).
        rescale: φ of diffusers' ``rescale_noise_cfg`` (0 = off): with per-sample unbiased std
            over all non-batch dims, ``out = φ·out·std(D[rescale_ref])/std(out) + (1 − φ)·out``.
        rescale_ref: branch whose std is matched (default: the first term's positive branch,
            i.e. the cond prediction, as in diffusers).
        backend: ``"cuda"``, ``"triton"``, ``"torch"`` or None/``"auto"`` (see :mod:`.backends`).

    Returns:
        ``(B, …)`` in the dtype of ``pred``, laid out like one branch when the branches are dense
        with the batch outermost (contiguous, channels-last), else contiguous.
    """
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
    pos, neg, numbers, tensors = [], [], [], []
    for i, term in enumerate(guidance.terms):
        pos.append(_checks.branch_index(fn, f"guidance.terms[{i}].pos", term.pos, k))
        neg.append(_checks.branch_index(fn, f"guidance.terms[{i}].neg", term.neg, k))
        number, tensor = _checks.scale(fn, f"guidance.terms[{i}].scale", term.scale, batch, device)
        numbers.append(number)
        tensors.append(tensor)
    phi, phi_tensor = _rescale_arg(fn, rescale, batch, device)
    rescaling = _spec.rescale_on(phi, phi_tensor)
    if rescaling:
        _per_sample_dims(fn, preds)
    if rescale_ref is None:
        if rescaling and not guidance.terms:
            _checks.fail(fn, "rescale_ref", "required when rescaling a guidance without terms")
        rescale_ref = pos[0] if pos else base
    rescale_ref = _checks.branch_index(fn, "rescale_ref", rescale_ref, k)
    chosen = backends.select(fn, preds[0], backend=backend)
    args = GuidanceCombineArgs(preds, k, base, pos, neg, numbers, tensors, phi, phi_tensor, rescale_ref)
    return _library.call(fn, args, chosen)


def _pair(fn: str, pred, cond: int, uncond: int, num_branches: int | None):
    cond = _checks.branch_index(fn, "cond", cond, MAX_BRANCHES)
    uncond = _checks.branch_index(fn, "uncond", uncond, MAX_BRANCHES)
    # With an explicit num_branches the indices are range-checked against it below, by name.
    needed = max(cond, uncond) + 1 if num_branches is None else 1
    preds, k = _checks.branches(fn, "pred", pred, num_branches, needed, MAX_BRANCHES)
    cond = _checks.branch_index(fn, "cond", cond, k)
    uncond = _checks.branch_index(fn, "uncond", uncond, k)
    _per_sample_dims(fn, preds)
    return preds, k, cond, uncond


def apg_combine(pred, scale, *, cond: int = 1, uncond: int = 0, num_branches: int | None = None,
                eta: float = 1.0, norm_threshold: float = 0.0, momentum: float = 0.0,
                momentum_buffer: torch.Tensor | None = None, formulation: str = "paper", rescale=0.0,
                backend: str | None = None) -> torch.Tensor:
    """Adaptive projected guidance (Sadat et al. 2024, Algorithm 1), per sample::

        diff = D_cond − D_uncond
        momentum_buffer given:  diff = diff + momentum·buffer;  buffer ← diff   (in place)
        norm_threshold r > 0:   diff = diff · min(1, r / ‖diff‖₂)
        par = ⟨diff, v⟩ v with v = D_cond / ‖D_cond‖;  update = (diff − par) + eta·par
        out = D_cond + (w − 1)·update                        (formulation="paper")
              D_uncond + w·update                            ("diffusers": diffusers' default)
              D_cond + w·update                              ("diffusers_original")

    then optional guidance rescale against D_cond (diffusers' APG guider ``guidance_rescale``).
    diffusers' defaults are ``norm_threshold=15``, ``eta=1``, no momentum (its momentum, e.g.
    −0.5, needs a buffer: see :func:`apg_momentum_buffer`). The buffer is ``(B, …)`` in the
    output's layout, float32 or the prediction dtype, zero before the first step.
    """
    fn = "apg_combine"
    preds, k, cond, uncond = _pair(fn, pred, cond, uncond, num_branches)
    batch = _batch(preds, k)
    device = preds[0].device
    number, tensor = _checks.scale(fn, "scale", scale, batch, device)
    eta = _checks.finite_number(fn, "eta", eta)
    norm_threshold = _checks.finite_number(fn, "norm_threshold", norm_threshold, minimum=0.0)
    momentum = _checks.finite_number(fn, "momentum", momentum)
    if formulation not in APG_FORMULATIONS:
        _checks.fail(fn, "formulation", f"must be one of {APG_FORMULATIONS}, got {formulation!r}")
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
    elif momentum != 0.0:
        _checks.fail(fn, "momentum_buffer", "required when momentum != 0 (see apg_momentum_buffer)")
    phi, phi_tensor = _rescale_arg(fn, rescale, batch, device)
    chosen = backends.select(fn, preds[0], backend=backend)
    if momentum_buffer is None:
        args = ApgCombineArgs(preds, k, cond, uncond, number, tensor, eta, norm_threshold, formulation, phi,
                              phi_tensor)
        return _library.call("apg_combine", args, chosen)
    args = ApgCombineMomentumArgs(preds, k, cond, uncond, number, tensor, eta, norm_threshold, momentum,
                                  momentum_buffer, formulation, phi, phi_tensor)
    return _library.call("apg_combine_momentum", args, chosen)


def apg_momentum_buffer(pred, *, num_branches: int = 2) -> torch.Tensor:
    """A zero float32 momentum buffer for ``pred`` (stacked or a sequence): one branch's shape, in
    the layout of the combine's output (contiguous, or e.g. channels-last for channels-last input)."""
    first = pred[: pred.shape[0] // num_branches] if isinstance(pred, torch.Tensor) else pred[0]
    return _layout.output_like(first).float().zero_()


def cfg_zero_star_combine(pred, scale, *, cond: int = 1, uncond: int = 0, num_branches: int | None = None,
                          original_formulation: bool = False, zero_init: bool = False, rescale=0.0,
                          backend: str | None = None) -> torch.Tensor:
    """CFG-Zero* (diffusers' ``ClassifierFreeZeroStarGuidance``), per sample::

        alpha = ⟨D_cond, D_uncond⟩ / (‖D_uncond‖² + 1e-8)          (fp32, flattened)
        out = alpha·D_uncond + s·(D_cond − alpha·D_uncond)        (original_formulation: D_cond + …)

    then optional guidance rescale against D_cond. ``zero_init=True`` (diffusers: the first
    ``zero_init_steps`` steps) returns zeros; unlike diffusers it does not rescale those zeros
    into NaN. Pass ``zero_init`` as ``step < zero_init_steps``.
    """
    fn = "cfg_zero_star_combine"
    preds, k, cond, uncond = _pair(fn, pred, cond, uncond, num_branches)
    batch = _batch(preds, k)
    device = preds[0].device
    number, tensor = _checks.scale(fn, "scale", scale, batch, device)
    phi, phi_tensor = _rescale_arg(fn, rescale, batch, device)
    if not isinstance(zero_init, bool):
        _checks.fail(fn, "zero_init", f"expected a bool, got {type(zero_init).__name__}", TypeError)
    chosen = backends.select(fn, preds[0], backend=backend)
    if zero_init:
        return preds[0].new_zeros((batch, *preds[0].shape[1:]))
    args = CfgZeroStarCombineArgs(preds, k, cond, uncond, number, tensor, bool(original_formulation), phi,
                                  phi_tensor)
    return _library.call(fn, args, chosen)
