"""Guidance specifications: which branch is the base and which differences are added.

Every linear guidance method is ``out = D[base] + Σ_t g_t · (D[pos_t] − D[neg_t])`` over the
branches of one denoiser call (branch-major, as diffusers' ``pred.chunk(K)``). The helpers
below turn each method's own knob into that form, choosing the base so that the operation
order matches the anchor implementation (which keeps fp32 results identical to it):

=====================================  ==========================  =======================
helper (anchor)                        anchor formula              ``Guidance``
=====================================  ==========================  =======================
``cfg(s)`` (diffusers, ComfyUI)        u + s(c − u)                base u, (c, u, s)
``cfg(s, original_formulation=True)``  c + s(c − u)                base c, (c, u, s)
``pag(s)`` / ``seg(s)``                … + s(c − p)                base c, (c, p, s)
``autoguidance(w)`` (EDM2)             ref + w(D − ref)            base ref, (D, ref, w)
``icg(s)``                             u_rand + s(c − u_rand)      base u_rand, (c, u_rand, s)
``sims(ω)``                            (1+ω)D_real − ω D_synth     base real, (real, synth, ω)
``sag(s)`` (diffusers SAG)             … + s(u − u_degraded)       base u, (u, deg, s)
=====================================  ==========================  =======================

``a + b`` appends ``b``'s terms to ``a`` (``a``'s base is kept): ``cfg(7.5) + pag(3.0)`` is
diffusers' CFG+PAG ``u + 7.5(c − u) + 3(c − p)`` on the batch ``[u, c, p]``.

Scales are Python numbers or tensors (0-d, (1,) or per-sample (B,)); pass tensors when a scale
changes every step under ``torch.compile`` (a changing Python float recompiles once).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from functools import cached_property
from typing import Union

import torch

from . import _checks

Scale = Union[float, torch.Tensor]

# Branch order of diffusers' pipelines: CFG+PAG = [uncond, cond, perturbed].
UNCOND, COND, PERTURBED = 0, 1, 2


def _index(owner: str, name: str, value) -> None:
    # Checked when built, so a float or a tensor index is named here instead of surfacing later as
    # a bad branch count. The range is checked by the combine, which knows the number of branches.
    if type(value) is int:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _checks.fail(owner, name, f"branch index must be an int, got {value!r} ({type(value).__name__})", TypeError)


def _scale_value(owner: str, name: str, value) -> None:
    if type(value) is float or type(value) is int:
        return
    if isinstance(value, torch.Tensor):
        return
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        _checks.fail(owner, name, f"expected a real number or a tensor, got {type(value).__name__}", TypeError)


@dataclass(frozen=True, eq=False)
class Term:
    """One guidance term ``scale · (D[pos] − D[neg])``."""

    pos: int
    neg: int
    scale: Scale

    def __post_init__(self):
        _index("Term", "pos", self.pos)
        _index("Term", "neg", self.neg)
        _scale_value("Term", "scale", self.scale)


@dataclass(frozen=True, eq=False)
class Guidance:
    """``out = D[base] + Σ term.scale · (D[term.pos] − D[term.neg])``."""

    base: int
    terms: tuple[Term, ...] = ()

    def __post_init__(self):
        _index("Guidance", "base", self.base)
        if isinstance(self.terms, (str, bytes)) or not isinstance(self.terms, (tuple, list)):
            _checks.fail("Guidance", "terms", f"expected a tuple of Term, got {type(self.terms).__name__}", TypeError)
        object.__setattr__(self, "terms", tuple(self.terms))
        for i, term in enumerate(self.terms):
            if not isinstance(term, Term):
                _checks.fail("Guidance", f"terms[{i}]", f"expected a Term, got {type(term).__name__}", TypeError)

    def __add__(self, other: "Guidance") -> "Guidance":
        if not isinstance(other, Guidance):
            return NotImplemented
        return Guidance(self.base, self.terms + other.terms)

    @cached_property
    def static_key(self) -> tuple | None:
        """The guidance by value when every scale is a Python number (else None): equal guidances
        built anew each step share one memo entry of validated calls (``_plans``)."""
        if not all(type(t.scale) is float or type(t.scale) is int for t in self.terms):
            return None
        return self.base, tuple((t.pos, t.neg, t.scale) for t in self.terms)

    @property
    def num_branches(self) -> int:
        """Number of branches referenced (highest index + 1)."""
        indices = [self.base] + [i for t in self.terms for i in (t.pos, t.neg)]
        return max(indices) + 1

    def __repr__(self) -> str:
        terms = " ".join(f"+ {_fmt(t.scale)}·(D{t.pos} − D{t.neg})" for t in self.terms)
        return f"Guidance(D{self.base} {terms})".replace("  ", " ").replace(" )", ")")


def _fmt(scale: Scale) -> str:
    return "tensor" if isinstance(scale, torch.Tensor) else f"{scale:g}"


def cfg(scale: Scale, *, uncond: int = UNCOND, cond: int = COND,
        original_formulation: bool = False) -> Guidance:
    """Classifier-free guidance with diffusers' ``guidance_scale`` ``s``: ``u + s(c − u)``.
    ``original_formulation=True``: ``c + s(c − u)`` (diffusers' flag of that name)."""
    return Guidance(cond if original_formulation else uncond, (Term(cond, uncond, scale),))


def pag(scale: Scale, *, cond: int = COND, perturbed: int = PERTURBED) -> Guidance:
    """Perturbed-attention guidance term ``s(c − p)`` (diffusers / ComfyUI ``pag_scale``).
    Alone (batch ``[c, p]``: ``pag(s, cond=0, perturbed=1)``) it is ``c + s(c − p)``."""
    return Guidance(cond, (Term(cond, perturbed, scale),))


def seg(scale: Scale, *, cond: int = COND, perturbed: int = PERTURBED) -> Guidance:
    """Smoothed-energy guidance term ``s(c − p)`` (SEG-SDXL ``seg_scale``); same form as PAG."""
    return pag(scale, cond=cond, perturbed=perturbed)


def sag(scale: Scale, *, uncond: int = UNCOND, degraded: int = 2) -> Guidance:
    """Self-attention guidance term ``s(u − u_degraded)`` (diffusers ``sag_scale``): note that the
    positive side is the UNCOND prediction and the negative one its blurred re-noised re-run."""
    return Guidance(uncond, (Term(uncond, degraded, scale),))


def autoguidance(w: Scale, *, guiding: int = 0, main: int = 1) -> Guidance:
    """EDM2 autoguidance ``ref.lerp(D, w) = ref + w(D − ref)``; ``guiding`` is the weaker model."""
    return Guidance(guiding, (Term(main, guiding, w),))


def icg(scale: Scale, *, random_cond: int = UNCOND, cond: int = COND) -> Guidance:
    """Independent-condition guidance: CFG where the negative branch got an independent random
    condition (see :func:`icg_random_labels`, :func:`icg_noise_condition`)."""
    return Guidance(random_cond, (Term(cond, random_cond, scale),))


def sims(omega: Scale, *, synthetic: int = 0, real: int = 1) -> Guidance:
    """SIMS ``(1+ω)·D_real − ω·D_synth = D_real + ω(D_real − D_synth)``."""
    return Guidance(real, (Term(real, synthetic, omega),))


def kucvlab_pag(guide_scale: Scale, *, cond: int = 0, perturbed: int = 1) -> Guidance:
    """KU-CVLAB's ADM PAG/SAG code: ``ptb + s(cond − ptb)``, i.e. g = s − 1 on base cond."""
    return Guidance(perturbed, (Term(cond, perturbed, guide_scale),))


def adaptive_pag_scale(scale: Scale, adaptive_scale: Scale, timestep: Scale) -> Scale:
    """diffusers' adaptive PAG: ``max(scale − adaptive_scale · (1000 − t), 0)``. Tensors in,
    tensor out (no host sync, so it changes per step without recompiling). Python numbers must be
    finite (a NaN would silently become the result)."""
    fn = "adaptive_pag_scale"
    for name, value in (("scale", scale), ("adaptive_scale", adaptive_scale), ("timestep", timestep)):
        if not isinstance(value, torch.Tensor):
            _checks.finite_number(fn, name, value)
    if isinstance(scale, torch.Tensor) or isinstance(adaptive_scale, torch.Tensor) or \
            isinstance(timestep, torch.Tensor):
        value = scale - adaptive_scale * (1000 - timestep)
        return value.clamp_min(0) if isinstance(value, torch.Tensor) else max(value, 0.0)
    return max(float(scale) - float(adaptive_scale) * (1000 - float(timestep)), 0.0)


def icg_random_labels(batch: int, num_classes: int, *, device=None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent condition for class-conditional models: uniform random labels (int64, (batch,))."""
    if batch < 1 or num_classes < 1:
        raise ValueError(f"icg_random_labels: batch and num_classes must be >= 1, got {batch}, {num_classes}")
    return torch.randint(0, num_classes, (batch,), device=device, generator=generator)


def icg_noise_condition(embedding: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent condition for text models: Gaussian noise of the embedding's shape, scaled to
    the embedding's standard deviation (per sample, over all non-batch dims), same dtype/device."""
    if not isinstance(embedding, torch.Tensor) or not embedding.is_floating_point():
        raise TypeError("icg_noise_condition: embedding: expected a floating-point tensor")
    dims = tuple(range(1, embedding.dim())) or None
    std = embedding.float().std(dim=dims, keepdim=dims is not None)
    noise = torch.randn(embedding.shape, device=embedding.device, generator=generator)
    return (noise * std).to(embedding.dtype)


# --------------------------------------------------------------------------- guidance intervals
# A method that is on for part of the schedule only: its scale outside the interval is ``off``
# (0: the term vanishes; the denoiser drops a branch whose scale is a Python 0). For CFG written
# as ``cfg(s)`` (u + s(c − u)) diffusers' "guidance off" output is cond itself: use ``off=1.0``.


def _interval_fractions(fn: str, start, stop) -> tuple[float, float]:
    start = _checks.finite_number(fn, "start", start)
    stop = _checks.finite_number(fn, "stop", stop)
    # diffusers' BaseGuidance accepts 0 <= start < 1 and start <= stop <= 1.
    if not 0.0 <= start < 1.0:
        _checks.fail(fn, "start", f"must be in [0, 1), got {start}")
    if not start <= stop <= 1.0:
        _checks.fail(fn, "stop", f"must be in [start, 1] = [{start}, 1], got {stop}")
    return start, stop


def _in_steps(step: int, num_steps: int, start: float, stop: float) -> bool:
    # diffusers: int(start · n) <= step < int(stop · n) (truncation, as BaseGuidance does).
    return int(start * num_steps) <= step < int(stop * num_steps)


def guidance_interval(scale: Scale, *, step: int, num_steps: int, start: float = 0.0, stop: float = 1.0,
                      off: float = 0.0) -> Scale:
    """diffusers' ``start``/``stop`` fractions of the schedule: ``scale`` at steps
    ``int(start·n) <= step < int(stop·n)``, ``off`` elsewhere. A Python number gives a Python number
    (so the denoiser can drop the branch); a tensor gives a tensor of its shape (``scale`` itself,
    or ``off`` in fp32 without a host copy), for a compiled step that takes its scales as inputs.
    See :func:`interval_schedule` for the whole schedule as one device tensor."""
    fn = "guidance_interval"
    step = _checks.integer(fn, "step", step, minimum=0)
    num_steps = _checks.integer(fn, "num_steps", num_steps, minimum=1)
    start, stop = _interval_fractions(fn, start, stop)
    off = _checks.fp32_number(fn, "off", off)
    on = _in_steps(step, num_steps, start, stop)
    if isinstance(scale, torch.Tensor):
        return scale if on else torch.full_like(scale, off, dtype=torch.float32)
    _scale_value(fn, "scale", scale)
    return scale if on else off


def interval_schedule(scale: Scale, num_steps: int, *, start: float = 0.0, stop: float = 1.0, off: float = 0.0,
                      device=None) -> torch.Tensor:
    """Every step's scale at once, as an fp32 ``(num_steps,)`` tensor (``scale`` inside diffusers'
    ``[int(start·n), int(stop·n))``, ``off`` outside): ``schedule[step]`` is a 0-d device view, so
    a compiled denoising step fed with it never recompiles and a CUDA graph replays it. ``scale``
    may be a number, a 0-d tensor or a per-step ``(num_steps,)`` tensor."""
    fn = "interval_schedule"
    num_steps = _checks.integer(fn, "num_steps", num_steps, minimum=1)
    start, stop = _interval_fractions(fn, start, stop)
    off = _checks.fp32_number(fn, "off", off)
    mask = torch.tensor([_in_steps(i, num_steps, start, stop) for i in range(num_steps)], device=device)
    if isinstance(scale, torch.Tensor):
        if scale.dim() > 1 or scale.numel() not in (1, num_steps):
            _checks.fail(fn, "scale", f"expected a number or a tensor of shape () or ({num_steps},), "
                                      f"got {tuple(scale.shape)}")
        values = scale.to(device=mask.device, dtype=torch.float32).reshape(-1).expand(num_steps)
    else:
        values = torch.full((num_steps,), _checks.fp32_number(fn, "scale", scale), device=mask.device)
    return torch.where(mask, values, torch.full_like(values, off))


def sigma_interval(scale: Scale, sigma: torch.Tensor, *, sigma_start: float, sigma_end: float,
                   off: float = 0.0) -> torch.Tensor:
    """ComfyUI's sigma ranges (``sigma_end <= sigma <= sigma_start``, both ends included, as its
    guidance nodes test ``sigma`` against ``percent_to_sigma(start_percent / end_percent)``):
    ``scale`` where the current ``sigma`` — the sampler's tensor, () or (B,) — is inside, ``off``
    elsewhere. Computed on ``sigma``'s device with no host sync; returns fp32 broadcast over
    ``sigma`` and ``scale`` (a per-sample scale when sigma is per sample)."""
    fn = "sigma_interval"
    if not isinstance(sigma, torch.Tensor) or not sigma.is_floating_point():
        _checks.fail(fn, "sigma", f"expected a floating-point tensor (the sampler's sigma), got "
                                  f"{type(sigma).__name__}", TypeError)
    sigma_start = _checks.finite_number(fn, "sigma_start", sigma_start)
    sigma_end = _checks.finite_number(fn, "sigma_end", sigma_end)
    if sigma_end > sigma_start:
        _checks.fail(fn, "sigma_end", f"must be <= sigma_start ({sigma_start}), got {sigma_end} "
                                      "(sigmas decrease along the schedule)")
    off = _checks.fp32_number(fn, "off", off)
    on = (sigma >= sigma_end) & (sigma <= sigma_start)
    if isinstance(scale, torch.Tensor):
        value = scale.to(device=sigma.device, dtype=torch.float32)
    else:
        _scale_value(fn, "scale", scale)
        value = torch.full((), float(scale), dtype=torch.float32, device=sigma.device)
    return torch.where(on, value, torch.full((), off, dtype=torch.float32, device=sigma.device))
